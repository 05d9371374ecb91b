"""The chapters and the book agree: numbering, titles, solutions and the table of contents.

Fast and build-free (the book itself is built by ``make book``). The chapters are
notebooks/NN_name.ipynb, numbered 01..11 with no gaps; each starts with a markdown cell
``# N. Title``; each has a solutions notebook notebooks/solutions/NN_name_solutions.ipynb that
starts with ``# Solutions to chapter N: Title``; book/_toc.yml lists the chapters, then the
solutions, in that order, through the symlink book/notebooks -> ../notebooks.
"""
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
BOOK = ROOT / "book"
N_CHAPTERS = 11
CHAPTER_FILE = re.compile(r"^(\d\d)_[a-z0-9_]+\.ipynb$")
CHAPTER_TITLE = re.compile(r"^# (\d+)\. (\S.*)$")
SOLUTIONS_TITLE = re.compile(r"^# Solutions to chapter (\d+): (\S.*)$")


def chapters() -> list[Path]:
    return sorted(p for p in NOTEBOOKS.glob("*.ipynb") if CHAPTER_FILE.match(p.name))


def solutions_of(chapter: Path) -> Path:
    return NOTEBOOKS / "solutions" / f"{chapter.stem}_solutions.ipynb"


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def first_line(path: Path) -> str:
    first = cells(path)[0]
    assert first["cell_type"] == "markdown", f"{path.name}: the first cell must be markdown"
    return "".join(first["source"]).splitlines()[0]


def chapter_title(chapter: Path) -> str:
    match = CHAPTER_TITLE.match(first_line(chapter))
    assert match, f"{chapter.name}: the first line must read '# N. Title'"
    return match.group(2)


def test_every_notebook_is_a_numbered_chapter():
    strays = [p.name for p in NOTEBOOKS.glob("*.ipynb") if not CHAPTER_FILE.match(p.name)]
    assert not strays, f"notebooks/ holds files that are not chapters NN_name.ipynb: {strays}"


def test_chapters_are_numbered_01_to_11_without_gaps():
    numbers = [int(p.name[:2]) for p in chapters()]
    assert numbers == list(range(1, N_CHAPTERS + 1)), f"chapter numbers: {numbers}"


@pytest.mark.parametrize("chapter", chapters(), ids=lambda p: p.stem)
def test_heading_matches_file_number(chapter):
    match = CHAPTER_TITLE.match(first_line(chapter))
    assert match, f"{chapter.name}: the first line must read '# N. Title'"
    assert int(match.group(1)) == int(chapter.name[:2]), (
        f"{chapter.name} is titled chapter {match.group(1)}")


@pytest.mark.parametrize("chapter", chapters(), ids=lambda p: p.stem)
def test_solutions_exist_and_name_their_chapter(chapter):
    solutions = solutions_of(chapter)
    assert solutions.exists(), f"{chapter.name} has no {solutions.relative_to(ROOT)}"
    match = SOLUTIONS_TITLE.match(first_line(solutions))
    assert match, f"{solutions.name}: the first line must read '# Solutions to chapter N: Title'"
    assert int(match.group(1)) == int(chapter.name[:2])
    assert match.group(2) == chapter_title(chapter)


@pytest.mark.parametrize("chapter", chapters(), ids=lambda p: p.stem)
def test_chapter_checks_itself_and_has_exercises(chapter):
    sources = ["".join(c["source"]) for c in cells(chapter)]
    code = "\n".join(s for s, c in zip(sources, cells(chapter)) if c["cell_type"] == "code")
    assert "assert_close" in code, f"{chapter.name}: no torch.testing.assert_close check"
    exercises = [s for s in sources if s.lstrip().startswith("## Exercises")
                 or "\n## Exercises" in s]
    assert exercises, f"{chapter.name}: no '## Exercises' section"
    items = re.findall(r"^\d+\. ", exercises[0].split("## Exercises", 1)[1], flags=re.M)
    assert len(items) >= 3, f"{chapter.name}: fewer than three exercises"


def test_notebooks_are_committed_without_outputs():
    for path in sorted(NOTEBOOKS.rglob("*.ipynb")):
        if ".ipynb_checkpoints" in path.parts:
            continue
        notebook = json.loads(path.read_text())
        assert notebook["metadata"].get("kernelspec", {}).get("name") == "python3", path.name
        for cell in notebook["cells"]:
            if cell["cell_type"] == "code":
                assert not cell["outputs"] and cell["execution_count"] is None, (
                    f"{path.relative_to(ROOT)} has outputs: jupyter nbconvert --clear-output")


def test_book_reads_the_notebooks_through_a_symlink():
    link = BOOK / "notebooks"
    assert link.is_symlink() and link.resolve() == NOTEBOOKS.resolve()


def test_table_of_contents_lists_the_chapters_then_the_solutions():
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text())
    assert toc["format"] == "jb-book" and (BOOK / f"{toc['root']}.md").exists()
    parts = {part["caption"]: [entry["file"] for entry in part["chapters"]]
             for part in toc["parts"]}
    assert list(parts) == ["Chapters", "Solutions to the exercises"]
    assert parts["Chapters"] == [f"notebooks/{p.stem}" for p in chapters()]
    assert parts["Solutions to the exercises"] == [
        f"notebooks/solutions/{solutions_of(p).stem}" for p in chapters()]
