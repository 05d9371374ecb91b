"""The chapters and the book agree: numbering, titles, set-up cells, solutions links, the table
of contents, the teacher's pages and the book's own configuration.

Fast and build-free (the book itself is built by ``make book`` and checked in a browser by
``make book-check``, tests/book_check.py). The chapters are notebooks/NN_name.ipynb, numbered
01..13 with no gaps; each starts with a markdown cell ``# N. Title`` and a set-up code cell
(NOTATION.md); each has a solutions notebook notebooks/solutions/NN_name_solutions.ipynb that
starts with ``# Solutions to chapter N: Title``; the two link to each other; book/_toc.yml lists
the chapters, then the solutions, then the teacher's pages and the appendix.
"""
import importlib.util
import json
import re
from pathlib import Path

import matplotlib
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
BOOK = ROOT / "book"
N_CHAPTERS = 13
MAX_CHAPTER_SECONDS = 60           # the house rule: a chapter executes in 60 s on 2 cores
CHAPTER_FILE = re.compile(r"^(\d\d)_[a-z0-9_]+\.ipynb$")
CHAPTER_TITLE = re.compile(r"^# (\d+)\. (\S.*)$")
SOLUTIONS_TITLE = re.compile(r"^# Solutions to chapter (\d+): (\S.*)$")
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:tmp|work|root|home)/")
TEACHER_PAGES = ["syllabus", "teaching", "glossary", "references"]
# Sections of book/design.md that code and docstrings cite by name; renaming one breaks them.
DESIGN_SECTIONS = {
    "design-decay-convention": "The decay rate w is positive",
    "design-wkv-state": "The WKV state",
    "design-variants": "The variants",
    "design-parameter-names": "Parameter names are the checkpoints' names",
    "design-initialisation": "The initialisation",
    "design-training-recipe": "Training recipe: official vs ours",
    "design-compute-dtype": "The compute dtype",
    "design-data": "Data",
    "design-reference-figures": "Reference figures",
}
# NOTATION.md: the first code cell of every chapter, so that a chapter runs in Colab. It installs
# from the repository that pyproject.toml names.
REPOSITORY = re.search(r'^Repository = "(.+)"$', (ROOT / "pyproject.toml").read_text(),
                       re.MULTILINE).group(1)
SETUP_CELL = f'''\
# Setup: where rwkv_ref is not installed (Colab, say), install it from its repository.
import importlib.util, subprocess, sys
if importlib.util.find_spec("rwkv_ref") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q",
                           "rwkv_ref[notebooks] @ git+{REPOSITORY}"])'''


def chapters() -> list[Path]:
    return sorted(p for p in NOTEBOOKS.glob("*.ipynb") if CHAPTER_FILE.match(p.name))


def solutions_of(chapter: Path) -> Path:
    return NOTEBOOKS / "solutions" / f"{chapter.stem}_solutions.ipynb"


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def sources(path: Path, kind: str) -> list[str]:
    return ["".join(c["source"]) for c in cells(path) if c["cell_type"] == kind]


def first_line(path: Path) -> str:
    first = cells(path)[0]
    assert first["cell_type"] == "markdown", f"{path.name}: the first cell must be markdown"
    return "".join(first["source"]).splitlines()[0]


def chapter_title(chapter: Path) -> str:
    match = CHAPTER_TITLE.match(first_line(chapter))
    assert match, f"{chapter.name}: the first line must read '# N. Title'"
    return match.group(2)


def all_notebooks() -> list[Path]:
    return sorted(p for p in NOTEBOOKS.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


by_chapter = pytest.mark.parametrize("chapter", chapters(), ids=lambda p: p.stem)


# ----------------------------------------------------------------------------- chapters


def test_every_notebook_is_a_numbered_chapter():
    strays = [p.name for p in NOTEBOOKS.glob("*.ipynb") if not CHAPTER_FILE.match(p.name)]
    assert not strays, f"notebooks/ holds files that are not chapters NN_name.ipynb: {strays}"


def test_chapters_are_numbered_01_to_13_without_gaps():
    numbers = [int(p.name[:2]) for p in chapters()]
    assert numbers == list(range(1, N_CHAPTERS + 1)), f"chapter numbers: {numbers}"


@by_chapter
def test_heading_matches_file_number(chapter):
    match = CHAPTER_TITLE.match(first_line(chapter))
    assert match, f"{chapter.name}: the first line must read '# N. Title'"
    assert int(match.group(1)) == int(chapter.name[:2]), (
        f"{chapter.name} is titled chapter {match.group(1)}")


@by_chapter
def test_first_code_cell_is_the_setup_cell(chapter):
    code = sources(chapter, "code")
    assert code and code[0].strip() == SETUP_CELL, (
        f"{chapter.name}: the first code cell must be the set-up cell of NOTATION.md")


@by_chapter
def test_solutions_exist_and_name_their_chapter(chapter):
    solutions = solutions_of(chapter)
    assert solutions.exists(), f"{chapter.name} has no {solutions.relative_to(ROOT)}"
    match = SOLUTIONS_TITLE.match(first_line(solutions))
    assert match, f"{solutions.name}: the first line must read '# Solutions to chapter N: Title'"
    assert int(match.group(1)) == int(chapter.name[:2])
    assert match.group(2) == chapter_title(chapter)


@by_chapter
def test_chapter_links_to_its_solutions_and_back(chapter):
    n = int(chapter.name[:2])
    forward = f"Solutions: [chapter {n} solutions](solutions/{solutions_of(chapter).name})"
    assert any(forward in s for s in sources(chapter, "markdown")), (
        f"{chapter.name}: the exercise section must end with the line {forward!r}")
    back = f"Back to [chapter {n}](../{chapter.name})."
    first = sources(solutions_of(chapter), "markdown")[0]
    assert back in first, f"{solutions_of(chapter).name}: the first cell must say {back!r}"


@by_chapter
def test_chapter_checks_itself_and_has_exercises(chapter):
    code = "\n".join(sources(chapter, "code"))
    # a chapter checks itself: assert_close against the package, or (the experiment and
    # precision chapters) assertions on what it measured
    checks = code.count("assert_close") + len(re.findall(r"^\s*assert ", code, flags=re.M))
    assert checks >= 3, f"{chapter.name}: fewer than three assertions"
    exercises = [s for s in sources(chapter, "markdown")
                 if s.lstrip().startswith("## Exercises") or "\n## Exercises" in s]
    assert exercises, f"{chapter.name}: no '## Exercises' section"
    items = re.findall(r"^\d+\. ", exercises[0].split("## Exercises", 1)[1], flags=re.M)
    assert len(items) >= 3, f"{chapter.name}: fewer than three exercises"


def test_notebooks_are_committed_without_outputs():
    for path in all_notebooks():
        notebook = json.loads(path.read_text())
        assert notebook["metadata"].get("kernelspec", {}).get("name") == "python3", path.name
        for cell in notebook["cells"]:
            if cell["cell_type"] == "code":
                assert not cell["outputs"] and cell["execution_count"] is None, (
                    f"{path.relative_to(ROOT)} has outputs: jupyter nbconvert --clear-output")


@pytest.mark.parametrize("path", all_notebooks(), ids=lambda p: p.stem)
def test_no_machine_paths_in_notebooks(path):
    # The built book must not show where it was built (book_check.py checks the pages); a path
    # written into a notebook is the one cause this test can see without building.
    hits = [m.group(0) for s in sources(path, "code") + sources(path, "markdown")
            for m in MACHINE_PATH.finditer(s)]
    assert not hits, f"{path.relative_to(ROOT)} names absolute paths: {hits}"


# ----------------------------------------------------------------------------- the book


def toc_parts() -> dict[str, list[str]]:
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text())
    assert toc["format"] == "jb-book" and (BOOK / f"{toc['root']}.md").exists()
    return {part["caption"]: [entry["file"] for entry in part["chapters"]]
            for part in toc["parts"]}


def test_book_reads_the_notebooks_through_a_symlink():
    link = BOOK / "notebooks"
    assert link.is_symlink() and link.resolve() == NOTEBOOKS.resolve()


def test_table_of_contents_lists_chapters_solutions_teachers_appendix():
    parts = toc_parts()
    assert list(parts) == ["Chapters", "Solutions to the exercises", "For teachers", "Appendix"]
    assert parts["Chapters"] == [f"notebooks/{p.stem}" for p in chapters()]
    assert parts["Solutions to the exercises"] == [
        f"notebooks/solutions/{solutions_of(p).stem}" for p in chapters()]
    assert parts["For teachers"] == TEACHER_PAGES
    assert parts["Appendix"] == ["design"]
    for page in TEACHER_PAGES + ["design"]:
        assert (BOOK / f"{page}.md").exists(), f"book/{page}.md is in the toc but missing"


def test_design_sections_keep_their_names_and_labels():
    text = (BOOK / "design.md").read_text()
    for label, title in DESIGN_SECTIONS.items():
        assert f"({label})=\n## {title}\n" in text, (
            f"book/design.md: section '{title}' with label {label} is cited by the code")


def test_syllabus_states_the_measured_times():
    times = json.loads((BOOK / "_data" / "chapter_times.json").read_text())
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", times["date"]) and times["machine"]["cpu"]
    assert list(times["chapters"]) == [p.stem for p in chapters()], (
        "book/_data/chapter_times.json does not cover the chapters: run book/measure_times.py")
    slow = {name: s for name, s in times["chapters"].items()
            if s > MAX_CHAPTER_SECONDS}
    assert not slow, f"chapters over {MAX_CHAPTER_SECONDS} s: {slow}"
    syllabus = (BOOK / "syllabus.md").read_text()
    assert f"Measured on {times['date']}" in syllabus
    for name, seconds in times["chapters"].items():
        assert f"| {int(name[:2])}. `{name}` | {seconds:.0f} s |" in syllabus, (
            f"book/syllabus.md disagrees with chapter_times.json on {name}")


def test_matplotlib_defaults_are_readable():
    rc = matplotlib.rc_params_from_file(BOOK / "matplotlibrc", use_default_template=False)
    assert rc["figure.dpi"] >= 110 and rc["font.size"] >= 10
    assert rc["savefig.dpi"] in ("figure", rc["figure.dpi"]) or rc["savefig.dpi"] >= 110


def test_mathjax_is_one_local_bundle():
    config = yaml.safe_load((BOOK / "_config.yml").read_text())["sphinx"]["config"]
    assert not any("node_modules" in p for p in config["html_static_path"]), (
        "html_static_path must not copy the whole npm folder into the site")
    ext = _extension()
    assert config["mathjax_path"] == f"mathjax/{ext.MATHJAX_FILES[0]}"
    assert ext.MATHJAX_FILES == ("tex-chtml.js",)


def _extension():
    spec = importlib.util.spec_from_file_location("rwkv_book", BOOK / "_ext" / "rwkv_book.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell(kind: str, text: str) -> dict:
    return {"cell_type": kind, "source": text, "metadata": {}}


def test_solution_cells_are_folded():
    ext = _extension()
    notebook = [_cell("markdown", "# Solutions to chapter 3: X"), _cell("code", SETUP_CELL),
                _cell("code", "def f(): ..."), _cell("markdown", "text"), _cell("code", "f()")]
    assert ext.cells_to_hide("notebooks/solutions/03_x_solutions", notebook) == [2, 4]
    chapter = [_cell("markdown", "# 3. X"), _cell("code", SETUP_CELL),
               _cell("code", "# EXERCISE merge: add two states\ndef merge(x, y): ..."),
               _cell("code", "assert_close(merge(a, b), ref)"),
               _cell("code", "x = 1  # EXERCISE in a comment later on")]
    assert ext.cells_to_hide("notebooks/03_x", chapter) == [2]
    assert ext.cells_to_hide("design", chapter) == []
