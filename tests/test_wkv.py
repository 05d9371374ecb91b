"""Every WKV variant computes the operator of eq. 14, held to facts that do not come from it.

The reference is ``reference_wkv`` below: eq. 14 written term by term with explicit loops in
float64 (a log-sum-exp per output, so it also holds for |k| = 300). It shares no code with the
variants. Besides it: properties of eq. 14 (y_0 = v_0 from the empty state, invariance under
k + c, y between the smallest and largest value seen, state hand-off), finite differences
(gradcheck), and memory the variants are handed or allocate filled with NaN.

Variants under test: every name in ``rwkv_ref.WKV_IMPLS`` (a variant registered later is
covered without editing this file); "cuda" is skipped, saying so, where there is no GPU. A
kernel that cannot be built is not skipped: its tests fail with the build's reason.
"""
import math
import warnings

import pytest
import torch
from hypothesis import given, strategies as st

from rwkv_ref import WKVState, wkv, wkv_step
from rwkv_ref.wkv import wkv_parallel
from strategies import WKVProblem, grid, runnable_variants, wkv_problems, wkv_variants

F64 = torch.float64
VARIANTS = wkv_variants()
# naive overflows by design once |k| or |u + k| passes ~88 in float32 (~709 in float64)
STABLE = wkv_variants(stable_only=True)
NAMES = runnable_variants()


def run(impl, w, u, k, v, state=None, **kw):
    """``wkv`` on the variant's device ("cuda" on the GPU), results back on the CPU."""
    dev = "cuda" if impl == "cuda" else "cpu"
    state = None if state is None else state.to(dev)
    y, s = wkv(w.to(dev), u.to(dev), k.to(dev), v.to(dev), state, impl=impl, **kw)
    return y.cpu(), s.to("cpu")


# ----------------------------------------------------------------------------- the reference


def _sums(exps, nums, dens, top=None):
    """sum_j e^{E_j} N_j and sum_j e^{E_j} D_j over the listed terms, as (num, den) / e^top.

    Args: exps, nums, dens: lists of (B, C) tensors.  top: (B, C) or None (the largest E_j).
    """
    E = torch.stack(exps)                                       # (terms, B, C)
    top = E.amax(0) if top is None else top
    e = torch.exp(E - top)
    return (e * torch.stack(nums)).sum(0), (e * torch.stack(dens)).sum(0), top


def reference_wkv(w, u, k, v, state=None):
    """Eq. 14 term by term in float64: output t sums the state (exponent p - t w, weights a and
    b), tokens i < t (exponent k_i - (t-1-i) w) and token t (exponent u + k_t).

    Args: w, u (C,); k, v (B, T, C); state None or WKVState (B, C). Differentiable.
    Returns: y (B, T, C) and the state after the last token with p its largest exponent.
    """
    w, u, k, v = (x.to(F64) for x in (w, u, k, v))
    B, T, C = k.shape
    one = torch.ones(B, C, dtype=F64)
    if state is None:                         # nothing seen: no state term at all
        state_terms = lambda t: ([], [], [])  # noqa: E731
    else:
        a, b, p = (x.to(F64) for x in state)
        state_terms = lambda t: ([p - t * w], [a], [b])  # noqa: E731
    ys = []
    for t in range(T):
        exps, nums, dens = state_terms(t)
        exps = exps + [k[:, i] - (t - 1 - i) * w for i in range(t)] + [u + k[:, t]]
        nums = nums + [v[:, i] for i in range(t)] + [v[:, t]]
        dens = dens + [one] * (t + 1)
        num, den, _ = _sums(exps, nums, dens)
        ys.append(num / den)
    exps, nums, dens = state_terms(T)
    exps = exps + [k[:, i] - (T - 1 - i) * w for i in range(T)]
    a, b, p = _sums(exps, nums + [v[:, i] for i in range(T)], dens + [one] * T)
    return torch.stack(ys, dim=1), WKVState(a, b, p)


def assert_states_close(actual, expected, rtol, atol):
    """(a, b, p) field by field: p is the largest exponent in every variant, so a and b are
    comparable directly."""
    for name, x, y in zip(WKVState._fields, actual, expected):
        torch.testing.assert_close(x.to(F64), y.to(F64), rtol=rtol, atol=atol,
                                   msg=lambda m: f"state.{name}: {m}")


def f32_tolerance(problem: WKVProblem) -> float:
    """What float32 rounding allows on y, a and b (absolute): ~1e-7 relative on every exponent,
    whose size is up to max |u| + max |k| or max |p|, and on the running p a few dozen steps
    deep. Measured: at most 1e-6 * (1 + size) over 60 examples per variant; allowed 10x."""
    size = max(problem.k.abs().max() + problem.u.abs().max(),
               0 if problem.state is None else problem.state.p.abs().max())
    return 1e-5 * (1 + float(size))


def test_reference_on_a_hand_computed_example():
    """Two tokens, one channel, w = ln 2 (decay 1/2), u = 0, k = 0, from the empty state:
    y_0 = v_0; y_1 = (v_0 + v_1) / 2 (equal weights e^0); the state after both holds
    num = v_0/2 + v_1, den = 1/2 + 1 with largest exponent 0."""
    w, u = torch.tensor([math.log(2)], dtype=F64), torch.zeros(1, dtype=F64)
    k, v = torch.zeros(1, 2, 1, dtype=F64), torch.tensor([[[4.0], [2.0]]], dtype=F64)
    y, s = reference_wkv(w, u, k, v)
    torch.testing.assert_close(y.flatten(), torch.tensor([4.0, 3.0], dtype=F64))
    torch.testing.assert_close(torch.stack(s).flatten(), torch.tensor([4.0, 1.5, 0.0], dtype=F64))


# ----------------------------------------------------------------------------- 1. values


@pytest.mark.parametrize("impl", VARIANTS)
@given(problem=wkv_problems())
def test_float64_equals_reference(impl, problem):
    y_ref, s_ref = reference_wkv(*problem.args())
    y, s = run(impl, *problem.args())
    assert y.dtype == F64 and all(t.dtype == F64 for t in s)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    assert_states_close(s, s_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", VARIANTS)
@given(problem=wkv_problems())
def test_float32_within_rounding_of_reference(impl, problem):
    rounded = problem.rounded(torch.float32)
    y_ref, s_ref = reference_wkv(*rounded.args())
    y, s = run(impl, *problem.args(torch.float32))
    assert y.dtype == torch.float32 and s.a.dtype == torch.float32
    tol = f32_tolerance(rounded)
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
    assert_states_close(s, s_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", STABLE)
@given(problem=wkv_problems(key_max=300.0, max_elements=800))
def test_float32_holds_for_keys_up_to_300(impl, problem):
    """|k|, |u| up to 300: e^300 overflows float32 (max ~e^88.7) but no stable variant ever
    forms it."""
    rounded = problem.rounded(torch.float32)
    y_ref, s_ref = reference_wkv(*rounded.args())
    y, s = run(impl, *problem.args(torch.float32))
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in s)
    tol = f32_tolerance(rounded)
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
    assert_states_close(s, s_ref, rtol=tol, atol=tol)


def test_naive_overflows_in_float32():
    """The fact the stable variants exist for: e^100 is inf in float32."""
    w, u = torch.ones(3), torch.zeros(3)
    k, v = torch.full((1, 4, 3), 100.0), torch.ones(1, 4, 3)
    y, _ = wkv(w, u, k, v, impl="naive")
    assert not torch.isfinite(y).all()


@given(problem=wkv_problems(with_state=False), chunk=st.integers(1, 41))
def test_parallel_any_chunk_length(problem, chunk):
    y_ref, s_ref = reference_wkv(*problem.args())
    w, u, k, v, _ = problem.args()
    B, _, C = problem.shape
    y, s = wkv_parallel(w, u, k, v, WKVState.empty(B, C, F64), chunk=chunk)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    assert_states_close(s, s_ref, rtol=1e-10, atol=1e-10)


@given(problem=wkv_problems())
def test_wkv_step_is_one_token_of_the_reference(problem):
    w, u, k, v, state = problem.args()
    B, _, C = problem.shape
    state = WKVState.empty(B, C, F64) if state is None else state
    y_ref, s_ref = reference_wkv(w, u, k[:, :1], v[:, :1], state)
    y_t, s_t = wkv_step(w, u, k[:, 0], v[:, 0], state)
    torch.testing.assert_close(y_t, y_ref[:, 0], rtol=1e-10, atol=1e-10)
    assert_states_close(s_t, s_ref, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- 2. gradients


def _loss(y, state):
    """A fixed random linear function of y and of what the state means: num/den and
    log den = log b + p (both unchanged by rescaling (a, b, p), so every variant agrees on
    their gradients even where two exponents tie for the maximum)."""
    g = torch.Generator().manual_seed(0)       # a fixed projection, not a drawn input
    gy = torch.randn(y.shape, generator=g, dtype=F64)
    ga, gd = (torch.randn(state.a.shape, generator=g, dtype=F64) for _ in range(2))
    return ((y * gy).sum() + (state.a / state.b * ga).sum()
            + ((state.b.log() + state.p) * gd).sum())


def _grads(fn, w, u, k, v, state):
    leaves = [x.clone().requires_grad_() for x in (w, u, k, v, *state)]
    y, s = fn(*leaves[:4], WKVState(*leaves[4:]))
    return torch.autograd.grad(_loss(y.double(), s.to(F64)), leaves)


@pytest.mark.parametrize("impl", VARIANTS)
@given(problem=wkv_problems(key_max=3.0, max_elements=600))
def test_gradients_equal_autograd_through_the_reference(impl, problem):
    w, u, k, v, state = problem.args()
    if state is None:
        B, _, C = problem.shape
        state = WKVState.empty(B, C, F64)
    ref = _grads(reference_wkv, w, u, k, v, state)
    got = _grads(lambda *a: run(impl, *a), w, u, k, v, state)
    for name, x, y in zip(["w", "u", "k", "v", "state.a", "state.b", "state.p"], got, ref):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-8, msg=lambda m: f"d/d{name}: {m}")


@pytest.mark.parametrize("impl", VARIANTS)
def test_gradcheck_against_finite_differences(impl):
    g = torch.Generator().manual_seed(11)
    w = torch.rand(3, generator=g, dtype=F64) * 2 + 0.1
    u, a, p = (torch.randn(*s, generator=g, dtype=F64) for s in ((3,), (2, 3), (2, 3)))
    k, v = (torch.randn(2, 7, 3, generator=g, dtype=F64) for _ in range(2))
    b = torch.rand(2, 3, generator=g, dtype=F64) + 0.5
    dev = "cuda" if impl == "cuda" else "cpu"
    leaves = [x.to(dev).requires_grad_() for x in (w, u, k, v, a, b, p)]

    def f(w, u, k, v, a, b, p):
        y, s = wkv(w, u, k, v, WKVState(a, b, p), impl=impl)
        return y, s.a / s.b, s.b.log() + s.p

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- 3. hand-off


@given(problem=wkv_problems(), data=st.data())
def test_state_hands_over_between_any_variants(problem, data):
    w, u, k, v, state = problem.args()
    T = problem.shape[1]
    split = data.draw(st.integers(1, T), label="split")
    first = data.draw(st.sampled_from(NAMES), label="first")
    second = data.draw(st.sampled_from(NAMES), label="second")
    y_ref, s_ref = reference_wkv(w, u, k, v, state)
    y1, s1 = run(first, w, u, k[:, :split], v[:, :split], state)
    parts, s_end = [y1], s1
    if split < T:
        y2, s_end = run(second, w, u, k[:, split:], v[:, split:], s1)
        parts.append(y2)
    torch.testing.assert_close(torch.cat(parts, dim=1), y_ref, rtol=1e-10, atol=1e-10)
    assert_states_close(s_end, s_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", VARIANTS)
@given(problem=wkv_problems(max_elements=300))
def test_given_state_is_not_modified(impl, problem):
    dev = "cuda" if impl == "cuda" else "cpu"
    w, u, k, v, state = (x.to(dev) if isinstance(x, torch.Tensor) else x for x in problem.args())
    if state is None:
        B, _, C = problem.shape
        state = WKVState.empty(B, C, F64)
    state = state.to(dev)
    before = [t.clone() for t in state]
    wkv(w, u, k, v, state, impl=impl)
    for t, t0 in zip(state, before):
        assert torch.equal(t, t0)


# ----------------------------------------------------------------------------- 4. facts of eq. 14


@pytest.mark.parametrize("impl", VARIANTS)
@given(problem=wkv_problems(with_state=False))
def test_first_token_from_the_empty_state(impl, problem):
    """y_0 = v_0 (the only term), and the state holds exactly that token: num = e^{k_0} v_0,
    den = e^{k_0}, i.e. (a, b, p) = (v_0, 1, k_0) for T = 1."""
    w, u, k, v, _ = problem.args(torch.float32)
    y, s = run(impl, w, u, k, v)
    torch.testing.assert_close(y[:, 0], v[:, 0], rtol=1e-6, atol=1e-6)   # up to rounding
    _, s1 = run(impl, w, u, k[:, :1], v[:, :1])
    torch.testing.assert_close(s1.a, v[:, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s1.b, torch.ones_like(s1.b), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s1.p, k[:, 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", VARIANTS)
@given(problem=wkv_problems(), shift=grid((), -20.0, 20.0, 200))
def test_invariant_under_shifting_k(impl, problem, shift):
    """Adding c to every key (and to the state's exponent) multiplies every term by e^c."""
    w, u, k, v, state = problem.args()
    shifted = None if state is None else WKVState(state.a, state.b, state.p + shift)
    y, s = run(impl, w, u, k, v, state)
    y_shifted, s_shifted = run(impl, w, u, k + shift, v, shifted)
    torch.testing.assert_close(y_shifted, y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s_shifted.p, s.p + shift, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("impl", VARIANTS)
@given(problem=wkv_problems())
def test_output_is_a_weighted_average_of_values_seen(impl, problem):
    """y_t lies between the smallest and largest of v_0..v_t and the state's value a/b."""
    w, u, k, v, state = problem.args()
    y, s = run(impl, w, u, k, v, state)
    seen = v if state is None else torch.cat([(state.a / state.b)[:, None], v], dim=1)
    lo, hi = seen.cummin(dim=1).values, seen.cummax(dim=1).values
    if state is not None:
        lo, hi = lo[:, 1:], hi[:, 1:]
    slack = 1e-12 * (1 + seen.abs().max())
    assert torch.all(y >= lo - slack) and torch.all(y <= hi + slack)
    final = s.a / s.b
    assert torch.all(final >= seen.amin(1) - slack) and torch.all(final <= seen.amax(1) + slack)


# ----------------------------------------------------------------------------- 5. memory


def _strided(x: torch.Tensor) -> torch.Tensor:
    """x as a non-contiguous view into a buffer whose other elements are NaN."""
    buf = torch.full((*x.shape[:-1], 2 * x.shape[-1]), math.nan, dtype=x.dtype)
    buf[..., 1::2] = x
    return buf[..., 1::2]


@pytest.mark.parametrize("impl", VARIANTS)
@pytest.mark.parametrize("B, T, C", [(1, 1, 3), (2, 19, 45), (1, 33, 70)])
def test_uses_exactly_the_memory_it_is_handed_and_writes_all_it_allocates(impl, B, T, C):
    """Deterministic, unlike freeing NaN tensors and hoping the allocator reuses them:

    * inputs are strided views into NaN-filled buffers: reading past or between the
      elements of a view (or assuming contiguity) reads NaN;
    * with ``torch.use_deterministic_algorithms(True)`` torch fills every tensor it allocates
      uninitialised (``torch.empty``, ``at::empty_like`` in the kernels) with NaN: an output or
      gradient element the code forgets to write stays NaN.
    """
    g = torch.Generator().manual_seed(B + T + C)
    w = torch.rand(C, generator=g) * 2 + 0.05
    u, a, p = torch.randn(C, generator=g), torch.randn(B, C, generator=g), torch.randn(B, C,
                                                                                     generator=g)
    k, v = torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g)
    b = torch.rand(B, C, generator=g) + 0.5
    dense = (w, u, k, v, a, b, p)
    y_ref, s_ref = reference_wkv(w, u, k, v, WKVState(a, b, p))
    dev = "cuda" if impl == "cuda" else "cpu"
    views = [_strided(x).to(dev).requires_grad_() for x in dense]
    assert not any(x.is_contiguous() for x in views[2:])
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.isnan(torch.empty(3)).all()             # the fill is on
        y, s = wkv(*views[:4], WKVState(*views[4:]), impl=impl)
        (y.square().sum() + sum(t.sum() for t in s)).backward()
    finally:
        torch.use_deterministic_algorithms(was)
    for name, x in zip(["y", "a", "b", "p"] + [f"grad {n}" for n in "wukvabp"],
                       (y, *s, *(leaf.grad for leaf in views))):
        assert torch.isfinite(x).all(), f"{impl}: {name} has unwritten (NaN) elements"
    torch.testing.assert_close(y.cpu().double(), y_ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- dtypes, dispatch


@pytest.mark.parametrize("impl", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32(impl, dtype):
    g = torch.Generator().manual_seed(1)
    w, u = torch.rand(35, generator=g) + 0.1, torch.randn(35, generator=g)
    k, v = (torch.randn(2, 20, 35, generator=g).to(dtype) for _ in range(2))
    y, s = run(impl, w, u, k, v)
    assert y.dtype == dtype and s.a.dtype == torch.float32
    y_ref, _ = reference_wkv(w, u, k.double(), v.double())     # the same rounded inputs
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.double(), y_ref, rtol=2 * eps, atol=4 * eps)


def test_auto_falls_back_with_one_warning_when_no_kernel(monkeypatch):
    import importlib

    from rwkv_ref import kernel
    wkv_module = importlib.import_module("rwkv_ref.wkv")   # the module, not the function

    monkeypatch.setattr(kernel, "unavailable_reason", lambda name: "no compiler: install g++")
    monkeypatch.setattr(wkv_module, "_warned", set())
    w, u = torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64)
    k, v = torch.zeros(1, 6, 2, dtype=F64), torch.arange(12, dtype=F64).reshape(1, 6, 2)
    with pytest.warns(UserWarning, match="install g\\+\\+"):
        y, _ = wkv(w, u, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wkv(w, u, k, v)                                    # no second warning
    torch.testing.assert_close(y, reference_wkv(w, u, k, v)[0])


# ----------------------------------------------------------------------------- bad input


def _bad(**change):
    w, u = torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64)
    k, v = torch.zeros(2, 5, 3, dtype=F64), torch.zeros(2, 5, 3, dtype=F64)
    return dict(w=w, u=u, k=k, v=v, state=None, impl="logspace") | change


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
