"""The course as CI checks it: the grader on the real chapters (every exercise passes) and on a
fresh student edition of them (every exercise is a stub: no solution leaks into it).

Both run the commands a teacher and a student run, as subprocesses; a failure shows the
grader's table. tests/test_grade.py holds the grader itself to fixture notebooks and planted
bugs.
"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def test_every_exercise_of_the_chapters_passes():
    assert len(CHAPTERS) >= 8
    result = run("rwkv_ref.grade", *map(str, CHAPTERS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout and "not yet implemented:" not in result.stdout


def test_every_exercise_of_a_fresh_student_edition_is_a_stub(tmp_path):
    made = run("rwkv_ref.student", "--out", str(tmp_path))
    assert made.returncode == 0, made.stdout + made.stderr
    edition = sorted(tmp_path.glob("[0-9][0-9]_*.ipynb"))
    assert [p.name for p in edition] == [p.name for p in CHAPTERS]
    result = run("rwkv_ref.grade", "--expect-stubs", *map(str, edition))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every exercise is not yet implemented" in result.stdout, result.stdout
