"""Hypothesis strategies for the grader's inputs, and their compact printing.

Every tensor is drawn value by value (``floats`` in a range), so that hypothesis shrinks a
failing input towards small sizes and simple numbers. Models are the exception: their weights
come from ``random_model(config, seed)`` with a drawn config and seed, printed as that call.
"""
from __future__ import annotations

import functools
import math

import torch
from hypothesis import strategies as st
from torch import Tensor

from rwkv_ref.model import RWKVConfig
from rwkv_ref.state import LayerState, RWKVState
from rwkv_ref.wkv import EMPTY_P, WKVState

from rwkv_ref.testing import random_model

F64 = torch.float64


@st.composite
def tensors(draw, shape, lo: float, hi: float, dtype=F64) -> Tensor:
    """A tensor of ``shape`` with every entry drawn from [lo, hi]."""
    n = math.prod(shape)
    values = draw(st.lists(st.floats(lo, hi, allow_nan=False, allow_infinity=False),
                           min_size=n, max_size=n))
    return torch.tensor(values, dtype=dtype).reshape(shape)


@st.composite
def decay_rates(draw, C: int) -> Tensor:
    """w (C,) > 0, from slow (e^-4 ≈ 0.02) to fast (e^2 ≈ 7.4) decay."""
    return draw(tensors((C,), -4.0, 2.0)).exp()


# A common shift of every exponent: the WKV outputs do not change, but plain exponentials
# overflow (e^800) or vanish (e^-800) in float64. Shrinks to no shift.
offsets = st.one_of(st.just(0.0), st.sampled_from([800.0, -800.0, 100.0]), st.floats(-800, 800))


@st.composite
def wkv_states(draw, B: int, C: int, offset: float = 0.0, may_be_empty: bool = True) -> WKVState:
    """Either the empty state or a canonical-looking one: b in [1, 4] (the largest term counts
    1), a = b times a mean value in [-3, 3], p in [-30, 30] plus ``offset``."""
    if may_be_empty and draw(st.booleans()):
        return WKVState.empty(B, C, dtype=F64)
    b = draw(tensors((B, C), 1.0, 4.0))
    a = b * draw(tensors((B, C), -3.0, 3.0))
    p = draw(tensors((B, C), -30.0, 30.0)) + offset
    return WKVState(a, b, p)


@st.composite
def wkv_sizes(draw, max_T: int = 6):
    """(B, T, C) small enough for Python loops and a readable counterexample."""
    return draw(st.integers(1, 2)), draw(st.integers(1, max_T)), draw(st.integers(1, 3))


@st.composite
def wkv_inputs(draw, max_T: int = 6, k_range: float = 30.0, offset: float = 0.0):
    """w, u (C,), k, v (B, T, C): u and k in [-k_range, k_range] (k plus ``offset``),
    v in [-3, 3]."""
    B, T, C = draw(wkv_sizes(max_T))
    w = draw(decay_rates(C))
    u = draw(tensors((C,), -k_range, k_range))
    k = draw(tensors((B, T, C), -k_range, k_range)) + offset
    v = draw(tensors((B, T, C), -3.0, 3.0))
    return w, u, k, v


class Described:
    """A value shown in a counterexample by the expression that rebuilds it."""

    def __init__(self, value, text: str):
        self.value, self.text = value, text

    def __repr__(self) -> str:
        return self.text


# (vocab_size, n_layer, n_embd, dim_att, dim_ffn): small, two layers, dim_att != n_embd,
# dim_ffn below and above n_embd. n_embd >= 3: a LayerNorm of 2 channels outputs little more
# than a sign, which would hide mistakes. Few configs and seeds, so that models are cached.
MODEL_SIZES = [(3, 1, 3, 3, 4), (5, 2, 3, 2, 2), (4, 2, 4, 5, 7), (6, 1, 4, 1, 16)]


@functools.lru_cache(maxsize=None)
def _model(V: int, L: int, C: int, A: int, F: int, seed: int):
    config = RWKVConfig(vocab_size=V, n_layer=L, n_embd=C, dim_att=A, dim_ffn=F,
                        wkv_impl="logspace")
    return random_model(config, seed=seed, dtype=F64).eval()


@st.composite
def models(draw) -> Described:
    """A float64 ``random_model`` of one of ``MODEL_SIZES`` (WKV by ``logspace``)."""
    V, L, C, A, F = draw(st.sampled_from(MODEL_SIZES))
    seed = draw(st.integers(0, 4))
    config = (f"RWKVConfig(vocab_size={V}, n_layer={L}, n_embd={C}, dim_att={A}, "
              f"dim_ffn={F}, wkv_impl='logspace')")
    return Described(_model(V, L, C, A, F, seed),
                     f"random_model({config}, seed={seed}, dtype=torch.float64)")


# ----------------------------------------------------------------------------- printing


def _number(x: float) -> str:
    if x == EMPTY_P:
        return "EMPTY_P"
    return f"{x:.4g}"


def _nested(values) -> str:
    if isinstance(values, list):
        return "[" + ", ".join(_nested(v) for v in values) + "]"
    return _number(values)


def show(value, limit: int = 24) -> str:
    """A compact one-line text of a counterexample's value: numbers to 4 digits, tensors as
    nested lists (or their shape and first entries when large), states by field."""
    if isinstance(value, Tensor):
        if value.numel() <= limit:
            return _nested(value.tolist())
        head = ", ".join(_number(x) for x in value.flatten()[:6].tolist())
        return f"<{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}: {head}, ...>"
    if isinstance(value, WKVState):
        return "WKVState(" + ", ".join(f"{n}={show(t, limit)}" for n, t in
                                       zip(value._fields, value)) + ")"
    if isinstance(value, LayerState):
        return (f"LayerState(att_x={show(value.att_x, limit)}, wkv={show(value.wkv, limit)}, "
                f"ffn_x={show(value.ffn_x, limit)})")
    if isinstance(value, RWKVState):
        return f"RWKVState({len(value.layers)} layers: " + \
            ", ".join(show(layer, limit) for layer in value.layers) + ")"
    return repr(value)


def show_case(case: dict) -> str:
    """``name=value, ...`` for a drawn case (the arguments of the student's function)."""
    return ", ".join(f"{name}={show(value)}" for name, value in case.items())


def clone(value):
    """A copy of a case's value whose tensors the caller may change (modules are shared)."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, WKVState):
        return WKVState(*(t.clone() for t in value))
    if isinstance(value, LayerState):
        return value.map(torch.clone)
    if isinstance(value, RWKVState):
        return value.clone()
    if isinstance(value, Described):
        return clone(value.value)
    return value
