"""The grader (python -m rwkv_ref.grade) on fixture notebooks built here.

Correct solutions (tests/grade_solutions/*.py, one EXERCISE cell each) must pass; their
student edition (made by rwkv_ref.student) must be "not yet implemented"; every planted bug of
EXERCISES.md (tests/grade_solutions/mutants.py) must be FAILED with a small input and the
expected and got values. Seeds are fixed so that CI is deterministic.
"""
import re
import runpy
import sys
import types
from pathlib import Path

import nbformat
import pytest

from rwkv_ref import grade
from rwkv_ref.grading.check import FAILED, UNAVAILABLE, check
from rwkv_ref.grading.exercises import EXERCISES
from rwkv_ref.student import student_notebook

SOLUTIONS = Path(__file__).parent / "grade_solutions"
MUTANTS = runpy.run_path(str(SOLUTIONS / "mutants.py"))["MUTANTS"]
DEPENDS = {"wkv_step": ["merge"]}     # wkv_step is written with the notebook's merge
SEED = "20240611"


GRADABLE = list(EXERCISES)


def solution(name: str) -> str:
    return (SOLUTIONS / f"{name}.py").read_text()


def mutant(mutant_id: str) -> str:
    name, edits = MUTANTS[mutant_id]
    source = solution(name)
    for old, new in edits:
        assert old in source, f"{mutant_id}: the edit no longer applies to {name}.py"
        source = source.replace(old, new)
    return source


def write_notebook(path: Path, sources: list[str]) -> Path:
    cells = [nbformat.v4.new_markdown_cell("# A fixture chapter")]
    cells += [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    return path


def run_grade(capsys, *args) -> tuple[int, str]:
    code = grade.main([*map(str, args), "--seed", SEED])
    return code, capsys.readouterr().out


def status_line(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if re.match(rf"\s+{name}\s", line))


def test_correct_solutions_all_pass(tmp_path, capsys):
    path = write_notebook(tmp_path / "solutions.ipynb", [solution(n) for n in GRADABLE])
    code, out = run_grade(capsys, path)
    assert code == 0, out
    for name in GRADABLE:
        assert "passed" in status_line(out, name), out


def test_student_edition_is_not_yet_implemented(tmp_path, capsys):
    path = write_notebook(tmp_path / "solutions.ipynb", [solution(n) for n in GRADABLE])
    student = tmp_path / "student.ipynb"
    nbformat.write(student_notebook(nbformat.read(path, as_version=4), "solutions"), student)
    code, out = run_grade(capsys, student)
    assert code == 1, out
    for name in GRADABLE:
        assert f"not yet implemented: {name}: " in status_line(out, name), out
    assert run_grade(capsys, student, "--expect-stubs")[0] == 0
    done = write_notebook(tmp_path / "done.ipynb", [solution("merge")])
    assert run_grade(capsys, done, "--expect-stubs")[0] == 1     # a solution is not a stub


@pytest.mark.parametrize("mutant_id", list(MUTANTS))
def test_planted_bug_fails_with_a_small_input(mutant_id, tmp_path, capsys):
    name = MUTANTS[mutant_id][0]
    sources = [solution(d) for d in DEPENDS.get(name, [])] + [mutant(mutant_id)]
    code, out = run_grade(capsys, write_notebook(tmp_path / "mutant.ipynb", sources))
    assert code == 1, out
    lines = out.splitlines()
    at = lines.index(status_line(out, name))
    assert lines[at].split()[1] == FAILED, out
    report = "\n".join(lines[at + 1:])
    shown = re.search(r"input: (.*)", report).group(1)
    assert "..." not in shown and len(shown) < 400, f"not a small input: {shown}"
    assert re.search(r"expected .*, got .*first difference at .*: expected .*, got ", report), out


def test_chapter_lists_its_exercises_and_reports_a_missing_one(tmp_path, capsys):
    """04_*: merge and wkv_step; wkv_step here is the package's, imported, not written."""
    path = write_notebook(tmp_path / "04_rnn_mode.ipynb",
                          ["from rwkv_ref.wkv import wkv_step", solution("merge")])
    code, out = run_grade(capsys, path)
    assert code == 1
    assert "passed" in status_line(out, "merge")
    assert "missing: wkv_step is rwkv_ref.wkv.wkv_step" in status_line(out, "wkv_step"), out
    path = write_notebook(tmp_path / "07_mixing.ipynb", [solution("channel_mixing")])
    code, out = run_grade(capsys, path)
    assert "missing: the notebook defines no such function" in status_line(out, "time_mixing")


def test_failing_cells_are_recorded_and_the_rest_still_runs(tmp_path, capsys):
    path = write_notebook(tmp_path / "nb.ipynb", [
        "raise RuntimeError('a failing check')", "%time x = 1", "print(x)", solution("merge")])
    code, out = run_grade(capsys, path)
    assert code == 0, out
    assert "4 code cells run, 1 raised" in out and "cell 1: RuntimeError: a failing check" in out
    assert "passed" in status_line(out, "merge")


def test_cells_after_the_last_definition_are_not_run(tmp_path, capsys):
    broken = solution("merge").replace("    top = ", "    raise ValueError('the first one')\n"
                                                     "    top = ", 1)
    after = "raise RuntimeError('ran past the last exercise')"
    path = write_notebook(tmp_path / "nb.ipynb", [solution("merge"), after])
    code, out = run_grade(capsys, path)
    assert code == 0 and "1 code cells run, 0 raised" in out, out
    # a later cell that redefines the exercise is run, and graded: here the broken one wins
    path = write_notebook(tmp_path / "nb.ipynb", [solution("merge"), "x = 1", broken, after])
    code, out = run_grade(capsys, path)
    assert code == 1 and "3 code cells run, 0 raised" in out, out
    assert "raised ValueError: the first one" in out
    # a name assigned rather than defined counts too
    path = write_notebook(tmp_path / "nb.ipynb", [solution("merge"), "x = 1",
                                                  "good = merge\nmerge = good", after])
    code, out = run_grade(capsys, path)
    assert code == 0 and "3 code cells run, 0 raised" in out, out
    # an exercise defined nowhere visible (chapter 4 also has wkv_step): every cell runs
    path = write_notebook(tmp_path / "04_rnn.ipynb", [solution("merge"), after])
    code, out = run_grade(capsys, path)
    assert code == 1 and "2 code cells run, 1 raised" in out, out


def test_other_exceptions_are_errors_with_their_message(tmp_path, capsys):
    source = solution("merge").replace("    top = ", "    if x.a.shape[0] > 1:\n"
                                                     "        raise ValueError('no batches')\n"
                                                     "    top = ", 1)
    code, out = run_grade(capsys, write_notebook(tmp_path / "nb.ipynb", [source]))
    assert code == 1
    assert status_line(out, "merge").split()[1] == "error"
    assert "raised ValueError: no batches" in out


def test_a_notebook_without_exercises_is_not_run(tmp_path, capsys):
    path = write_notebook(tmp_path / "01_intro.ipynb", ["raise RuntimeError('never run')"])
    code, out = run_grade(capsys, path)
    assert code == 0 and "0 code cells run" in out and "no exercises" in out


def test_unknown_exercise_is_an_error(tmp_path, capsys):
    path = write_notebook(tmp_path / "nb.ipynb", ["# EXERCISE wkv_magic: nothing\npass"])
    code, out = run_grade(capsys, path)
    assert code == 1 and "no exercise 'wkv_magic' is known" in status_line(out, "wkv_magic")


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "notes.ipynb").write_text("not json")
    (tmp_path / "data.ipynb").write_text('{"metadata": {}}')
    for bad, why in [(tmp_path / "absent.ipynb", "no such file"),
                     (tmp_path / "notes.ipynb", "not a Jupyter notebook"),
                     (tmp_path / "data.ipynb", "not a Jupyter notebook")]:
        assert grade.main([str(bad)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
        assert why in captured.err and str(bad) in captured.err


def test_same_seed_same_counterexample():
    namespace = {}
    exec(mutant("merge-smaller_exponent"), namespace)
    first, second = (check(EXERCISES["merge"], namespace["merge"], seed=7) for _ in range(2))
    assert first.status == FAILED and first.lines == second.lines


def test_a_missing_reference_is_reported_not_passed(monkeypatch):
    monkeypatch.setitem(sys.modules, "rwkv_ref.sampling", types.ModuleType("rwkv_ref.sampling"))
    namespace = {}
    exec(solution("sampling_probs"), namespace)
    verdict = check(EXERCISES["sampling_probs"], namespace["sampling_probs"], seed=1)
    assert verdict.status == UNAVAILABLE and "next_token_probs" in verdict.lines[0]
