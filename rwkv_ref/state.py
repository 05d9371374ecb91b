"""The recurrent state of an RWKV-4 model: what RNN mode carries from one token to the next.

Per layer, three things (never more, whatever the sequence length: the paper's constant cost):

=========  ============  =================================================================
name       shape         what it is
=========  ============  =================================================================
``att_x``  (B, C)        the LayerNorm-ed input of time mixing at the last token (token shift)
``wkv``    3 x (B, A)    the WKV sums ``num = a e^p``, ``den = b e^p`` (``rwkv_ref.WKVState``)
``ffn_x``  (B, C)        the LayerNorm-ed input of channel mixing at the last token
=========  ============  =================================================================

C is ``n_embd``, A is ``dim_att``. ``att_x`` and ``ffn_x`` keep the activations' dtype; the
WKV sums are float32 (float64 for a float64 model). Every method returns a new state: nothing
here modifies a state in place, so one state can seed any number of continuations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

# The empty state's exponent: "minus infinity" kept finite so that no inf - inf ever appears.
EMPTY_P = -1e38


class WKVState(NamedTuple):
    """The WKV state of one layer: ``num = a * exp(p)``, ``den = b * exp(p)``; each (B, C).

    ``p`` is the largest exponent among the terms of ``num`` and ``den``; the empty state is
    ``a = b = 0``, ``p = EMPTY_P``. States are in float32, or float64 for float64 inputs.
    """

    a: Tensor  # (B, C) numerator / e^p
    b: Tensor  # (B, C) denominator / e^p
    p: Tensor  # (B, C) running maximum exponent

    @classmethod
    def empty(cls, batch: int, channels: int, dtype=torch.float32, device=None) -> "WKVState":
        """The state before the first token: nothing seen yet."""
        zeros = torch.zeros(batch, channels, dtype=dtype, device=device)
        return cls(zeros, zeros.clone(), torch.full_like(zeros, EMPTY_P))

    def to(self, *args, **kwargs) -> "WKVState":
        """Move or cast all three tensors (same arguments as ``Tensor.to``)."""
        return WKVState(*(t.to(*args, **kwargs) for t in self))

    def decay(self, amount: Tensor | float) -> "WKVState":
        """The state with every term multiplied by ``exp(-amount)``: the exponent minus
        ``amount`` (``amount = w`` ages the state by one token, ``n * w`` by n tokens)."""
        return WKVState(self.a, self.b, self.p - amount)


def merge(x: WKVState, y: WKVState) -> WKVState:
    """The sum of two scaled sums, ``x ⊕ y``: (a1 e^{p1} + a2 e^{p2}), rebased on the larger
    exponent. Associative, with the empty state as identity (the WKV state is a monoid).

    Args/Returns: ``WKVState``s of matching shapes.
    """
    p = torch.maximum(x.p, y.p)
    sx, sy = torch.exp(x.p - p), torch.exp(y.p - p)
    return WKVState(sx * x.a + sy * y.a, sx * x.b + sy * y.b, p)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the WKV sums are computed and kept in: float64 stays float64; float32, bf16
    and fp16 are computed in float32. The one place this rule is written."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class LayerState:
    """The state of one block: the two token-shift inputs and the WKV sums."""

    att_x: Tensor   # (B, C) ln1(x) of the last token
    wkv: WKVState   # (B, A) each of a, b, p
    ffn_x: Tensor   # (B, C) ln2(x) of the last token

    def tensors(self) -> tuple[Tensor, ...]:
        """The five tensors in a fixed order: att_x, wkv.a, wkv.b, wkv.p, ffn_x."""
        return (self.att_x, *self.wkv, self.ffn_x)

    @classmethod
    def from_tensors(cls, att_x, a, b, p, ffn_x) -> "LayerState":
        """Inverse of ``tensors``."""
        return cls(att_x, WKVState(a, b, p), ffn_x)

    def map(self, fn) -> "LayerState":
        """A new ``LayerState`` with ``fn`` applied to each of the five tensors."""
        return LayerState.from_tensors(*(fn(t) for t in self.tensors()))


@dataclass(frozen=True)
class RWKVState:
    """The state of a whole model: one ``LayerState`` per block, all with batch size B."""

    layers: tuple[LayerState, ...]

    @classmethod
    def empty(cls, n_layer: int, n_embd: int, dim_att: int, batch: int,
              dtype: torch.dtype = torch.float32, device=None) -> "RWKVState":
        """The state before the first token: zero shifts and empty WKV sums.

        Args:
            n_layer, n_embd, dim_att: the model's sizes (see ``RWKVConfig``).
            batch: B.  dtype: dtype of the shifts (WKV sums are float32, or float64 for
            float64).  device: where the tensors live.
        Returns:
            An ``RWKVState`` of ``n_layer`` layers.
        """
        layers = []
        for _ in range(n_layer):
            zeros = torch.zeros(batch, n_embd, dtype=dtype, device=device)
            wkv = WKVState.empty(batch, dim_att, dtype=compute_dtype(dtype), device=device)
            layers.append(LayerState(zeros, wkv, zeros.clone()))
        return cls(tuple(layers))

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    @property
    def batch_size(self) -> int:
        return self.layers[0].att_x.shape[0]

    def _map(self, fn) -> "RWKVState":
        return RWKVState(tuple(layer.map(fn) for layer in self.layers))

    def clone(self) -> "RWKVState":
        """A deep copy (new storage for every tensor)."""
        return self._map(lambda t: t.clone())

    def detach(self) -> "RWKVState":
        """The same values cut from the autograd graph (truncated backprop through time)."""
        return self._map(lambda t: t.detach())

    def to(self, device=None, dtype: torch.dtype | None = None) -> "RWKVState":
        """Move to ``device``; ``dtype`` casts the shifts only (the WKV sums stay float32/64).

        Args:
            device: target device or None.  dtype: target dtype of ``att_x``/``ffn_x`` or None.
        Returns:
            A new ``RWKVState``.
        """
        def move(layer: LayerState) -> LayerState:
            att_x, ffn_x = (t.to(device=device, dtype=dtype) for t in (layer.att_x, layer.ffn_x))
            return LayerState(att_x, layer.wkv.to(device=device), ffn_x)

        return RWKVState(tuple(move(layer) for layer in self.layers))

    def select(self, rows) -> "RWKVState":
        """The states of some batch rows: ``rows`` is an int, a slice, a list or an index tensor.

        Returns:
            An ``RWKVState`` with batch size ``len(rows)`` (1 for an int: the row is kept).
        """
        if isinstance(rows, int):
            rows = [rows]
        return self._map(lambda t: t[rows])

    def split(self) -> list["RWKVState"]:
        """One state of batch size 1 per row (the inverse of ``cat``)."""
        return [self.select(i) for i in range(self.batch_size)]

    @staticmethod
    def cat(states: Sequence["RWKVState"]) -> "RWKVState":
        """Join states along the batch: batch sizes add up (stacking batch-1 states is a cat).

        Args:
            states: states of the same model (same layer count and widths).
        Returns:
            One ``RWKVState`` whose rows are those of ``states`` in order.
        """
        if not states:
            raise ValueError("RWKVState.cat: no states given")
        if len({s.n_layer for s in states}) > 1:
            raise ValueError(f"RWKVState.cat: layer counts differ: {[s.n_layer for s in states]}")
        layers = []
        for per_layer in zip(*(s.layers for s in states)):
            columns = zip(*(layer.tensors() for layer in per_layer))   # 5 groups of tensors
            layers.append(LayerState.from_tensors(*(torch.cat(c, dim=0) for c in columns)))
        return RWKVState(tuple(layers))

    stack = cat
