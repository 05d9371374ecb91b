"""tiny-shakespeare (or any UTF-8 text file) as character tokens, split 90/10, in random windows.

Where the text comes from, the first that applies wins:

1. an explicit path (``--data=PATH`` in ``rwkv_ref.train``): any UTF-8 text, no hash check;
2. the environment variable ``RWKV_REF_DATA``: likewise;
3. the cache, ``~/.cache/rwkv_ref/tinyshakespeare.txt``;
4. ``../shared/data/tinyshakespeare.txt`` beside the repository, where CI keeps a copy;
5. a download from the char-rnn repository into the cache.

Copies from 3-5 are tiny-shakespeare and must match its sha256 (book/design.md, section
"Data"). The text is never part of the repository.

    data = load_data()                     # TextData: tokenizer, train and val token ids
    x, y = get_batch(data.train, batch_size=12, ctx_len=64, generator=g)   # (B, T) each
"""
from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rwkv_ref.files import atomic_write

DATA_ENV = "RWKV_REF_DATA"
TINY_SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/"
                        "data/tinyshakespeare/input.txt")
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CACHE_PATH = Path.home() / ".cache" / "rwkv_ref" / "tinyshakespeare.txt"
# the repository's parent folder holds shared/ on the project's machines and in CI
SHARED_COPY = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
TRAIN_FRACTION = 0.9  # the customary split: the first 90% of the characters train


class DataError(RuntimeError):
    """The text could not be found, downloaded or verified; the message says what to do."""


def _where_to_put() -> str:
    return (f"Put a copy of tiny-shakespeare (sha256 {TINY_SHAKESPEARE_SHA256[:12]}...) at "
            f"{CACHE_PATH}, or point to a text file with --data=PATH or {DATA_ENV}=PATH.")


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_sha256(path: Path, expected: str, source: str) -> None:
    """Raise ``DataError`` unless the file's sha256 is ``expected``.

    Args:
        path: the file to check.  expected: hex digest.  source: where the file came from (for
            the message).
    """
    actual = sha256_of(path)
    if actual != expected:
        raise DataError(f"{source} is not tiny-shakespeare: sha256 {actual}, expected "
                        f"{expected}. Delete it or replace it. {_where_to_put()}")


def download(url: str, dest: Path, sha256: str = TINY_SHAKESPEARE_SHA256) -> Path:
    """Fetch ``url`` into ``dest``: written to a temporary file beside it, checked, then renamed.

    A failed download or a wrong hash leaves ``dest`` untouched (no partial file is ever seen).

    Args:
        url: any URL urllib opens (https://, file://).  dest: the final path.
        sha256: the expected hex digest of the bytes.
    Returns:
        ``dest``.
    """
    dest = Path(dest)
    try:
        with atomic_write(dest) as f, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, f)
            f.flush()
            check_sha256(Path(f.name), sha256, source=f"the download from {url}")
    except OSError as e:  # urllib.error.URLError is an OSError
        raise DataError(f"could not download {url}: {e}. {_where_to_put()}") from e
    return dest


def find_text(path: str | os.PathLike | None = None) -> Path:
    """The text file to train on, by the order in the module docstring (may download).

    Args:
        path: an explicit UTF-8 text file, or None / "" for tiny-shakespeare.
    Returns:
        the path of an existing file; tiny-shakespeare copies are checked against the sha256.
    """
    explicit = path or os.environ.get(DATA_ENV)
    if explicit:
        explicit = Path(explicit).expanduser()
        if not explicit.is_file():
            source = "--data" if path else DATA_ENV
            raise DataError(f"{source} points to {explicit}, which is not a file.")
        return explicit
    for candidate in (CACHE_PATH, SHARED_COPY):
        if candidate.is_file():
            check_sha256(candidate, TINY_SHAKESPEARE_SHA256, source=str(candidate))
            return candidate
    print(f"rwkv_ref: downloading tiny-shakespeare from {TINY_SHAKESPEARE_URL} to {CACHE_PATH}")
    return download(TINY_SHAKESPEARE_URL, CACHE_PATH)


@dataclass
class TextData:
    """A text as character tokens: the tokenizer and the two splits of token ids."""

    tokenizer: object  # rwkv_ref.tokenizer.CharTokenizer
    train: Tensor      # (N_train,) int64
    val: Tensor        # (N_val,) int64
    path: Path         # where the text was read from


def load_data(path: str | os.PathLike | None = None) -> TextData:
    """Read the text, build the character tokenizer over all of it, and split it 90/10.

    Args:
        path: an explicit UTF-8 text file, or None for tiny-shakespeare (see ``find_text``).
    Returns:
        ``TextData``; for tiny-shakespeare 65 symbols, 1,003,854 train and 111,540 val tokens.
    """
    from rwkv_ref.tokenizer import CharTokenizer

    source = find_text(path)
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{source} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                        f"{e.start}); convert it (e.g. iconv -t UTF-8) or pass another "
                        f"--data") from None
    if not text:
        raise DataError(f"{source} is empty; pass a text file with --data=PATH")
    tokenizer = CharTokenizer(text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)   # (N,)
    n_train = int(TRAIN_FRACTION * len(ids))
    return TextData(tokenizer, ids[:n_train], ids[n_train:], source)


def check_length(data: TextData, ctx_len: int) -> None:
    """``DataError`` unless both splits hold a window of ``ctx_len + 1`` tokens.

    The validation split is the last tenth, so the text needs about ``10 * (ctx_len + 1)``
    characters.
    """
    for split, ids in (("training", data.train), ("validation", data.val)):
        if len(ids) <= ctx_len:
            total = len(data.train) + len(data.val)
            need = 10 * ctx_len
            while need - int(TRAIN_FRACTION * need) <= ctx_len:   # the split load_data makes
                need += 1
            raise DataError(f"{data.path} has {total:,} characters: its {split} split "
                            f"({len(ids):,}) is shorter than ctx_len + 1 = {ctx_len + 1}; "
                            f"use a text of at least {need:,} characters or a smaller "
                            f"--ctx_len")


def get_batch(ids: Tensor, batch_size: int, ctx_len: int, generator: torch.Generator):
    """Random windows of ``ctx_len + 1`` tokens: inputs and the next-token targets.

    Args:
        ids: (N,) int64 token ids of one split.  batch_size: B.  ctx_len: T.
        generator: the seeded ``torch.Generator`` that picks the window starts (on the CPU).
    Returns:
        x, y: (B, T) int64, with ``y[:, t] = x[:, t + 1]`` shifted by one along the text.
    """
    if len(ids) <= ctx_len:
        raise ValueError(f"get_batch: the split has {len(ids)} tokens, need more than "
                         f"ctx_len = {ctx_len}")
    starts = torch.randint(len(ids) - ctx_len, (batch_size,), generator=generator)  # (B,)
    windows = ids[starts[:, None] + torch.arange(ctx_len + 1)]                       # (B, T+1)
    return windows[:, :-1], windows[:, 1:]
