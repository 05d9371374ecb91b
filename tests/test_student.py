"""The student edition (python -m rwkv_ref.student): stubs in place of solution regions,
outputs stripped, no solutions copied, and one-line refusals of broken markers; and, as CI
checks it, the grader on a fresh edition of the real chapters finds every exercise a stub."""
from pathlib import Path

import nbformat
import pytest

from rwkv_ref.student import main, stub_cell

from test_course import CHAPTERS, ROOT, run

NOTEBOOKS = ROOT / "notebooks"

CELL = '''\
# EXERCISE merge: add two scaled states
import torch


def helper(x):
    return x


def merge(x, y):
    """Docstring stays."""
    ### BEGIN SOLUTION hint: rebase on the larger exponent
    top = torch.maximum(x.p, y.p)
    return top
    ### END SOLUTION


def other(x):
    if x:
            ### BEGIN SOLUTION hint: say "hi" \\ there
        return 1
        ### END SOLUTION
    return 0
'''


def test_each_region_becomes_a_stub_at_its_indentation():
    out = stub_cell(CELL, "nb, cell 1")
    assert '    raise NotImplementedError("merge: rebase on the larger exponent")\n' in out
    assert "            raise NotImplementedError('merge: say \"hi\" \\\\ there')\n" in out
    for kept in ("def helper(x):", '"""Docstring stays."""', "    return 0", "import torch"):
        assert kept in out
    for gone in ("SOLUTION", "torch.maximum", "return top", "return 1"):
        assert gone not in out
    namespace = {}
    exec(out, namespace)
    with pytest.raises(NotImplementedError, match="merge: rebase on the larger exponent"):
        namespace["merge"](None, None)
    with pytest.raises(NotImplementedError, match='merge: say "hi"'):
        namespace["other"](True)


def test_cells_without_markers_are_unchanged():
    source = "x = 1\n# not ### BEGIN SOLUTION at the start of a line\nprint(x)"
    assert stub_cell(source, "nb, cell 0") == source


BROKEN = {
    "BEGIN without END": ("# EXERCISE f: t\ndef f():\n    ### BEGIN SOLUTION hint: h\n    pass",
                          "line 3: BEGIN SOLUTION without END SOLUTION"),
    "nested": ("# EXERCISE f: t\ndef f():\n    ### BEGIN SOLUTION hint: h\n"
               "    ### BEGIN SOLUTION hint: h\n    ### END SOLUTION\n    ### END SOLUTION",
               "line 4: BEGIN SOLUTION inside the region opened at line 3"),
    "exercise without region": ("# EXERCISE f: t\ndef f():\n    pass",
                                "exercise 'f' has no solution region"),
    "region outside exercise": ("def f():\n    ### BEGIN SOLUTION hint: h\n    pass\n"
                                "    ### END SOLUTION",
                                "line 2: a solution marker outside an exercise cell"),
    "END without BEGIN": ("# EXERCISE f: t\n### END SOLUTION", "END SOLUTION without a BEGIN"),
    "no hint": ("# EXERCISE f: t\n### BEGIN SOLUTION\n### END SOLUTION", "needs a hint"),
}


def write_chapter(path: Path, sources: list[str], outputs: bool = False) -> Path:
    cells = [nbformat.v4.new_markdown_cell("# Chapter\n### BEGIN SOLUTION (prose may say it)\n"
                                           "Solutions: [here](solutions/x_solutions.ipynb)")]
    for s in sources:
        cell = nbformat.v4.new_code_cell(s)
        if outputs:
            cell.outputs = [nbformat.v4.new_output("stream", text="solution printed\n")]
            cell.execution_count = 3
        cells.append(cell)
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    return path


@pytest.mark.parametrize("problem", list(BROKEN))
def test_broken_markers_are_refused_in_one_line(problem, tmp_path, capsys):
    source, message = BROKEN[problem]
    src = tmp_path / "notebooks"
    src.mkdir()
    write_chapter(src / "01_fine.ipynb", ["x = 1"])
    write_chapter(src / "02_broken.ipynb", ["import torch", source])
    assert main(["--src", str(src), "--out", str(tmp_path / "student")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "02_broken.ipynb, cell 2" in err
    assert not (tmp_path / "student").exists(), "a refusal must write nothing"


def test_edition_strips_outputs_skips_solutions_and_guards_student_work(tmp_path, capsys):
    src, out = tmp_path / "notebooks", tmp_path / "student"
    (src / "solutions").mkdir(parents=True)
    write_chapter(src / "03_stable.ipynb", [CELL, "merge(1, 2)"], outputs=True)
    write_chapter(src / "solutions" / "03_stable_solutions.ipynb", ["x = 1"])
    (src / "notes.ipynb").write_text("{}")            # not a chapter: not read, not copied
    assert main(["--src", str(src), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.rglob("*")) == ["03_stable.ipynb", "README.md"]
    nb = nbformat.read(out / "03_stable.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].source.startswith("# Chapter")   # prose untouched, but the link
    assert "[here](../notebooks/solutions/x_solutions.ipynb)" in nb.cells[0].source
    assert all(c.outputs == [] and c.execution_count is None for c in nb.cells[1:])
    assert "NotImplementedError" in nb.cells[1].source and nb.cells[2].source == "merge(1, 2)"
    assert "python -m rwkv_ref.grade" in (out / "README.md").read_text()
    assert main(["--src", str(src), "--out", str(out)]) == 0      # unchanged: rewritten
    nb.cells[1].source += "\n# my work"
    nbformat.write(nb, out / "03_stable.ipynb")
    capsys.readouterr()
    assert main(["--src", str(src), "--out", str(out)]) == 2
    assert "03_stable.ipynb differ from the fresh edition" in capsys.readouterr().err
    assert "# my work" in (out / "03_stable.ipynb").read_text()
    assert main(["--src", str(src), "--out", str(out), "--force"]) == 0
    assert "# my work" not in (out / "03_stable.ipynb").read_text()


def test_no_chapters_is_one_line(tmp_path, capsys):
    assert main(["--src", str(tmp_path), "--out", str(tmp_path / "s")]) == 2
    assert "no chapters" in capsys.readouterr().err


def test_the_real_chapters_make_a_student_edition(tmp_path):
    """Every chapter's markers follow the contract (a refusal names the cell to fix)."""
    assert main(["--src", str(NOTEBOOKS), "--out", str(tmp_path)]) == 0
    chapters = {p.name for p in CHAPTERS}
    assert {p.name for p in tmp_path.glob("*.ipynb")} == chapters
    for path in tmp_path.glob("*.ipynb"):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code":
                assert "SOLUTION" not in cell.source and cell.outputs == [], path.name


def test_every_exercise_of_a_fresh_student_edition_is_a_stub(tmp_path):
    """The commands a teacher and a student run, as subprocesses (a failure shows the table)."""
    made = run("rwkv_ref.student", "--out", str(tmp_path))
    assert made.returncode == 0, made.stdout + made.stderr
    edition = sorted(tmp_path.glob("[0-9][0-9]_*.ipynb"))
    assert [p.name for p in edition] == [p.name for p in CHAPTERS]
    result = run("rwkv_ref.grade", "--expect-stubs", *map(str, edition))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every exercise is not yet implemented" in result.stdout, result.stdout
