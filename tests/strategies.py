"""Hypothesis strategies shared by the tests: they draw VALUES, so a failure shrinks.

Every tensor is drawn element by element as a small integer on a grid (``grid``): one byte per
element in hypothesis's choice sequence, so thousands of elements fit in one example, and a
failing example shrinks towards zeros, short sequences and narrow widths. Nothing here draws
a seed for a random generator, except ``weight_seeds`` for model weights (a model has
thousands of parameters; the config, the tokens and the state are values).

Widths reach past the compiled kernels' SIMD blocks: the cpp WKV kernel works on 32-channel
blocks (C = 33..70 has one or two full blocks and a tail), the rnn kernel's main loops on 8-
and 16-wide rows (n_embd 33..40 runs them and a tail).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rwkv_ref import RWKVConfig
from rwkv_ref.state import EMPTY_P, WKVState

F64 = torch.float64

# Channel counts: narrow ones (shrink targets) and those around the 32-wide blocks.
channels = st.one_of(st.integers(1, 8), st.integers(30, 70))


def grid(shape, lo: float, hi: float, steps: int = 100):
    """A float64 tensor of ``shape`` with every element drawn from ``lo + j (hi - lo)/steps``.

    Args:
        shape: tuple of ints.  lo, hi: the range.  steps: grid points - 1 (at most 255).
    Returns:
        A strategy of (shape) float64 tensors; each element shrinks to the grid point
        nearest 0 (the element strategy's simplest value, 0, is mapped there).
    """
    zero = int(round(-lo / (hi - lo) * steps)) if lo < 0 < hi else 0
    ints = hnp.arrays(np.int16, shape, elements=st.integers(-zero, steps - zero),
                      fill=st.nothing())                   # every element drawn, none repeated
    step = (hi - lo) / steps
    return ints.map(lambda j: torch.from_numpy(np.asarray(lo + (j.astype(np.float64) + zero) * step)))


@dataclass
class WKVProblem:
    """One WKV call: w, u (C,), k, v (B, T, C) and the state before (None: empty), float64."""

    w: torch.Tensor
    u: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    state: WKVState | None

    @property
    def shape(self):
        return tuple(self.k.shape)

    def args(self, dtype=F64):
        """(w, u, k, v, state) cast to ``dtype`` (the state stays in its compute dtype)."""
        state = None if self.state is None else self.state.to(
            F64 if dtype == F64 else torch.float32)
        return (*(x.to(dtype) for x in (self.w, self.u, self.k, self.v)), state)

    def rounded(self, dtype):
        """The same problem with every value rounded to ``dtype`` (kept in float64), so that a
        float64 reference sees exactly what a ``dtype`` computation is handed."""
        w, u, k, v, state = self.args(dtype)
        state = None if state is None else state.to(F64)
        return WKVProblem(*(x.to(F64) for x in (w, u, k, v)), state)


@st.composite
def wkv_states(draw, B: int, C: int, p_max: float = 10.0):
    """An incoming state: empty (None) or drawn (a, b, p) with b > 0, a/b a value in [-5, 5]
    and |p| <= p_max (not necessarily canonical: b may be below 1)."""
    if draw(st.booleans()):
        return None
    b = draw(grid((B, C), 0.0, 10.0, 100)) + 0.05              # (B, C), > 0
    ratio = draw(grid((B, C), -5.0, 5.0, 100))
    p = draw(grid((B, C), -p_max, p_max, 100))
    return WKVState(ratio * b, b, p)


@st.composite
def wkv_problems(draw, key_max: float = 5.0, max_elements: int = 1500, channels=channels,
                 with_state: bool = True):
    """A whole WKV problem, values drawn.

    Args:
        key_max: |k| and |u| are at most this (300 for the extreme-key tests).
        max_elements: B * T * C is kept under this (T is drawn last, at least 1).
        channels: strategy for C.  with_state: draw an incoming state (else None).
    Returns:
        A ``WKVProblem``: time_decay on a grid in [-6, 4] (w = e^time_decay from 0.0025 to
        55), v in [-5, 5].
    """
    C = draw(channels, label="C")
    B = draw(st.integers(1, 2), label="B")
    T = draw(st.integers(1, max(1, min(40, max_elements // (B * C)))), label="T")
    w = draw(grid((C,), -6.0, 4.0, 100)).exp()
    u = draw(grid((C,), -key_max, key_max, 200))
    k = draw(grid((B, T, C), -key_max, key_max, 200))
    v = draw(grid((B, T, C), -5.0, 5.0, 100))
    state = draw(wkv_states(B, C, p_max=max(10.0, key_max))) if with_state else None
    return WKVProblem(w, u, k, v, state)


def empty_like(problem: WKVProblem) -> WKVState:
    """The empty state for a problem's (B, C), float64."""
    B, _, C = problem.shape
    return WKVState(torch.zeros(B, C, dtype=F64), torch.zeros(B, C, dtype=F64),
                    torch.full((B, C), EMPTY_P, dtype=F64))


# ----------------------------------------------------------------------------- models


@st.composite
def configs(draw, impl: str = "parallel", wide: bool = True):
    """Random model shapes: narrow ones and (``wide``) n_embd 33..40, past the rnn kernel's
    SIMD main loops; dim_att and dim_ffn free."""
    narrow = st.integers(1, 12)
    n_embd = draw(st.one_of(narrow, st.integers(33, 40)) if wide else narrow, label="n_embd")
    dim_att = draw(st.one_of(narrow, st.integers(33, 40)) if wide else narrow, label="dim_att")
    return RWKVConfig(vocab_size=draw(st.integers(2, 30)), n_layer=draw(st.integers(1, 3)),
                      n_embd=n_embd, dim_att=dim_att, dim_ffn=draw(st.integers(1, 72)),
                      wkv_impl=impl)


def token_ids(vocab_size: int, batch: int, length: int):
    """(batch, length) int64 token ids in [0, vocab_size), drawn as values."""
    ids = hnp.arrays(np.int64, (batch, length), elements=st.integers(0, vocab_size - 1),
                     fill=st.nothing())
    return ids.map(torch.from_numpy)


# The weights of a random model: a seed for ``rwkv_ref.testing.random_model`` (see above).
weight_seeds = st.integers(0, 2**16)


@st.composite
def models_and_tokens(draw, batch=(1, 3), length=(1, 12), impl: str = "parallel"):
    """(config, weight seed, idx (B, T) token ids) for a random model and its input."""
    cfg = draw(configs(impl), label="config")
    B = draw(st.integers(*batch), label="B")
    T = draw(st.integers(*length), label="T")
    return cfg, draw(weight_seeds, label="weight seed"), draw(token_ids(cfg.vocab_size, B, T))


# ----------------------------------------------------------------------------- WKV variants


def wkv_variants(stable_only: bool = False) -> list:
    """Every registered WKV variant as a pytest parameter: ``rwkv_ref.WKV_IMPLS`` (a variant
    registered later is covered without editing any test), "cuda" skipped where there is no
    GPU, saying so. Never filtered by whether a kernel builds: a build failure fails.

    Args:
        stable_only: leave out "naive" (eq. 14 as written overflows by design for large k).
    """
    import pytest

    from rwkv_ref import WKV_IMPLS

    params = []
    for name in WKV_IMPLS:
        if stable_only and name == "naive":
            continue
        if name == "cuda" and not torch.cuda.is_available():
            params.append(pytest.param(name, marks=pytest.mark.skip(
                reason="cuda: no GPU on this machine")))
        else:
            params.append(name)
    return params


def runnable_variants() -> list[str]:
    """The names of ``wkv_variants`` that run here (all but a GPU-less "cuda")."""
    from rwkv_ref import WKV_IMPLS

    return [n for n in WKV_IMPLS if n != "cuda" or torch.cuda.is_available()]
