"""Tokenizers: characters for tiny-shakespeare, GPT-NeoX BPE for the official Pile models.

Both have ``encode(text) -> list[int]``, ``decode(ids) -> str`` and ``vocab_size``.
"""
from __future__ import annotations

import os

import torch


def _as_id_list(ids) -> list[int]:
    """A list of ints from a list, a tuple or a 1-D integer tensor."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)) or any(isinstance(i, list) for i in ids):
        raise ValueError("decode takes one sequence of token ids (a list or a 1-D tensor)")
    return [int(i) for i in ids]


class CharTokenizer:
    """One token per distinct character of a text, ids in sorted character order.

    Saved inside training checkpoints with ``to_dict`` and restored with ``from_dict``.
    """

    def __init__(self, text: str):
        chars = sorted(set(text))
        if not chars:
            raise ValueError("CharTokenizer: the text is empty, there are no characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; ``ValueError`` naming any character not in the vocabulary."""
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise ValueError(f"CharTokenizer: characters not in the vocabulary: {unknown}")
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        """The text of token ids (a list or 1-D tensor); ``ValueError`` for ids out of range."""
        ids = _as_id_list(ids)
        bad = [i for i in ids if not 0 <= i < len(self.chars)]
        if bad:
            raise ValueError(f"CharTokenizer: ids out of range [0, {len(self.chars)}): {bad[:10]}")
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        """A plain dict (safe for ``torch.load(weights_only=True)``)."""
        return {"type": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        """Inverse of ``to_dict``."""
        if not isinstance(d, dict) or d.get("type") != "char" or "chars" not in d:
            raise ValueError(f"not a CharTokenizer dict (need type 'char' and 'chars'): {d!r:.80}")
        tok = cls(d["chars"])
        if "".join(tok.chars) != d["chars"]:
            raise ValueError("CharTokenizer dict: 'chars' must be sorted distinct characters")
        return tok

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class NeoXTokenizer:
    """The GPT-NeoX 20B BPE tokenizer of the RWKV-4 Pile models, from its ``20B_tokenizer.json``.

    The file is never downloaded: pass the path of a local copy.
    """

    def __init__(self, path):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError("NeoXTokenizer needs the tokenizers package: "
                              "pip install tokenizers") from e
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path} (the RWKV-4 Pile models "
                                    "use GPT-NeoX's 20B_tokenizer.json; pass a local copy)")
        self.path = str(path)
        self.tokenizer = Tokenizer.from_file(self.path)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(_as_id_list(ids))

    def __repr__(self) -> str:
        return f"NeoXTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def tokenizer_from_dict(d: dict):
    """The tokenizer stored in a checkpoint (``CharTokenizer.to_dict()``)."""
    if isinstance(d, dict) and d.get("type") == "char":
        return CharTokenizer.from_dict(d)
    raise ValueError(f"unknown tokenizer in checkpoint (expected type 'char'): {d!r:.80}")


def check_token_ids(idx, vocab_size: int, name: str, shape: str) -> None:
    """Raise ``ValueError`` unless idx is a non-empty integer tensor of the given shape
    (``"(B, T)"`` or ``"(B,)"``) with every id in [0, vocab_size).

    While ``torch.compile`` traces, the range of the ids is not checked (reading values would
    break the graph); type, dtype and shape are. Eager calls check everything.

    Args:
        idx: the token ids.  vocab_size: V.  name: the argument's name, for the message.
        shape: the expected shape, as written in the message.
    """
    if not isinstance(idx, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(idx).__name__}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {idx.dtype}")
    if idx.dim() != len(shape.strip("(,)").split(",")) or idx.numel() == 0:
        raise ValueError(f"{name} must have shape {shape} and be non-empty, "
                         f"got {tuple(idx.shape)}")
    if torch.compiler.is_compiling():
        return
    lo, hi = (int(t) for t in torch.aminmax(idx))
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name}: token ids must lie in [0, {vocab_size}) "
                         f"(vocab_size), got min {lo} and max {hi}")
