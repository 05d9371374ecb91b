"""The official RWKV-4 169M Pile weights and GPT-NeoX's tokenizer: named once, fetched on request.

``python -m rwkv_ref.pretrained --out=models`` fetches the two files of ``REMOTES`` (about
340 MB); nothing else in rwkv_ref touches the network. A download streams into a temporary file
beside its destination and is renamed into place only after its checks: its length
(``Remote.size`` where known, else the server's Content-Length), then its structure (the
checkpoint loads with ``weights_only=True`` and has the 169M sizes; the tokenizer parses, has
50,277 tokens and encodes ``HELLO`` as ``HELLO_IDS``). A failure is one line
(``DownloadProblem``) and leaves nothing behind.

Trust on first use: no checksum of these files is published that we could check offline, so the
sha256 of what arrived is printed and recorded as ``<file>.sha256`` (``sha256sum -c`` reads it);
``verify`` (and so ``load``) refuses a file that no longer matches its record. A file put there
by hand is recorded the first time it is verified.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import os
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from rwkv_ref.convert import from_blinkdl, infer_config
from rwkv_ref.files import FileProblem, atomic_write, remove_stale_temporaries
from rwkv_ref.tokenizer import NeoXTokenizer

ENV_VAR = "RWKV_REF_MODELS"
COMMAND = "python -m rwkv_ref.pretrained --out=models"
CHUNK = 1 << 20                 # bytes read per step of the download
TIMEOUT_S = 60
EXPECTED_CONFIG = {"n_layer": 12, "n_embd": 768, "vocab_size": 50277}
TOKENIZER_VOCAB = 50277
HELLO = "Hello my name is"
# "Hello", "Ġmy", "Ġname", "Ġis": their entries in the vocabulary of BlinkDL/RWKV-LM's
# RWKV-v4/20B_tokenizer.json, read there by eye (Ġ is the byte-level space)
HELLO_IDS = [12092, 619, 1416, 310]


class DownloadProblem(FileProblem):
    """A download failed, or what arrived is not the file it should be (nothing was kept)."""


@dataclass(frozen=True)
class Remote:
    name: str                   # the file's name, locally and at the source
    url: str
    size: int | None            # bytes, where known (None: trust Content-Length)
    check: Callable[[Path], None]   # raises ValueError naming what is wrong with the file


def check_checkpoint(path: Path) -> None:
    """``ValueError`` unless ``path`` is an RWKV-4 state dict of ``EXPECTED_CONFIG``'s sizes."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle and torch errors of every kind
        raise ValueError(f"it does not load as a torch file ({type(e).__name__}): "
                         "truncated, or not a checkpoint") from None
    if not isinstance(state_dict, dict):
        raise ValueError(f"it holds a {type(state_dict).__name__}, not a state dict")
    config = infer_config(state_dict)              # ValueError names foreign keys
    got = {k: getattr(config, k) for k in EXPECTED_CONFIG}
    if got != EXPECTED_CONFIG:
        raise ValueError(f"its sizes are {got}, not the 169M model's {EXPECTED_CONFIG}")


def check_tokenizer(path: Path) -> None:
    """``ValueError`` unless ``path`` is GPT-NeoX's tokenizer (size, ``HELLO``, round trip)."""
    try:
        tokenizer = NeoXTokenizer(path)
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions for bad files
        raise ValueError(f"it does not parse as a tokenizer file ({type(e).__name__})") from None
    if tokenizer.vocab_size != TOKENIZER_VOCAB:
        raise ValueError(f"it has {tokenizer.vocab_size} tokens, not {TOKENIZER_VOCAB}")
    ids = tokenizer.encode(HELLO)
    if ids != HELLO_IDS or tokenizer.decode(ids) != HELLO:
        raise ValueError(f"it encodes {HELLO!r} as {ids}, not {HELLO_IDS}")


WEIGHTS = "RWKV-4-Pile-169M-20220807-8023.pth"
TOKENIZER = "20B_tokenizer.json"
REMOTES = {
    WEIGHTS: Remote(WEIGHTS, f"https://huggingface.co/BlinkDL/rwkv-4-pile-169m/resolve/main/"
                             f"{WEIGHTS}", None, check_checkpoint),
    TOKENIZER: Remote(TOKENIZER, "https://raw.githubusercontent.com/BlinkDL/RWKV-LM/main/"
                                 f"RWKV-v4/{TOKENIZER}", None, check_tokenizer),
}


def default_dir() -> Path:
    """``$RWKV_REF_MODELS`` if set, else ``models/`` at the root of this checkout (the working
    directory's ``models/`` when rwkv_ref is installed rather than checked out)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    root = Path(__file__).resolve().parents[1]
    return root / "models" if (root / "pyproject.toml").is_file() else Path("models")


def paths(directory=None) -> tuple[Path, Path]:
    """(checkpoint, tokenizer) paths in ``directory`` (default ``default_dir()``)."""
    directory = Path(directory) if directory is not None else default_dir()
    return directory / WEIGHTS, directory / TOKENIZER


def available(directory=None) -> bool:
    """Whether both files are in ``directory`` (not yet verified)."""
    return all(p.is_file() for p in paths(directory))


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _record(path: Path, digest: str) -> None:
    """Write ``<path>.sha256`` in ``sha256sum``'s format (``sha256sum -c`` reads it)."""
    with atomic_write(f"{path}.sha256") as f:
        f.write(f"{digest}  {path.name}\n".encode())


def verify(path) -> str:
    """The sha256 of ``path``, checked against ``<path>.sha256`` (recorded now if absent).

    Raises:
        FileProblem: the file is missing, or differs from the record made at its download.
    """
    path = Path(path)
    if not path.is_file():
        raise FileProblem(f"{path.name} is not in {path.parent}; fetch it with: {COMMAND}")
    digest, record = sha256_of(path), Path(f"{path}.sha256")
    if not record.is_file():
        with contextlib.suppress(OSError):         # a read-only folder: nothing to record in
            _record(path, digest)                  # trust on first use
        return digest
    recorded = (record.read_text().split() or [""])[0]
    if digest != recorded:
        raise FileProblem(f"{path} has sha256 {digest[:16]}..., but {record.name} recorded "
                          f"{recorded[:16]}... at download: the file changed; fetch it again "
                          f"with: {COMMAND}")
    return digest


def _stream(remote: Remote, out, progress: bool) -> str:
    """Copy ``remote.url`` into the open file ``out``; return the sha256 of the bytes."""
    digest, got, expected = hashlib.sha256(), 0, remote.size
    try:
        with urllib.request.urlopen(remote.url, timeout=TIMEOUT_S) as response:
            announced = response.headers.get("Content-Length")
            expected = expected or (int(announced) if announced else None)
            # disable=None: no bar unless stderr is a terminal (not in logs or tests)
            with tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=remote.name, disable=None if progress else True) as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
    except (OSError, ValueError, http.client.HTTPException) as e:   # URLError is an OSError
        raise DownloadProblem(f"the download of {remote.url} failed ({type(e).__name__}: {e});"
                              " nothing was kept; check the network and the disk, then run "
                              "the command again") from None
    if expected is not None and got != expected:
        raise DownloadProblem(f"{remote.name}: got {got:,d} of {expected:,d} bytes from "
                              f"{remote.url} (truncated or the wrong file); nothing was kept")
    return digest.hexdigest()


def download(name: str, dest_dir, progress: bool = True) -> Path:
    """Fetch ``REMOTES[name]`` into ``dest_dir``, check it, record its sha256.

    Returns:
        The file's path (written only if every check passed; else ``DownloadProblem``).
    """
    if name not in REMOTES:
        raise DownloadProblem(f"unknown file {name!r}; the files are {', '.join(REMOTES)}")
    remote, dest = REMOTES[name], Path(dest_dir) / name
    remove_stale_temporaries(dest)                 # left by a download that was killed
    with atomic_write(dest) as f:
        digest = _stream(remote, f, progress)
        f.flush()
        try:
            remote.check(Path(f.name))
        except ValueError as e:
            raise DownloadProblem(f"{name} from {remote.url} is not the expected file: {e}; "
                                  "nothing was kept") from None
    _record(dest, digest)
    print(f"{dest.name}: {dest.stat().st_size:,d} bytes, sha256 {digest} "
          f"(recorded in {dest.name}.sha256)")
    return dest


def check_present(path) -> str:
    """Check a file already in place (put there by hand, say) as a download would be, then
    ``verify`` it; returns its sha256. ``FileProblem`` naming what is wrong."""
    path = Path(path)
    try:
        REMOTES[path.name].check(path)             # KeyError: not one of the files
    except (KeyError, ValueError) as e:
        raise FileProblem(f"{path} is not the expected file: {e}; delete it and fetch it "
                          f"with: {COMMAND}") from None
    return verify(path)


def load(directory=None, dtype: torch.dtype = torch.float32, **config_overrides):
    """The 169M model and its tokenizer, both files first checked by ``verify``.

    Returns:
        (``RWKV`` on the CPU, ``NeoXTokenizer``).
    """
    weights, tokenizer = paths(directory)
    for path in (weights, tokenizer):
        verify(path)
    return from_blinkdl(weights, dtype, **config_overrides), NeoXTokenizer(tokenizer)


def main(argv=None) -> int:
    """The command line: fetch the files not yet in ``--out``; one line and exit 2 on failure."""
    # imported here, for the command line only: config sits above this module
    from rwkv_ref.config import run_command

    def body(rest):
        parser = argparse.ArgumentParser(prog="python -m rwkv_ref.pretrained",
                                         description=__doc__.split("\n")[0])
        parser.add_argument("--out", default=str(default_dir()), help="folder for the files")
        args = parser.parse_args(rest)
        for name in REMOTES:
            path = Path(args.out) / name
            if path.is_file():
                print(f"{name}: already there, checked, sha256 {check_present(path)}")
            else:
                download(name, args.out)
        return 0

    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command("rwkv_ref.pretrained", body, argv, status={ImportError: 2})


if __name__ == "__main__":
    sys.exit(main())
