"""Files that are never seen half-written, and torch files read with an error a person can act on.

Every file rwkv_ref writes that someone may be reading, or that a crash may interrupt
(checkpoints, metrics, downloads, exported weights), goes through ``atomic_write``: the bytes go
to a temporary file beside the target, which is renamed over it only when complete.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

TMP_SUFFIX = ".tmp"


class FileProblem(ValueError):
    """A file rwkv_ref was asked to read is missing, truncated or not what it should be."""


@contextmanager
def atomic_write(path: str | os.PathLike):
    """Open a temporary binary file beside ``path``; on success it replaces ``path``.

    The temporary file is ``<name>.<random>.tmp`` in the same folder (a rename is atomic only
    within one file system); on an exception it is removed and ``path`` is left as it was.

        with atomic_write(path) as f:
            torch.save(obj, f)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        with open(tmp, "wb") as f:             # f.name is the temporary path
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)                          # mkstemp makes it private (0600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_torch(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through ``atomic_write``."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files ``atomic_write`` leaves beside ``path`` when its process is
    killed mid-write (SIGKILL, power loss). Call it when no other writer can be running.

    Returns:
        The files removed.
    """
    path = Path(path)
    stale = sorted(path.parent.glob(f"{path.name}.*{TMP_SUFFIX}")) if path.parent.is_dir() else []
    for f in stale:
        f.unlink(missing_ok=True)
    return stale


def load_torch(path: str | os.PathLike, what: str = "checkpoint"):
    """``torch.load`` onto the CPU with ``weights_only=True`` (no code runs from the file).

    Args:
        path: the file.  what: what it should be, for the message ("checkpoint", ...).
    Returns:
        The loaded object.
    Raises:
        FileProblem: one line naming the file and the problem (missing, empty, truncated,
        not a torch file) and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise FileProblem(f"{what} file not found: {path}")
    if path.stat().st_size == 0:
        raise FileProblem(f"{what} file {path} is empty; it was never written completely")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch/zip/unpickling errors of every kind
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic.startswith(b"PK") or magic.startswith(b"\x80"):   # zip or legacy pickle
            problem = "is truncated or corrupt"
        else:
            problem = "is not a file written by torch.save"
        raise FileProblem(f"{what} file {path} {problem} ({type(e).__name__} while loading); "
                          f"re-create it: train again, or download it again") from None
