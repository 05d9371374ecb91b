"""Grade the exercises of chapter notebooks against the package.

    python -m rwkv_ref.grade NOTEBOOK [NOTEBOOK ...] [--seed N] [--examples N] [--expect-stubs]

Each notebook is executed in this process, cell by cell in one namespace (IPython, so magics
work); a cell that raises (a stub, a failing check) is recorded and the next one runs. Then
every exercise of the notebook (those of its chapter, from the file name ``NN_...``, and every
cell headed ``# EXERCISE <name>:``) is checked: the function of that name defined in the
notebook is compared with the package on random inputs drawn by hypothesis
(``rwkv_ref.grading.exercises`` says how, per exercise). One line per exercise: passed,
FAILED (with the smallest failing input, the expected and the got), not yet implemented,
missing, or error. Execution stops after the last cell that defines an exercise (its
``# EXERCISE`` cell, or a later ``def``/``class``/assignment of its name): later cells cannot
change what is graded, so a chapter is graded without running its remaining demonstrations.
(A function that reads a global first set in a later cell would fail here; in a notebook run
top to bottom it would too, when called where it is defined.) Exit status 0 when every
exercise passes (with ``--expect-stubs``: when every one is not yet implemented, as in an
untouched student edition), 1 otherwise, 2 for bad input. A notebook without exercises is not
run. The hypothesis seed is printed; ``--seed`` reruns the same inputs. Grading runs the notebook's code in this process: grade only
notebooks you trust.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from rwkv_ref.student import EXERCISE


class BadInput(ValueError):
    """A path that is not a readable notebook (the message says which and why)."""


@dataclass
class CellError:
    index: int      # the cell's position in the notebook (markdown cells count)
    message: str    # "ExceptionName: first line"


@dataclass
class Cell:
    cell_type: str
    source: str


def read_notebook(path: Path) -> list[Cell]:
    """The cells of the notebook at ``path``, or ``BadInput`` with one line.

    (Plain JSON: nbformat's validator takes seconds to import and adds nothing here.)
    """
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        return [Cell(c["cell_type"], "".join(c["source"])) for c in cells]
    except (ValueError, KeyError, TypeError) as e:  # bad JSON or UTF-8, or no cells
        raise BadInput(f"{path}: not a Jupyter notebook ({type(e).__name__}: {e}); "
                       "give an .ipynb file") from e


def _shell():
    """The run's IPython shell (IPython allows one per process), emptied before each use."""
    from IPython.core.interactiveshell import InteractiveShell

    global _SHELL_CLASS
    if _SHELL_CLASS is None:
        class Shell(InteractiveShell):
            def enable_gui(self, gui=None):  # %matplotlib: there is no GUI to start
                pass
        _SHELL_CLASS = Shell
    os.environ.setdefault("MPLBACKEND", "Agg")
    shell = _SHELL_CLASS.instance()
    shell.reset(new_session=False)
    return shell


_SHELL_CLASS = None


def execute(cells: list[Cell], directory: Path, stop: int | None = None):
    """Run the code cells (up to index ``stop``, included; all if None) in one fresh
    namespace, from ``directory``.

    Output is swallowed; an exception in a cell is recorded and the next cell runs.
    Returns:
        (namespace dict, number of code cells run, list of ``CellError``).
    """
    shell, errors, ran = _shell(), [], 0
    here = os.getcwd()
    try:
        os.chdir(directory)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            for index, cell in enumerate(cells):
                if stop is not None and index > stop:
                    break
                if cell.cell_type != "code":
                    continue
                ran += 1
                result = shell.run_cell(cell.source, store_history=False, silent=True)
                error = result.error_before_exec or result.error_in_exec
                if error is not None:
                    text = str(error).strip().splitlines()
                    errors.append(CellError(index, type(error).__name__
                                            + (f": {text[0]}" if text else "")))
    finally:
        os.chdir(here)
        _close_figures()
    return shell.user_ns, ran, errors


def _close_figures():
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


def exercise_names(path: Path, cells: list[Cell]) -> list[str]:
    """The exercises of a notebook: its chapter's (by file name), then any other headed cell."""
    from rwkv_ref.grading.exercises import EXERCISES

    chapter = re.match(r"(\d\d)_", path.name)
    names = [name for name, ex in EXERCISES.items()
             if chapter is not None and ex.chapter == int(chapter.group(1))]
    for cell in cells:
        header = _header(cell)
        if header is not None and header not in names:
            names.append(header)
    return names


def _header(cell: Cell) -> str | None:
    """The exercise named by a code cell's ``# EXERCISE <name>:`` first line, else None."""
    if cell.cell_type != "code":
        return None
    header = EXERCISE.match(cell.source.split("\n")[0].strip())
    return None if header is None else header.group(1)


def last_defining_cell(cells: list[Cell], names: list[str]) -> int | None:
    """The index of the last code cell that defines one of ``names`` (an ``# EXERCISE <name>``
    header, or ``def``/``class``/``=`` of the name at the start of a line): the grader need run
    no further. None (run everything) when some name has no such cell: it may be defined in a
    way this does not see, and running every cell is the safe answer."""
    defines = {name: re.compile(rf"^(?:(?:async\s+)?def\s+{name}\b|class\s+{name}\b"
                                rf"|{name}\s*(?::[^=\n]*)?=(?!=))", re.MULTILINE)
               for name in names}
    last = {}
    for index, cell in enumerate(cells):
        if cell.cell_type != "code":
            continue
        header = _header(cell)
        for name in names:
            if header == name or defines[name].search(cell.source):
                last[name] = index
    return max(last.values()) if len(last) == len(names) else None


def grade_notebook(path: Path, cells: list[Cell], seed: int, examples: int):
    """Execute one notebook, up to the last cell that defines an exercise, and check its
    exercises (a notebook without any is not run).

    Returns:
        (code cells run, list of ``CellError``, list of ``Verdict``).
    """
    from rwkv_ref.grading.check import ERROR, MISSING, Verdict, check
    from rwkv_ref.grading.exercises import EXERCISES

    names = exercise_names(path, cells)
    if not names:
        return 0, [], []
    namespace, ran, errors = execute(cells, path.resolve().parent,
                                     stop=last_defining_cell(cells, names))
    verdicts = []
    for name in names:
        fn = namespace.get(name)
        if name not in EXERCISES:
            verdicts.append(Verdict(name, ERROR, [f"no exercise {name!r} is known to the grader; "
                                                  f"known: {', '.join(EXERCISES)}"]))
        elif fn is None:
            verdicts.append(Verdict(name, MISSING, ["the notebook defines no such function"]))
        elif not callable(fn) or getattr(fn, "__module__", None) != "__main__":
            where = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', name)}"
            verdicts.append(Verdict(name, MISSING, [f"{name} is {where}, not a function "
                                                    "defined in the notebook"]))
        else:
            verdicts.append(check(EXERCISES[name], fn, seed, examples))
    return ran, errors, verdicts


def report(path: Path, ran: int, errors: list[CellError], verdicts, out) -> None:
    """Print one notebook's result: the cells that raised, then a table of the exercises."""
    print(f"{path}: {ran} code cells run, {len(errors)} raised", file=out)
    for e in errors:
        print(f"    cell {e.index}: {e.message}", file=out)
    if not verdicts:
        print("    no exercises (the notebook was not run)", file=out)
    width = max((len(v.name) for v in verdicts), default=0)
    for v in verdicts:
        print(f"  {v.name:<{width}}  {v.status}" + (f": {v.lines[0]}" if len(v.lines) == 1
                                                     else ""), file=out)
        for line in v.lines if len(v.lines) > 1 else []:
            print(f"  {'':<{width}}    {line}", file=out)


def main(argv: list[str] | None = None) -> int:
    from rwkv_ref.grading.check import PASSED, TODO

    parser = argparse.ArgumentParser(prog="python -m rwkv_ref.grade",
                                     description="Grade chapter exercises against rwkv_ref.")
    parser.add_argument("notebooks", nargs="+", type=Path, metavar="NOTEBOOK")
    parser.add_argument("--seed", type=int, default=None,
                        help="hypothesis seed (default: a random one, printed)")
    parser.add_argument("--examples", type=int, default=40,
                        help="inputs tried per exercise (default: 40)")
    parser.add_argument("--expect-stubs", action="store_true",
                        help="exit 0 only if every exercise is 'not yet implemented' (CI: the "
                             "student edition gives no solution away)")
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error(f"--examples must be >= 1, got {args.examples}")
    try:
        notebooks = [(path, read_notebook(path)) for path in args.notebooks]
    except BadInput as e:
        print(f"grade: {e}", file=sys.stderr)
        return 2
    seed = random.randrange(2**32) if args.seed is None else args.seed
    rerun = " ".join(["python -m rwkv_ref.grade", f"--seed {seed}", *map(str, args.notebooks)])
    print(f"hypothesis seed {seed} (to rerun the same inputs: {rerun})")
    wanted = TODO if args.expect_stubs else PASSED
    ok = True
    for path, cells in notebooks:
        ran, errors, verdicts = grade_notebook(path, cells, seed, args.examples)
        report(path, ran, errors, verdicts, sys.stdout)
        ok &= all(v.status == wanted for v in verdicts)
    print(f"every exercise is {wanted}" if ok else f"not every exercise is {wanted}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
