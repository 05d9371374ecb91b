"""WKV as a parallel prefix scan: every state of a sequence in ceil(log2 T) rounds of ⊕.

The merge ⊕ of two scaled states (``rwkv_ref.state.merge``) is associative and has the empty
state as identity. A run of tokens s..e-1 is summarised by the state it leaves behind, with
every exponent counted from its last token::

    num = a e^p = sum_{s <= i < e} e^{k_i - (e-1-i) w} v_i        (den likewise, 1 for v_i)

Two adjacent runs X then Y, Y of n tokens, join as ``X · Y = X.decay(n w) ⊕ Y``; this is
associative as well, and a token alone is the run ``(a, b, p) = (v_i, 1, k_i)``. So the state
after every prefix is an inclusive scan with ``·``, computed here the Hillis–Steele way: at the
level of offset d = 1, 2, 4, ... every position t >= d joins the run ending at t - d (decayed by
the d tokens it is followed by) onto its own run of d tokens. No exponent ever holds an absolute
position: each run's p is relative to its own end, and a level subtracts only d w.

Work (merges of (B, C) slices): 1 + sum_d (T - d) + T, about T log2 T; depth: ceil(log2 T) + 2
rounds (``scan_cost``). The sequential scans (``logspace``, ``recurrent``) do 2 T merges in T
rounds.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from rwkv_ref.state import WKVState
from rwkv_ref.state import merge as _merge


def join(left: WKVState, right: WKVState, right_length: int, w: Tensor) -> WKVState:
    """The run ``left`` followed by the run ``right`` of ``right_length`` tokens.

    Args:
        left, right: ``WKVState`` s of matching shapes (..., C), each p relative to its run's
            last token.  right_length: n, how many tokens ``right`` spans.  w: (C,) rates.
    Returns:
        The joined run's ``WKVState``, p relative to the last token of ``right``.
    """
    return _merge(left.decay(right_length * w), right)


def _along_time(state: WKVState, index) -> WKVState:
    """``state`` with every (B, T, C) field indexed along T (a slice, or an int)."""
    return WKVState(*(x[:, index] for x in state))


def inclusive_scan(runs: WKVState, w: Tensor) -> WKVState:
    """The state after every prefix: position t joins runs 0..t (Hillis–Steele).

    Args:
        runs: ``WKVState`` of three (B, T, C) tensors, position t a run ending at token t.
        w: (C,) positive decay rates.
    Returns:
        ``WKVState`` of three (B, T, C) tensors: position t spans runs 0..t, p relative to t.
    """
    T = runs.a.shape[1]
    d = 1
    while d < T:
        # positions t >= d hold runs of exactly d tokens; t < d already span 0..t
        joined = join(_along_time(runs, slice(None, -d)), _along_time(runs, slice(d, None)), d, w)
        runs = WKVState(*(torch.cat([x[:, :d], j], dim=1) for x, j in zip(runs, joined)))
        d *= 2
    return runs


def wkv_scan(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKVState):
    """WKV (paper eq. 14) from a parallel prefix scan over the state monoid.

    The carried state is folded into token 0 (it is a run ending one token earlier), the scan
    gives the state after each token, and output t reads the state before it merged with the
    current token at its bonus exponent ``u + k_t``.

    Args:
        w, u: (C,) positive decay rate and bonus.  k, v: (B, T, C).  state: ``WKVState``
        (inputs checked and in the compute dtype, as ``rwkv_ref.wkv`` hands them over).
    Returns:
        y: (B, T, C) and the state after the last token (canonical: p the largest exponent).
    """
    one = torch.ones_like(v)                                       # (B, T, C)
    carried = WKVState(*(x[:, None] for x in state))              # (B, 1, C): before token 0
    first = join(carried, WKVState(v[:, :1], one[:, :1], k[:, :1]), 1, w)   # tokens ..0
    runs = WKVState(*(torch.cat([f, x[:, 1:]], dim=1) for f, x in zip(first, (v, one, k))))
    after = inclusive_scan(runs, w)                                # (B, T, C): after token t
    before = WKVState(*(torch.cat([s[:, None], x[:, :-1]], dim=1)  # (B, T, C): before token t
                        for s, x in zip(state, after)))
    read = _merge(before, WKVState(v, one, u + k))
    return read.a / read.b, _along_time(after, -1)


def scan_cost(T: int) -> tuple[int, int]:
    """The merges (each of one (B, C) slice) and the rounds of ``wkv_scan`` for T tokens.

    Returns:
        (work, depth): work = 1 (the carried state) + sum over levels of (T - d) + T (the
        reads); depth = ceil(log2 T) levels + 2 (the carried state, the reads).
    """
    levels = math.ceil(math.log2(T)) if T > 1 else 0
    return 1 + sum(T - 2**j for j in range(levels)) + T, levels + 2
