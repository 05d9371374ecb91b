"""Property tests of the parallel-scan WKV (rwkv_ref/scan.py).

The reference is eq. 14 written out in float64 as one masked log-sum-exp per output (so it
stays exact for keys of size 300, where explicit exponentials of float32 overflow). The scan
must agree with it and with every other variant: outputs, states, every gradient, and states
handed over in both directions. Its building block ⊕ must be associative with the empty state
as identity.

Every call below goes through ``rwkv_ref.wkv(..., impl=...)``, with its checks and casts.
"""
import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rwkv_ref import scan
from rwkv_ref.wkv import EMPTY_P, WKVState, _merge, wkv

wkv_module = importlib.import_module("rwkv_ref.wkv")   # the module (rwkv_ref.wkv is the function)
F64, F32 = torch.float64, torch.float32
OTHERS = ["naive", "logspace", "recurrent", "parallel", "cpp"]
NAIVE_SAFE = {F64: 20.0, F32: 5.0}          # |k|, |u| below which naive's e^k cannot overflow


def test_scan_is_a_registered_variant():
    assert "scan" in wkv_module.WKV_IMPLS and wkv_module._PURE["scan"] is scan.wkv_scan


# ----------------------------------------------------------------------------- reference


def eq14(w, u, k, v, state):
    """Paper eq. 14 in float64 from the state before token 0: output t is the average of the
    values v_i (i < t, exponent k_i - (t-1-i) w), v_t (exponent u + k_t) and the carried past
    (numerator a e^{p - t w}, denominator b e^{p - t w}), computed relative to its max.

    Returns y (B, T, C) and the state after token T-1 with p its largest exponent.
    """
    w, u, k, v = (x.double() for x in (w, u, k, v))
    a, b, p = (x.double() for x in state)
    T = k.shape[1]
    t = torch.arange(T, dtype=F64)
    age = t[:, None] - 1 - t[None, :]                                  # (T, T): t-1-i
    past = k.transpose(1, 2)[:, :, None, :] - age * w[:, None, None]   # (B, C, T, T)
    past = past.masked_fill(age < 0, -math.inf)                        # i < t only
    now = (u + k).transpose(1, 2)                                      # (B, C, T)
    carried = p[..., None] - t * w[:, None]                            # (B, C, T)
    m = torch.maximum(torch.maximum(past.amax(-1), now), carried)      # (B, C, T)
    e_past, e_now, e_car = (torch.exp(past - m[..., None]), torch.exp(now - m),
                            torch.exp(carried - m))
    vt = v.transpose(1, 2)                                             # (B, C, T)
    num = (e_past * vt[:, :, None, :]).sum(-1) + e_now * vt + e_car * a[..., None]
    den = e_past.sum(-1) + e_now + e_car * b[..., None]
    last = k - (T - 1 - t)[:, None] * w                                # (B, T, C)
    p_end = torch.maximum(last.amax(1), p - T * w)                     # (B, C)
    e_last, e_old = torch.exp(last - p_end[:, None]), torch.exp(p - T * w - p_end)
    end = WKVState((e_last * v).sum(1) + e_old * a, e_last.sum(1) + e_old * b, p_end)
    return (num / den).transpose(1, 2), end


# ----------------------------------------------------------------------------- strategies


def _tensor(draw, shape, low, high):
    """A float64 tensor of drawn values: hypothesis draws a fill value and some entries, and a
    drawn-amplitude ripple keeps the rest from being all equal (no accidental ties)."""
    n = int(np.prod(shape))
    x = draw(arrays(np.float64, n, elements=st.floats(low, high)))
    ripple = draw(st.floats(0.0, 1.0)) * np.sin(1.618 * np.arange(n) + 0.5)
    return torch.from_numpy(np.clip(x + ripple * (high - low) / 2, low, high).reshape(shape))


@st.composite
def cases(draw, max_T=300, max_C=70, max_scale=300.0, budget=3_000_000):
    """(w, u, k, v, state) in float64. B*C*T^2 <= budget keeps the reference's (B, C, T, T)
    tensors small; T spans powers of two and everything between."""
    B = draw(st.integers(1, 2), label="B")
    T = draw(st.one_of(st.integers(1, 40), st.integers(1, max_T)), label="T")
    C = draw(st.integers(1, max(1, min(max_C, budget // (B * T * T)))), label="C")
    scale = draw(st.one_of(st.floats(0.1, 5.0), st.floats(0.1, max_scale)), label="scale")
    w = torch.exp(_tensor(draw, (C,), -4.0, 2.0))                 # 0.02 .. 7.4, slow to fast
    u = _tensor(draw, (C,), -scale, scale)
    k = _tensor(draw, (B, T, C), -scale, scale)
    v = _tensor(draw, (B, T, C), -3.0, 3.0)
    state = None
    if draw(st.booleans(), label="carried"):
        p = _tensor(draw, (B, C), -scale, scale)
        state = WKVState(_tensor(draw, (B, C), -2.0, 2.0), _tensor(draw, (B, C), 0.05, 3.0), p)
    return w, u, k, v, state


def cast(case, dtype):
    """The case in ``dtype``: the state becomes None-safe and every tensor rounds once."""
    w, u, k, v, state = case
    B, _, C = k.shape
    state = WKVState.empty(B, C, F64) if state is None else state
    return [x.to(dtype) for x in (w, u, k, v)] + [state.to(dtype)]


def tolerance(dtype, scale):
    """float64: rounding only. float32: about 1e-6 relative per exponent of size ``scale``,
    and a few float32 ulps on values of size ~1."""
    if dtype == F64:
        return {"rtol": 1e-9, "atol": 1e-9}
    return {"rtol": 1e-4, "atol": 2e-4 * (1 + scale / 30)}


def assert_states_close(s1, s2, **tol):
    for name, x, y in zip(WKVState._fields, s1, s2):
        torch.testing.assert_close(x.double(), y.double(), **tol,
                                   msg=lambda m: f"state.{name}: {m}")


def scale_of(k, u):
    return float(torch.cat([k.abs().flatten(), u.abs()]).max())


# ----------------------------------------------------------------------------- ⊕ itself


@st.composite
def states(draw, n=4):
    """A WKVState of n channels: any sign of a, b >= 0, p anywhere (or empty)."""
    a = torch.tensor(draw(st.lists(st.floats(-5, 5), min_size=n, max_size=n)), dtype=F64)
    b = torch.tensor(draw(st.lists(st.floats(0.0, 5), min_size=n, max_size=n)), dtype=F64)
    p = torch.tensor(draw(st.lists(st.one_of(st.floats(-300, 300), st.just(EMPTY_P)),
                                   min_size=n, max_size=n)), dtype=F64)
    empty = p == EMPTY_P
    return WKVState(a.masked_fill(empty, 0.0), b.masked_fill(empty, 0.0), p)


def value(s):
    """(num, den) as exact sums relative to a common exponent: compare merged states without
    trusting their own choice of p."""
    return s.a * torch.exp(s.p - 300.0), s.b * torch.exp(s.p - 300.0)


@given(x=states(), y=states(), z=states())
def test_merge_is_associative_with_empty_identity(x, y, z):
    left, right = _merge(_merge(x, y), z), _merge(x, _merge(y, z))
    assert torch.equal(left.p, right.p)                    # max is associative exactly
    for got, want in zip(value(left), value(right)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-300)
    empty = WKVState.empty(1, 4, F64)
    empty = WKVState(*(t[0] for t in empty))
    for merged in (_merge(x, empty), _merge(empty, x)):
        for got, want in zip(merged, x):
            assert torch.equal(got, want)


@given(x=states(), y=states(), z=states(), n=st.integers(1, 50), m=st.integers(1, 50),
       rate=st.floats(0.01, 5.0))
def test_join_of_runs_is_associative(x, y, z, n, m, rate):
    """Runs x, y (n tokens), z (m tokens): (x y) z == x (y z), y z spanning n + m tokens."""
    w = torch.full((4,), rate, dtype=F64)
    left = scan.join(scan.join(x, y, n, w), z, m, w)
    right = scan.join(x, scan.join(y, z, m, w), n + m, w)
    torch.testing.assert_close(left.p, right.p, rtol=1e-12, atol=1e-9)
    for got, want in zip(value(left), value(right)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-300)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("dtype", [F64, F32])
@given(case=cases())
def test_equals_eq14_reference(dtype, case):
    w, u, k, v, state = cast(case, dtype)
    y, s = wkv(w, u, k, v, state, impl="scan")
    y_ref, s_ref = eq14(w, u, k, v, state)
    assert y.dtype == dtype and all(t.dtype == dtype for t in s)
    tol = tolerance(dtype, scale_of(k, u))
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(s.a.double() / s.b.double(), s_ref.a / s_ref.b, **tol)
    torch.testing.assert_close(s.b.double().log() + s.p.double(), s_ref.b.log() + s_ref.p,
                               **tol)
    if dtype == F64:                                        # canonical p, field by field
        assert_states_close(s, s_ref, **tol)


@pytest.mark.parametrize("other", OTHERS)
@pytest.mark.parametrize("dtype", [F64, F32])
@given(case=cases(max_T=120))
def test_equals_every_variant(other, dtype, case):
    w, u, k, v, state = cast(case, dtype)
    if other == "naive" and scale_of(k, u) > NAIVE_SAFE[dtype]:
        return                                              # naive overflows by design
    y, s = wkv(w, u, k, v, state, impl="scan")
    y_o, s_o = wkv(w, u, k, v, state, impl=other)
    tol = tolerance(dtype, scale_of(k, u))
    torch.testing.assert_close(y, y_o, **tol)
    torch.testing.assert_close(s.p, s_o.p, **tol)
    torch.testing.assert_close(s.a / s.b, s_o.a / s_o.b, **tol)
    if dtype == F64:
        assert_states_close(s, s_o, **tol)


def test_long_float32_keeps_exponents_relative():
    """T = 2048 with fast decays: a scan that counted exponents from position 0 would hold
    t w ~ 1e4 in float32 (ulp 1e-3) and lose three digits; relative exponents lose none."""
    T, C = 2048, 3
    t = torch.arange(T, dtype=F64)
    w = torch.tensor([0.05, 2.0, 7.0], dtype=F64)
    u = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    k = torch.stack([torch.sin(0.37 * t), 3 * torch.cos(0.11 * t), torch.sin(t)], -1)[None]
    v = torch.stack([torch.cos(0.23 * t), torch.sin(0.05 * t), torch.cos(t)], -1)[None]
    y_ref, _ = eq14(w, u, k, v, WKVState.empty(1, C, F64))
    y, _ = wkv(*(x.float() for x in (w, u, k, v)), impl="scan")
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)


@given(case=cases(max_T=60, max_scale=5.0))
def test_first_output_is_first_value_exactly(case):
    w, u, k, v, _ = cast(case, F32)
    y, _ = wkv(w, u, k, v, impl="scan")
    assert torch.equal(y[:, 0], v[:, 0])


# ----------------------------------------------------------------------------- gradients


def _loss(y, s):
    """A fixed linear function of y and of the scale-free state summaries a/b, log b + p,
    and of p alone: every gradient of y and of the state takes part."""
    gy = torch.sin(torch.arange(y.numel(), dtype=y.dtype)).reshape(y.shape)
    gs = torch.cos(torch.arange(s.a.numel(), dtype=y.dtype)).reshape(s.a.shape)
    return ((y * gy).sum() + (s.a / s.b * gs).sum() + ((s.b.log() + s.p) * gs.flip(-1)).sum()
            + (s.p * gs.roll(1, -1)).sum())


def _grads(run, w, u, k, v, state):
    leaves = [x.clone().requires_grad_() for x in (w, u, k, v, *state)]
    y, s = run(*leaves[:4], WKVState(*leaves[4:]))
    return torch.autograd.grad(_loss(y, s), leaves)


GRAD_NAMES = ["w", "u", "k", "v", "state.a", "state.b", "state.p"]


@pytest.mark.parametrize("other", ["eq14"] + OTHERS)
@given(case=cases(max_T=100, max_C=20, max_scale=20.0, budget=200_000))
def test_gradients_equal(other, case):
    w, u, k, v, state = cast(case, F64)
    if state.p[0, 0] == EMPTY_P:        # the empty state's p has no gradient worth comparing
        state = WKVState(state.a, state.b + 0.5, torch.zeros_like(state.p))
    run = eq14 if other == "eq14" else (lambda *x: wkv(*x, impl=other))
    got = _grads(lambda *x: wkv(*x, impl="scan"), w, u, k, v, state)
    want = _grads(run, w, u, k, v, state)
    for name, g, g_ref in zip(GRAD_NAMES, got, want):
        torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-7,
                                   msg=lambda m: f"d/d{name} vs {other}: {m}")


@given(case=cases(max_T=300, max_C=8, budget=400_000),
       scale=st.floats(50.0, 300.0))
def test_extreme_keys_stay_finite(case, scale):
    """|k|, |u| up to 300 in float32 (e^300 overflows float32 by 170 orders of magnitude):
    outputs, state and every gradient stay finite."""
    w, u, k, v, state = cast(case, F32)
    largest = max(scale_of(k, u), 1e-3)
    k, u = k / largest * scale, u / largest * scale         # the largest |k| or |u| is scale
    leaves = [x.clone().requires_grad_() for x in (w, u, k, v, *state)]
    y, s = wkv(*leaves[:4], WKVState(*leaves[4:]), impl="scan")
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in s)
    for name, g in zip(GRAD_NAMES, torch.autograd.grad(_loss(y, s), leaves)):
        assert torch.isfinite(g).all(), f"d/d{name} is not finite"


# ----------------------------------------------------------------------------- hand-off


@pytest.mark.parametrize("dtype", [F64, F32])
@given(case=cases(max_T=120, max_scale=20.0), data=st.data())
def test_state_hands_over_both_ways(dtype, case, data):
    w, u, k, v, state = cast(case, dtype)
    T = k.shape[1]
    split = data.draw(st.integers(0, T), label="split")
    other = data.draw(st.sampled_from(OTHERS[1:] if scale_of(k, u) > NAIVE_SAFE[dtype]
                                      else OTHERS), label="other")
    first, second = data.draw(st.sampled_from([("scan", other), (other, "scan")]),
                              label="order")
    y_ref, s_ref = eq14(w, u, k, v, state)
    parts, s = [], state
    if split > 0:
        y1, s = wkv(w, u, k[:, :split], v[:, :split], s, impl=first)
        parts.append(y1)
    if split < T:
        y2, s = wkv(w, u, k[:, split:], v[:, split:], s, impl=second)
        parts.append(y2)
    tol = tolerance(dtype, scale_of(k, u))
    torch.testing.assert_close(torch.cat(parts, 1).double(), y_ref, **tol)
    torch.testing.assert_close(s.a.double() / s.b.double(), s_ref.a / s_ref.b, **tol)
    torch.testing.assert_close(s.p.double(), s_ref.p, **tol)


# ----------------------------------------------------------------------------- cost


@pytest.mark.parametrize("T", [1, 2, 3, 8, 100, 300])
def test_scan_cost_counts_the_merges(T, monkeypatch):
    """scan_cost's work is the number of (B, C) slices merged, counted on a real run, and
    its depth the number of merge calls made."""
    counted = {"slices": 0, "calls": 0}

    def counting_merge(x, y):
        counted["slices"] += x.a.numel() // (x.a.shape[0] * x.a.shape[-1])
        counted["calls"] += 1
        return _merge(x, y)

    monkeypatch.setattr(scan, "_merge", counting_merge)
    w, k = torch.ones(3), torch.zeros(2, T, 3)
    scan.wkv_scan(w, w, k, k, WKVState.empty(2, 3))
    assert (counted["slices"], counted["calls"]) == scan.scan_cost(T)
    assert scan.scan_cost(T)[1] == math.ceil(math.log2(T)) + 2 if T > 1 else 2
