"""Measure how long each chapter takes to execute, for the syllabus.

    PYTHONPATH=$PWD python book/measure_times.py            # every chapter, one at a time
    PYTHONPATH=$PWD python book/measure_times.py 03 09      # only these (the others are kept)

Each chapter notebooks/NN_*.ipynb runs top to bottom in a fresh kernel with nbclient, in
notebooks/ (as in the book's build and in CI), one after the other so that they do not share
the cores. The wall-clock time of the whole run, kernel start included, goes to
book/_data/chapter_times.json together with the date and a description of the machine (CPU,
cores, load average before the first chapter), and the table in book/syllabus.md between its
``times:start`` and ``times:end`` markers is rewritten from that file. tests/test_book.py
checks that the two agree and that every chapter has a time. A chapter that fails is reported
and left out (the script then exits with status 1). Chapter 9 reads tiny-shakespeare; where
the copy is not found by itself (see ``rwkv_ref.data``), set ``RWKV_REF_DATA``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

BOOK = Path(__file__).resolve().parent
ROOT = BOOK.parent
NOTEBOOKS = ROOT / "notebooks"
TIMES = BOOK / "_data" / "chapter_times.json"
SYLLABUS = BOOK / "syllabus.md"
CHAPTER = re.compile(r"^(\d\d)_[a-z0-9_]+\.ipynb$")
TABLE = re.compile(r"(<!-- times:start -->\n).*?(<!-- times:end -->)", re.S)


def chapters() -> list[Path]:
    """notebooks/NN_name.ipynb, in order."""
    return sorted(p for p in NOTEBOOKS.glob("*.ipynb") if CHAPTER.match(p.name))


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the times depend on: CPU, cores, load, Python and torch versions."""
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(),
            "load_average_at_start": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def run_chapter(path: Path, timeout: int = 600) -> float:
    """Execute one notebook in a fresh kernel; returns the wall-clock seconds.

    Args:
        path: the notebook.  timeout: seconds allowed per cell.
    Returns:
        seconds from starting the kernel to the end of the last cell.
    """
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.perf_counter()
    client.execute()
    return time.perf_counter() - start


def syllabus_table(times: dict) -> str:
    """The markdown table of measured times (minutes:seconds) for the syllabus page."""
    lines = [f"Measured on {times['date']}: {times['machine']['cpu']}, "
             f"{times['machine']['cores']} cores, load average "
             f"{times['machine']['load_average_at_start']} at the start; torch "
             f"{times['machine']['torch']}. Each chapter in a fresh kernel, one after the other.",
             "", "| chapter | execution time |", "|---|---:|"]
    for name, seconds in times["chapters"].items():
        lines.append(f"| {int(name[:2])}. `{name}` | {seconds:.0f} s |")
    lines.append(f"| all chapters | {sum(times['chapters'].values()) / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    wanted = set(argv)
    previous = json.loads(TIMES.read_text())["chapters"] if TIMES.exists() else {}
    times = {"date": datetime.date.today().isoformat(), "machine": machine(), "chapters": {}}
    failed = []
    for path in chapters():
        if wanted and path.name[:2] not in wanted:
            if path.stem in previous:
                times["chapters"][path.stem] = previous[path.stem]
            continue
        try:
            seconds = run_chapter(path)
        except CellExecutionError as e:
            failed.append(path.name)
            print(f"{path.name}: FAILED, not timed: {str(e).strip().splitlines()[-1]}")
            continue
        times["chapters"][path.stem] = round(seconds, 1)
        print(f"{path.name}: {seconds:.1f} s", flush=True)
    TIMES.parent.mkdir(exist_ok=True)
    TIMES.write_text(json.dumps(times, indent=2) + "\n")
    text = SYLLABUS.read_text()
    if not TABLE.search(text):
        print(f"{SYLLABUS.name} has no <!-- times:start --> ... <!-- times:end --> markers")
        return 1
    SYLLABUS.write_text(TABLE.sub(lambda m: m.group(1) + syllabus_table(times) + m.group(2),
                                  text))
    print(f"wrote {TIMES.relative_to(ROOT)} and the table in {SYLLABUS.relative_to(ROOT)}")
    if failed:
        print(f"these chapters failed and have no time: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
