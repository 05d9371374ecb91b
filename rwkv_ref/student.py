"""The student edition of the chapters: every solution region replaced by a stub.

    python -m rwkv_ref.student [--src notebooks/] [--out student/] [--force]

An exercise is one code cell whose first line is ``# EXERCISE <name>: <task>``; the part a
student writes is enclosed in ``### BEGIN SOLUTION hint: <hint>`` ... ``### END SOLUTION``
(the contract, ``EXERCISES.md``). Each region, both marker lines included, becomes
``raise NotImplementedError("<name>: <hint>")`` at the BEGIN marker's indentation. Everything
else stays; outputs are stripped. Only the chapters ``NN_*.ipynb`` are read, so no solutions
notebook is copied (links to ``solutions/`` are pointed at the chapters' folder). The markers
are checked in every chapter before anything is written: a BEGIN without END, nested regions,
an exercise cell without a region and a region outside an exercise cell are refused with one
line naming the notebook, the cell (counted from 0, markdown included) and the line.

A student notebook that already exists and differs from the fresh edition (the student's
work, say) is never overwritten without ``--force``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

EXERCISE = re.compile(r"#\s*EXERCISE\s+([A-Za-z_]\w*)\s*:\s*(\S.*)$")
BEGIN = re.compile(r"^(\s*)###\s*BEGIN SOLUTION\b(.*)$")
HINT = re.compile(r"^\s*hint:\s*(\S.*?)\s*$")
END = re.compile(r"^\s*###\s*END SOLUTION\s*$")
CHAPTER = "[0-9][0-9]_*.ipynb"

README = """\
# Student edition

These notebooks are the chapters of rwkv_ref with every exercise left for you to write. Each
exercise is a code cell starting with `# EXERCISE <name>: ...`; the line
`raise NotImplementedError("<name>: <hint>")` marks the part to replace, and the hint says
where to start. The cell after an exercise checks it on one small input.

Grade a chapter (from the repository root, with rwkv_ref installed):

    python -m rwkv_ref.grade student/04_rnn_mode.ipynb

The grader runs the notebook cell by cell (a failing cell does not stop it), then tests each
of your exercise functions against the package on many random inputs (hypothesis: shapes,
large keys, carried states, split points). For each exercise it prints one of

- passed: agrees with the package on every input tried;
- FAILED: the smallest input found on which it disagrees, with the expected and your result;
- not yet implemented: it still raises NotImplementedError;
- missing: the notebook defines no function of that name;
- error: it raised another exception (its message is shown).

It exits 0 when every exercise passes. Each run prints its hypothesis seed: pass
`--seed N` to rerun exactly the same inputs. Solutions are in the repository, in
notebooks/solutions/ (try first).

`make student` rewrites these notebooks from the chapters, but never overwrites one you have
changed unless you pass `--force` to `python -m rwkv_ref.student`.
"""


class MarkerError(ValueError):
    """A chapter's solution markers break the contract (the message says where and how)."""


def _string_literal(text: str) -> str:
    """A Python string literal for text, in double quotes where that needs no escapes."""
    return f'"{text}"' if '"' not in text and "\\" not in text and text.isprintable() \
        else repr(text)


def stub_cell(source: str, where: str) -> str:
    """The source of one code cell with each solution region replaced by its stub.

    Args:
        source: the cell's source.  where: "notebook, cell N", for error messages.
    Returns:
        The new source (unchanged for a cell without markers and without an EXERCISE line).
    Raises:
        MarkerError: the markers are unbalanced, nested, or outside an EXERCISE cell, or an
        EXERCISE cell has no region.
    """
    lines = source.split("\n")
    header = EXERCISE.match(lines[0].strip())
    out, open_at, regions = [], None, 0
    for number, line in enumerate(lines, start=1):
        begin, end = BEGIN.match(line), END.match(line)
        if begin or end:
            if header is None:
                raise MarkerError(f"{where}, line {number}: a solution marker outside an exercise "
                                  "cell; start the cell with '# EXERCISE <name>: <task>'")
        if begin:
            if open_at is not None:
                raise MarkerError(f"{where}, line {number}: BEGIN SOLUTION inside the region "
                                  f"opened at line {open_at}; regions cannot nest, close it first")
            hint = HINT.match(begin.group(2))
            if hint is None:
                raise MarkerError(f"{where}, line {number}: BEGIN SOLUTION needs a hint: "
                                  "'### BEGIN SOLUTION hint: <one-line hint>'")
            open_at, regions = number, regions + 1
            message = _string_literal(f"{header.group(1)}: {hint.group(1)}")
            out.append(f"{begin.group(1)}raise NotImplementedError({message})")
        elif end:
            if open_at is None:
                raise MarkerError(f"{where}, line {number}: END SOLUTION without a BEGIN SOLUTION")
            open_at = None
        elif open_at is None:
            out.append(line)
    if open_at is not None:
        raise MarkerError(f"{where}, line {open_at}: BEGIN SOLUTION without END SOLUTION; "
                          "close the region with '### END SOLUTION'")
    if header is not None and regions == 0:
        raise MarkerError(f"{where}: exercise {header.group(1)!r} has no solution region; mark "
                          "it with '### BEGIN SOLUTION hint: ...' and '### END SOLUTION'")
    return "\n".join(out)


def student_notebook(nb, name: str, solutions: str = "solutions"):
    """The student edition of one chapter (a new notebook; ``nb`` is not modified).

    Args:
        nb: an nbformat v4 notebook.  name: its file name, for error messages.
        solutions: where the solutions folder is seen from the edition; markdown links
            ``](solutions/`` are pointed there (the edition has no solutions of its own).
    Returns:
        The notebook with stubs in place of the solution regions and no outputs.
    """
    import nbformat  # here, not at the top: the grader imports this module for EXERCISE only

    nb = nbformat.from_dict(nb)  # a deep copy
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            cell.source = cell.source.replace("](solutions/", f"]({solutions}/")
        if cell.cell_type != "code":
            continue
        cell.source = stub_cell(cell.source, f"{name}, cell {index}")
        cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    return nb


def _read(path: Path):
    """A notebook from disk, or ``MarkerError`` with one line if it is not one."""
    import nbformat

    try:
        return nbformat.read(path, as_version=4)
    except Exception as e:  # nbformat raises several kinds: JSON, schema, OS errors
        raise MarkerError(f"{path}: cannot read it as a notebook ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from e


def write_student_edition(src: Path, out: Path, force: bool = False) -> list[Path]:
    """Write ``out/NN_*.ipynb`` for every chapter ``src/NN_*.ipynb``, and ``out/README.md``.

    Every chapter is converted before anything is written, so a refusal writes nothing.
    Returns:
        The notebooks written.
    Raises:
        MarkerError: bad markers, no chapters, or a changed student notebook without ``force``.
    """
    import nbformat

    chapters = sorted(src.glob(CHAPTER))
    if not chapters:
        raise MarkerError(f"no chapters {CHAPTER} in {src}; pass --src with the notebooks folder")
    solutions = Path(os.path.relpath(src / "solutions", out)).as_posix()
    editions = {out / p.name: nbformat.writes(student_notebook(_read(p), str(p), solutions))
                + "\n" for p in chapters}
    changed = [str(p) for p, text in editions.items()
               if p.exists() and p.read_text(encoding="utf-8") != text]
    if changed and not force:
        raise MarkerError(f"{', '.join(changed)} differ from the fresh edition (your work?); "
                          "pass --force to overwrite, or --out to write elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    for path, text in editions.items():
        path.write_text(text, encoding="utf-8")
    (out / "README.md").write_text(README, encoding="utf-8")
    return list(editions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rwkv_ref.student",
                                     description="Write the student edition of the chapters.")
    parser.add_argument("--src", type=Path, default=Path("notebooks"),
                        help="folder of the chapters NN_*.ipynb (default: notebooks)")
    parser.add_argument("--out", type=Path, default=Path("student"),
                        help="folder to write to (default: student)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite student notebooks that were changed")
    args = parser.parse_args(argv)
    try:
        written = write_student_edition(args.src, args.out, args.force)
    except MarkerError as e:
        print(f"student: {e}", file=sys.stderr)
        return 2
    print(f"student: wrote {len(written)} notebooks and README.md to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
