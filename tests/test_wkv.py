"""Property tests: every WKV variant computes the same operator.

The reference is eq. 14 evaluated in float64 by ``naive`` on inputs small enough that its
explicit exponentials cannot overflow. Every other variant must agree with it (outputs, final
state, gradients), and states must hand over between any two variants.
"""
import math
import warnings

import pytest
import torch
from hypothesis import given, strategies as st

from rwkv_ref import WKVState, wkv, wkv_step
from rwkv_ref.wkv import EMPTY_P, wkv_parallel


def _kernel_ok(name):
    try:
        from rwkv_ref import kernel
    except ImportError:
        return False
    return kernel.unavailable_reason(name) is None


STABLE = ["logspace", "recurrent", "parallel"] + (["cpp"] if _kernel_ok("cpp") else [])
ALL = ["naive"] + STABLE
F64 = torch.float64


def make_inputs(B, T, C, seed, scale=1.0, dtype=F64):
    """Random WKV inputs: w > 0 spanning slow to fast decay, u and k of size ``scale``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.empty(C, dtype=F64).uniform_(-4, 2, generator=g))      # 0.02 .. 7.4
    u = torch.randn(C, generator=g, dtype=F64) * scale
    k = torch.randn(B, T, C, generator=g, dtype=F64) * scale
    v = torch.randn(B, T, C, generator=g, dtype=F64)
    return [x.to(dtype) for x in (w, u, k, v)]


def random_state(B, C, seed, dtype=F64):
    """A non-empty state, as left behind by some earlier tokens."""
    w, u, k, v = make_inputs(B, 5, C, seed + 1000)
    return wkv(w, u, k, v, impl="naive")[1].to(dtype)


def assert_states_close(s1, s2, **tol):
    # (a, b, p) is canonical (p is the exact largest exponent), so compare field by field
    for name, x, y in zip(WKVState._fields, s1, s2):
        torch.testing.assert_close(x, y, **tol, msg=lambda m: f"state.{name}: {m}")


shapes = st.tuples(st.integers(1, 3), st.integers(1, 70), st.integers(1, 6))
seeds = st.integers(0, 2**31 - 1)


# ------------------------------------------------------------------- 1. values agree


@pytest.mark.parametrize("impl", STABLE)
@given(shape=shapes, seed=seeds, scale=st.floats(0.1, 5.0), carried=st.booleans())
def test_float64_equals_reference(impl, shape, seed, scale, carried):
    B, T, C = shape
    w, u, k, v = make_inputs(B, T, C, seed, scale)
    state = random_state(B, C, seed) if carried else None
    y_ref, s_ref = wkv(w, u, k, v, state, impl="naive")
    y, s = wkv(w, u, k, v, state, impl=impl)
    assert y.dtype == F64 and all(t.dtype == F64 for t in s)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    assert_states_close(s, s_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ALL)
@given(shape=shapes, seed=seeds, scale=st.floats(0.1, 5.0))
def test_float32_within_tolerance(impl, shape, seed, scale):
    """float32 stays within 2e-4 (absolute, on values of size ~1) of the float64 reference."""
    B, T, C = shape
    inputs = make_inputs(B, T, C, seed, scale)
    y_ref, s_ref = wkv(*inputs, impl="naive")
    y, s = wkv(*[x.float() for x in inputs], impl=impl)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(s.a.double() / s.b.double(), s_ref.a / s_ref.b,
                               rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(s.p.double(), s_ref.p, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("chunk", [1, 3, 16, 64])
def test_parallel_any_chunk_length(chunk):
    w, u, k, v = make_inputs(2, 45, 4, seed=7)
    y_ref, s_ref = wkv(w, u, k, v, impl="naive")
    y, s = wkv_parallel(w, u, k, v, WKVState.empty(2, 4, F64), chunk=chunk)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    assert_states_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_wkv_step_is_one_token_of_wkv():
    w, u, k, v = make_inputs(3, 1, 5, seed=3)
    state = random_state(3, 5, seed=3)
    y, s = wkv(w, u, k, v, state, impl="naive")
    y_t, s_t = wkv_step(w, u, k[:, 0], v[:, 0], state)
    torch.testing.assert_close(y_t, y[:, 0])
    assert_states_close(s_t, s)


# ------------------------------------------------------------------- 2. gradients agree


def _loss(y, state, seed):
    """A random linear function of y plus a function of the state that depends only on
    num/den and log den (both independent of how (a, b, p) is scaled), plus p alone."""
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=y.dtype)
    ga, gd, gp = (torch.randn(state.a.shape, generator=g, dtype=y.dtype) for _ in range(3))
    return ((y * gy).sum() + (state.a / state.b * ga).sum()
            + ((state.b.log() + state.p) * gd).sum() + (state.p * gp).sum())


def _grads(impl, w, u, k, v, state, seed):
    leaves = [x.clone().requires_grad_() for x in (w, u, k, v, *state)]
    y, s = wkv(*leaves[:4], WKVState(*leaves[4:]), impl=impl)
    return torch.autograd.grad(_loss(y, s, seed), leaves)


@pytest.mark.parametrize("impl", STABLE)
@given(shape=shapes, seed=seeds, scale=st.floats(0.1, 3.0))
def test_gradients_equal_reference(impl, shape, seed, scale):
    B, T, C = shape
    w, u, k, v = make_inputs(B, T, C, seed, scale)
    state = random_state(B, C, seed)
    ref = _grads("naive", w, u, k, v, state, seed)
    got = _grads(impl, w, u, k, v, state, seed)
    for name, a, b in zip(["w", "u", "k", "v", "state.a", "state.b", "state.p"], got, ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=lambda m: f"d/d{name}: {m}")


@pytest.mark.parametrize("impl", ALL)
def test_gradcheck(impl):
    w, u, k, v = make_inputs(2, 7, 3, seed=11)
    state = random_state(2, 3, seed=11)
    leaves = [x.clone().requires_grad_() for x in (w, u, k, v, *state)]

    def f(w, u, k, v, a, b, p):
        y, s = wkv(w, u, k, v, WKVState(a, b, p), impl=impl)
        return y, s.a / s.b, s.b.log() + s.p

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------- 3. state hand-off


@given(shape=shapes, seed=seeds, data=st.data())
def test_state_hands_over_between_any_variants(shape, seed, data):
    B, T, C = shape
    w, u, k, v = make_inputs(B, T, C, seed)
    split = data.draw(st.integers(0, T), label="split")
    first, second = data.draw(st.sampled_from(ALL), "first"), data.draw(st.sampled_from(ALL))
    y_ref, s_ref = wkv(w, u, k, v, impl="naive")
    if split == 0:
        s1, parts = None, []
    else:
        y1, s1 = wkv(w, u, k[:, :split], v[:, :split], impl=first)
        parts = [y1]
    if split < T:
        y2, s_end = wkv(w, u, k[:, split:], v[:, split:], s1, impl=second)
        parts.append(y2)
    else:
        s_end = s1
    torch.testing.assert_close(torch.cat(parts, dim=1), y_ref, rtol=1e-10, atol=1e-10)
    assert_states_close(s_end, s_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ALL)
def test_given_state_is_not_modified(impl):
    w, u, k, v = make_inputs(2, 9, 4, seed=5)
    state = random_state(2, 4, seed=5)
    before = [t.clone() for t in state]
    wkv(w, u, k, v, state, impl=impl)
    for t, t0 in zip(state, before):
        assert torch.equal(t, t0)


# ------------------------------------------------------------------- 4. facts of eq. 14


@pytest.mark.parametrize("impl", STABLE)
@given(shape=shapes, seed=seeds, scale=st.floats(0.1, 5.0))
def test_first_output_is_first_value_exactly(impl, shape, seed, scale):
    B, T, C = shape
    w, u, k, v = make_inputs(B, T, C, seed, scale, dtype=torch.float32)
    y, _ = wkv(w, u, k, v, impl=impl)
    assert torch.equal(y[:, 0], v[:, 0])


@pytest.mark.parametrize("impl", ALL)
@given(shape=shapes, seed=seeds, shift=st.floats(-20, 20))
def test_invariant_under_shifting_k(impl, shape, seed, shift):
    B, T, C = shape
    w, u, k, v = make_inputs(B, T, C, seed)
    y, _ = wkv(w, u, k, v, impl=impl)
    y_shifted, _ = wkv(w, u, k + shift, v, impl=impl)
    torch.testing.assert_close(y_shifted, y, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("impl", ALL)
@given(shape=shapes, seed=seeds, scale=st.floats(0.1, 5.0))
def test_output_is_a_weighted_average_of_values(impl, shape, seed, scale):
    B, T, C = shape
    w, u, k, v = make_inputs(B, T, C, seed, scale)
    y, _ = wkv(w, u, k, v, impl=impl)
    # causal: y_t lies between min and max of v_0..v_t, per row and channel
    lo, hi = v.cummin(dim=1).values, v.cummax(dim=1).values
    assert torch.all(y >= lo - 1e-12) and torch.all(y <= hi + 1e-12)


# ------------------------------------------------------------------- 5. stability


@pytest.mark.parametrize("impl", STABLE)
@given(seed=seeds, scale=st.floats(100.0, 300.0))
def test_stable_in_float32_where_naive_overflows(impl, seed, scale):
    w, _, _, v = make_inputs(2, 40, 4, seed)
    g = torch.Generator().manual_seed(seed)
    u = (torch.rand(4, generator=g, dtype=F64) * 2 - 1) * scale       # |u| <= 300
    k = (torch.rand(2, 40, 4, generator=g, dtype=F64) * 2 - 1) * scale
    y_ref, _ = wkv(w, u, k, v, impl="naive")            # float64: e^600 still fits
    assert torch.isfinite(y_ref).all()
    y, s = wkv(*[x.float() for x in (w, u, k, v)], impl=impl)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in s)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)


def test_naive_overflows_in_float32():
    w, u, k, v = make_inputs(1, 8, 3, seed=0, dtype=torch.float32)
    y, _ = wkv(w, u, k + 100.0, v, impl="naive")        # e^100 > float32's max (~3.4e38)
    assert not torch.isfinite(y).all()
    assert math.exp(88) < torch.finfo(torch.float32).max < math.exp(89)


# ------------------------------------------------------------------- dtypes and dispatch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    w, u, k, v = make_inputs(2, 20, 4, seed=1, dtype=torch.float32)
    y32, s32 = wkv(w, u, k, v, impl="parallel")
    y, s = wkv(w, u, k.to(dtype), v.to(dtype), impl="parallel")
    assert y.dtype == dtype and s.a.dtype == torch.float32
    torch.testing.assert_close(y.float(), y32, rtol=0.05, atol=0.05)


def test_auto_falls_back_with_one_warning_when_no_kernel(monkeypatch):
    import importlib

    from rwkv_ref import kernel
    wkv_module = importlib.import_module("rwkv_ref.wkv")   # the module, not the function

    monkeypatch.setattr(kernel, "unavailable_reason", lambda name: "no compiler: install g++")
    monkeypatch.setattr(wkv_module, "_warned", set())
    w, u, k, v = make_inputs(1, 6, 2, seed=2)
    with pytest.warns(UserWarning, match="install g\\+\\+"):
        y, _ = wkv(w, u, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wkv(w, u, k, v)                                    # no second warning
    torch.testing.assert_close(y, wkv(w, u, k, v, impl="naive")[0])


# ------------------------------------------------------------------- bad input


def _bad(**change):
    w, u, k, v = make_inputs(2, 5, 3, seed=0)
    args = dict(w=w, u=u, k=k, v=v, state=None, impl="logspace") | change
    return args


@pytest.mark.parametrize("change, message", [
    (dict(impl="fast"), "unknown impl 'fast'"),
    (dict(k=torch.zeros(5, 3, dtype=F64)), r"k must have shape \(B, T, C\)"),
    (dict(v=torch.zeros(2, 4, 3, dtype=F64)), "v has shape"),
    (dict(w=torch.ones(4, dtype=F64)), r"w must have shape \(C,\)"),
    (dict(u=torch.ones(1, 3, dtype=F64)), r"u must have shape \(C,\)"),
    (dict(k=torch.zeros(2, 5, 3, dtype=torch.long)), "k must have a floating dtype"),
    (dict(w=-torch.ones(3, dtype=F64)), "w must be positive"),
    (dict(w=torch.zeros(3, dtype=F64)), "w must be positive"),
    (dict(k=torch.zeros(2, 0, 3, dtype=F64), v=torch.zeros(2, 0, 3, dtype=F64)), "empty"),
    (dict(state=WKVState.empty(3, 3, F64)), r"state.a must have shape \(B, C\) = \(2, 3\)"),
    (dict(state=(torch.zeros(2, 3),) * 2), "state must be a WKVState"),
])
def test_bad_input_raises_a_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        wkv(**_bad(**change))


def test_empty_state_is_empty():
    s = WKVState.empty(2, 3)
    assert torch.all(s.a == 0) and torch.all(s.b == 0) and torch.all(s.p == EMPTY_P)
