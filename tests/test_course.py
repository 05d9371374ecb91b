"""The course as CI checks it: the grader on the real chapters, every exercise passes.

It runs the command a teacher runs, as a subprocess; a failure shows the grader's table. A
fresh student edition, where every exercise must be a stub, is graded in tests/test_student.py
(a file of its own, so that pytest-xdist can run the two at once); tests/test_grade.py holds
the grader itself to fixture notebooks and planted bugs.
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

