"""The compiled WKV kernel (kernels/, rwkv_ref.kernel) against the pure PyTorch variants.

Outputs and final states must equal ``wkv_logspace`` (the same algorithm) to rounding, and
``wkv_naive`` (eq. 14 as written) in float64 for moderate values; gradients w.r.t. every
input, the incoming state included, must equal autograd through ``wkv_logspace`` for losses
on y and on the outgoing state; ``gradcheck`` checks them against finite differences.
The first test to need the cpp kernel builds it (about a minute, once per source version).
"""
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

import rwkv_ref
from rwkv_ref import kernel
from rwkv_ref.wkv import WKVState, wkv_logspace, wkv_naive

KERNELS = Path(kernel.__file__).resolve().parent.parent / "kernels"

# Tolerances: max |kernel - reference| <= REL * max(1, max |reference|), per tensor. float64
# agrees to a few ulps of the largest value; float32 (against a float64 reference) to the
# rounding of float32 exponent differences, which grows with |k| and |u| (so the float32
# tolerance is multiplied by their spread where it is drawn).
REL = {torch.float64: 1e-11, torch.float32: 2e-5}


def require_kernel(name):
    """The extension of kernel ``name``. Skips only where this machine cannot build it at all
    (no C++ compiler, no GPU: ``kernel.missing_tool``); a kernel that fails to build or fails
    its self-check FAILS the test, so a broken kernel is never silently left out."""
    missing = kernel.missing_tool(name)
    if missing is not None:
        pytest.skip(f"{name} kernel cannot be built here: {missing}")
    reason = kernel.unavailable_reason(name)
    if reason is not None:
        pytest.fail(f"the {name} kernel is broken: {reason}")
    return kernel.extension(name)


def _cpp():
    return require_kernel("cpp")


def assert_close(actual, expected, rel, what=""):
    """max |actual - expected| <= rel * max(1, max |expected|); the message says by how much."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(1.0, expected.abs().max().item())
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:.1g} * {scale:.3g}"


def make_inputs(B, T, C, scale, seed, dtype, state_kind="empty"):
    """w, u, k, v and an incoming state: empty, carried over from a previous run, or arbitrary.

    w = exp(time_decay) is the POSITIVE decay rate; k and u have spread ``scale``.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    w = torch.exp(torch.empty(C, dtype=torch.float64).uniform_(-4, 2, generator=g))
    u, k, v = scale * randn(C), scale * randn(B, T, C), randn(B, T, C)
    state = WKVState.empty(B, C, dtype=torch.float64)
    if state_kind == "previous":       # the state a real earlier segment leaves behind
        _, state = wkv_logspace(w, u, scale * randn(B, 7, C), randn(B, 7, C), state)
    elif state_kind == "arbitrary":    # finite but not the canonical running maximum
        state = WKVState(randn(B, C), randn(B, C).abs() + 0.1, scale * randn(B, C))
    cast = [x.to(dtype) for x in (w, u, k, v)]
    return (*cast, state.to(dtype))


def run_cpp(w, u, k, v, state):
    """The cpp kernel through the public entry point's kernel call (autograd included)."""
    _cpp()
    return kernel.wkv_kernel("cpp", w, u, k, v, state)


shapes = st.tuples(
    st.integers(1, 3),                                                     # B
    st.one_of(st.integers(1, 40), st.integers(100, 320)),                  # T: 1, odd, 100s
    st.one_of(st.integers(1, 40), st.sampled_from([32, 33, 64, 257, 300])),  # C: blocks, jobs
)
states = st.sampled_from(["empty", "previous", "arbitrary"])


# ----------------------------------------------------------------------------- availability


def test_import_builds_nothing():
    """Importing rwkv_ref, or building a model, compiles and loads no extension."""
    code = ("import sys, rwkv_ref; from rwkv_ref import kernel; "
            "rwkv_ref.RWKV(rwkv_ref.RWKVConfig(vocab_size=5, n_layer=1, n_embd=4)); "
            "print(len(kernel._modules) + len(kernel._reasons), "
            "any(m.startswith('torch.utils.cpp_extension') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0 False"


def test_building_one_kernel_does_not_rename_another():
    """Each build's name hashes the flags; loading one kernel must not change them (torch's
    loader appends to the flag lists it is given), or the next kernel rebuilds under a new
    name in every process."""
    code = ("from rwkv_ref import kernel; before = kernel._build_name('rnn'); "
            "assert kernel.unavailable_reason('cpp') is None, 'cpp'; "
            "print(before == kernel._build_name('rnn'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_unavailable_reason_never_raises_and_explains():
    assert "unknown kernel" in kernel.unavailable_reason("fortran")
    if not torch.cuda.is_available():
        reason = kernel.unavailable_reason("cuda")
        assert reason is not None and "CUDA" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: impl='cuda' works")
def test_impl_cuda_without_gpu_raises_clear_error():
    w, u, k, v, _ = make_inputs(1, 3, 2, 1.0, 0, torch.float32)
    with pytest.raises(RuntimeError, match="CUDA"):
        rwkv_ref.wkv(w, u, k, v, impl="cuda")


def test_failed_build_reports_compiler_error(monkeypatch, tmp_path):
    """A source that does not compile gives a reason with the compiler's message, no raise."""
    src = tmp_path / "src"
    src.mkdir()
    for header in (f for f in kernel._SOURCES["cpp"] if f.endswith(".h")):
        (src / header).write_text("")
    (src / "wkv_cpu.cpp").write_text("#error deliberately broken for this test\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    monkeypatch.setattr(kernel, "KERNELS_DIR", src)
    monkeypatch.setattr(kernel, "_modules", {})
    monkeypatch.setattr(kernel, "_reasons", {})
    if kernel._missing_tool("cpp") is not None:
        pytest.skip(f"no toolchain: {kernel._missing_tool('cpp')}")
    reason = kernel.unavailable_reason("cpp")
    assert reason is not None and "deliberately broken" in reason
    with pytest.raises(RuntimeError, match="deliberately broken"):
        kernel.wkv_kernel("cpp", *make_inputs(1, 2, 2, 1.0, 0, torch.float32))


# ----------------------------------------------------------------------------- forward


@given(shape=shapes, scale=st.floats(0.1, 30.0), seed=st.integers(0, 2**16),
       state_kind=states, dtype=st.sampled_from([torch.float64, torch.float32]))
def test_forward_equals_logspace(shape, scale, seed, state_kind, dtype):
    """Outputs and final state equal wkv_logspace in float64 (float32: to its rounding)."""
    w, u, k, v, state = make_inputs(*shape, scale, seed, dtype, state_kind)
    y, out = run_cpp(w, u, k, v, state)
    to64 = [x.double() for x in (w, u, k, v)]
    y_ref, out_ref = wkv_logspace(*to64, state.to(torch.float64))
    rel = REL[dtype] * (1 if dtype == torch.float64 else max(1.0, scale))
    assert y.dtype == dtype and all(s.dtype == dtype for s in out)
    assert_close(y, y_ref, rel, "y")
    for name, a, b in zip("abp", out, out_ref):
        assert_close(a, b, rel, f"state.{name}")


@given(B=st.integers(1, 2), T=st.integers(1, 64), C=st.integers(1, 40),
       scale=st.floats(0.1, 3.0), seed=st.integers(0, 2**16), state_kind=states)
def test_forward_equals_naive_float64(B, T, C, scale, seed, state_kind):
    """Eq. 14 as written (explicit exponentials), where it does not overflow."""
    w, u, k, v, state = make_inputs(B, T, C, scale, seed, torch.float64, state_kind)
    y, out = run_cpp(w, u, k, v, state)
    y_ref, out_ref = wkv_naive(w, u, k, v, state)
    assert_close(y, y_ref, 1e-9, "y")
    # (a, b) are only defined relative to p: compare the sums num = a e^p, den = b e^p
    for name, i in (("num", 0), ("den", 1)):
        assert_close(out[i] * out.p.exp(), out_ref[i] * out_ref.p.exp(), 1e-9, name)
    assert_close(out.p, out_ref.p, 1e-12, "p")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channels_are_independent(dtype):
    """A channel's outputs and gradients do not depend on its neighbours: the CPU's 32-wide
    SIMD blocks (N = 32) give what a lone channel gives through the one-channel scan (N = 1),
    the code each GPU thread runs."""
    inputs = [*make_inputs(2, 45, 40, 2.0, 12, dtype, "previous")]
    inputs = inputs[:4] + list(inputs[4])
    y_full, out_full = run_cpp(*inputs[:4], WKVState(*inputs[4:]))
    rel = 1e-13 if dtype == torch.float64 else 1e-6
    for c in (0, 17, 31):   # inside the first full block of 32 channels
        alone = [x[..., c:c + 1] for x in inputs]
        y, out = run_cpp(*alone[:4], WKVState(*alone[4:]))
        assert_close(y, y_full[..., c:c + 1], rel, f"y[{c}]")
        for name, a, b in zip("abp", out, out_full):
            assert_close(a, b[..., c:c + 1], rel, f"state.{name}[{c}]")
    # gradients: a random elementwise loss, restricted to the lone channel for the second run
    g = torch.Generator().manual_seed(21)
    weights = [torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
               for x in (y_full, *out_full)]
    leaves = [x.clone().requires_grad_() for x in inputs]
    y, out = run_cpp(*leaves[:4], WKVState(*leaves[4:]))
    sum(((t * wt).sum() for t, wt in zip((y, *out), weights))).backward()
    for c in (0, 17, 31):
        sub = [x[..., c:c + 1].clone().requires_grad_() for x in inputs]
        y, out = run_cpp(*sub[:4], WKVState(*sub[4:]))
        sum(((t * wt[..., c:c + 1]).sum() for t, wt in zip((y, *out), weights))).backward()
        for name, x_all, x_one in zip("wukvabp", leaves, sub):
            assert_close(x_one.grad, x_all.grad[..., c:c + 1], rel, f"grad {name}[{c}]")


def test_outputs_fully_written():
    """No output or gradient element is left unwritten. With deterministic algorithms on,
    torch fills every tensor it allocates uninitialised (the kernel's ``at::empty_like``) with
    NaN, so an element the kernel forgets to write stays NaN (deterministic, unlike freeing
    NaN tensors and hoping the allocator hands them back). Odd sizes reach the SIMD tails."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.isnan(torch.empty(3)).all()             # the fill is on
        for B, T, C in [(2, 19, 45), (3, 33, 300), (1, 1, 1)]:
            w, u, k, v, state = make_inputs(B, T, C, 1.0, B + T + C, torch.float32, "previous")
            leaves = [x.clone().requires_grad_() for x in (w, u, k, v, *state)]
            y, out = run_cpp(*leaves[:4], WKVState(*leaves[4:]))
            loss = y.square().sum() + sum(s.sum() for s in out)
            loss.backward()
            for x in (y, *out, *(leaf.grad for leaf in leaves)):
                assert torch.isfinite(x).all()
    finally:
        torch.use_deterministic_algorithms(was)


# ----------------------------------------------------------------------------- gradients


def _grads(fn, inputs, seed, loss_kind):
    """Gradients of a random linear loss on y and/or the outgoing state w.r.t. all inputs."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    y, out = fn(*leaves[:4], WKVState(*leaves[4:]))
    g = torch.Generator().manual_seed(seed)

    def rand_like(x):
        return torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device, x.dtype)

    terms = {"y": [y], "state": list(out), "p": [out.p], "all": [y, *out]}[loss_kind]
    loss = sum((t * rand_like(t)).sum() for t in terms)
    return torch.autograd.grad(loss, leaves, allow_unused=True)


@given(shape=st.tuples(st.integers(1, 3), st.one_of(st.integers(1, 40), st.integers(100, 160)),
                       st.one_of(st.integers(1, 12), st.sampled_from([33, 64]))),
       scale=st.floats(0.1, 20.0), seed=st.integers(0, 2**16), state_kind=states,
       loss_kind=st.sampled_from(["all", "y", "state", "p"]))
def test_gradients_equal_autograd_through_logspace(shape, scale, seed, state_kind, loss_kind):
    """Every gradient (w, u, k, v, state a/b/p) equals autograd through wkv_logspace, for a
    loss on y, on the outgoing state, on p alone, or on all of them (float64)."""
    inputs = [*make_inputs(*shape, scale, seed, torch.float64, state_kind)]
    inputs = inputs[:4] + list(inputs[4])
    ours = _grads(run_cpp, inputs, seed + 1, loss_kind)
    ref = _grads(wkv_logspace, inputs, seed + 1, loss_kind)
    for name, a, b in zip(["w", "u", "k", "v", "a", "b", "p"], ours, ref):
        b = torch.zeros_like(inputs[0] if name in "wu" else a) if b is None else b
        assert_close(a, b, 1e-9, f"grad {name}")


@pytest.mark.parametrize("B,T,C", [(2, 5, 3), (1, 18, 33)])
def test_gradcheck_float64(B, T, C):
    """Finite differences agree with the hand-derived backward (finite incoming state): the
    whole Jacobian at the small shape; at the one that reaches the kernel's 32-channel SIMD
    block and a tail, gradcheck's fast mode (the Jacobian between random vectors, a hundredth
    of the time) at tolerances tight enough that one entry off by 0.1% fails it."""
    w, u, k, v, state = make_inputs(B, T, C, 1.5, 3, torch.float64, "arbitrary")

    def f(w, u, k, v, a, b, p):
        y, out = run_cpp(w, u, k, v, WKVState(a, b, p))
        return (y, *out)

    inputs = [x.clone().requires_grad_() for x in (w, u, k, v, *state)]
    if C > 8:
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-7, fast_mode=True)
    else:
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradients_float32_close_to_float64():
    """float32 gradients against the float64 kernel: within float32 rounding of the sums."""
    inputs64 = [*make_inputs(2, 150, 37, 3.0, 11, torch.float64, "previous")]
    inputs64 = inputs64[:4] + list(inputs64[4])
    inputs32 = [x.float() for x in inputs64]
    g64 = _grads(run_cpp, inputs64, 5, "all")
    g32 = _grads(run_cpp, inputs32, 5, "all")
    for name, a, b in zip("wukvabp", g32, g64):
        assert_close(a, b, 1e-4, f"grad {name}")


# ----------------------------------------------------------------------------- dtypes, range


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_match_float32(dtype):
    """bf16/fp16 inputs are computed in float32: same result as float32 on the same values."""
    w, u, k, v, _ = make_inputs(2, 50, 40, 2.0, 5, torch.float32)
    low = [x.to(dtype) for x in (w, u, k, v)]
    leaves = [x.clone().requires_grad_() for x in low]
    y, state = rwkv_ref.wkv(*leaves, impl="cpp")
    y_ref, state_ref = rwkv_ref.wkv(*(x.float() for x in low), impl="cpp")
    assert y.dtype == dtype and state.a.dtype == torch.float32
    assert_close(y.float(), y_ref, 1e-2, "y")            # y rounded back to bf16/fp16
    assert_close(state.a, state_ref.a, 1e-6, "state.a")  # the state stays float32
    y.float().sum().backward()
    for leaf in leaves:
        assert leaf.grad.dtype == dtype and torch.isfinite(leaf.grad.float()).all()


def test_large_exponents_float32_finite_and_correct():
    """|k|, |u| in the hundreds: naive overflows, the kernel stays finite and correct."""
    w, u, k, v, _ = make_inputs(2, 60, 20, 1.0, 9, torch.float32)
    g = torch.Generator().manual_seed(3)
    k = 300 * torch.randn(k.shape, generator=g)
    u = 300 * torch.randn(u.shape, generator=g)
    state = WKVState.empty(2, 20)
    inputs = [w, u, k, v, *state]
    y, out = run_cpp(w, u, k, v, state)
    y_naive, _ = wkv_naive(w, u, k, v, state)
    assert not torch.isfinite(y_naive).all()    # the test really is out of naive's range
    y_ref, out_ref = wkv_logspace(*(x.double() for x in (w, u, k, v)), state.to(torch.float64))
    # float32 exponent differences of size ~600 round to ~3e-5: weights are that accurate
    assert_close(y, y_ref, 2e-4, "y")
    # p ~ 1e3 after steps of pp - w, each rounded to float32 (~3e-5 at 1e3): T of them
    assert_close(out.p, out_ref.p, 1e-5, "p")
    g32 = _grads(run_cpp, inputs, 2, "all")
    g64 = _grads(run_cpp, [x.double() for x in inputs], 2, "all")
    for name, a, b in zip("wukvabp", g32, g64):
        assert_close(a, b, 1e-3, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_minus_infinity_is_the_empty_state(dtype):
    """p = -inf (book/design.md, section "The WKV state", allows it) behaves as the finite
    EMPTY_P: same y, state, grads."""
    w, u, k, v, empty = make_inputs(2, 20, 35, 2.0, 8, dtype)
    inf_state = WKVState(empty.a, empty.b, torch.full_like(empty.p, -math.inf))
    inputs = [w, u, k, v]
    g_inf = _grads(run_cpp, inputs + list(inf_state), 3, "all")
    g_fin = _grads(run_cpp, inputs + list(empty), 3, "all")
    (y_inf, s_inf), (y_fin, s_fin) = (rwkv_ref.wkv(w, u, k, v, s, impl="cpp")
                                      for s in (inf_state, empty))
    assert torch.equal(y_inf, y_fin) and all(map(torch.equal, s_inf, s_fin))
    for name, a, b in zip("wukvabp", g_inf, g_fin):
        assert_close(a, b, 0.0, f"grad {name}")


def test_state_hand_off_between_kernel_and_logspace():
    """The kernel's state continues in logspace and the other way round."""
    w, u, k, v, state = make_inputs(2, 60, 35, 2.0, 4, torch.float64)
    y_full, out_full = wkv_logspace(w, u, k, v, state)
    y1, mid = run_cpp(w, u, k[:, :25], v[:, :25], state)
    y2, out = wkv_logspace(w, u, k[:, 25:], v[:, 25:], mid)
    assert_close(torch.cat([y1, y2], 1), y_full, 1e-11, "kernel then logspace")
    _, mid = wkv_logspace(w, u, k[:, :25], v[:, :25], state)
    y2, out = run_cpp(w, u, k[:, 25:], v[:, 25:], mid)
    assert_close(y2, y_full[:, 25:], 1e-11, "logspace then kernel")
    for a, b in zip(out, out_full):
        assert_close(a, b, 1e-11, "final state")


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: the CUDA kernel cannot run")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_logspace(dtype):
    """On a GPU: outputs, state and every gradient of impl='cuda' equal wkv_logspace."""
    reason = kernel.unavailable_reason("cuda")
    assert reason is None, reason
    inputs = [*make_inputs(3, 150, 300, 3.0, 6, dtype, "previous")]
    inputs = inputs[:4] + list(inputs[4])

    def on_gpu(w, u, k, v, state):
        return kernel.wkv_kernel("cuda", w, u, k, v, state)

    gpu = _grads(on_gpu, [x.cuda() for x in inputs], 4, "all")
    ref = _grads(wkv_logspace, [x.double() for x in inputs], 4, "all")
    y, out = on_gpu(*(x.cuda() for x in inputs[:4]), WKVState(*(x.cuda() for x in inputs[4:])))
    y_ref, out_ref = wkv_logspace(*(x.double() for x in inputs[:4]),
                                  WKVState(*(x.double() for x in inputs[4:])))
    rel = 1e-11 if dtype == torch.float64 else 1e-4
    for name, a, b in zip(["y", "a", "b", "p"], (y, *out), (y_ref, *out_ref)):
        assert_close(a.cpu(), b, rel, name)
    for name, a, b in zip("wukvabp", gpu, ref):
        assert_close(a.cpu(), b, 1e-9 if dtype == torch.float64 else 1e-3, f"grad {name}")



def _nvcc_arch(nvcc):
    """An -arch the installed nvcc supports: sm_80 if it can, else its oldest."""
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    archs = [a.replace("compute_", "sm_") for a in listed.split()]
    return "sm_80" if "sm_80" in archs or not archs else archs[0]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: cannot compile "
                    "kernels/wkv_cuda.cu (install the CUDA toolkit to run this check)")
def test_cuda_source_compiles(tmp_path):
    """kernels/wkv_cuda.cu compiles with nvcc alone (no torch headers, no GPU needed)."""
    nvcc = shutil.which("nvcc")
    out = subprocess.run([nvcc, "-c", str(KERNELS / "wkv_cuda.cu"), "-o",
                          str(tmp_path / "wkv_cuda.o"), f"-arch={_nvcc_arch(nvcc)}", "-O3"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "wkv_cuda.o").stat().st_size > 0


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: cannot compile "
                    "kernels/wkv_cuda_bind.cpp (install the CUDA toolkit to run this check)")
def test_cuda_binding_compiles_against_torchs_headers(tmp_path):
    """kernels/wkv_cuda_bind.cpp (the CUDA kernel's torch side) passes the compiler with this
    torch's headers, on a machine without a GPU or a CUDA build of torch (syntax only: nothing
    is linked). A CPU build of torch ships the c10/cuda headers but not the one that its CMake
    generates, so an empty stand-in is put on the include path."""
    from torch.utils import cpp_extension

    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    includes = [f"-I{d}" for d in (*cpp_extension.include_paths(), tmp_path, KERNELS)]
    out = subprocess.run([shutil.which("nvcc"), "-std=c++20", "-Xcompiler", "-fsyntax-only",
                          "-c", str(KERNELS / "wkv_cuda_bind.cpp"), "-o", str(tmp_path / "x.o"),
                          "-DTORCH_EXTENSION_NAME=rwkv_ref_cuda_check", *includes],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


# ----------------------------------------------------------------------------- self-check


def test_auto_picks_the_verified_cpp_kernel():
    """Where a compiler exists, GPT mode on the CPU runs the cpp kernel (not a silent
    fallback), after its self-check passed on the CPU."""
    require_kernel("cpp")
    from rwkv_ref.wkv import _auto_impl

    assert _auto_impl(torch.device("cpu")) == "cpp"
    assert kernel._verdicts[("cpp", "cpu")] is None


def fresh_checks(monkeypatch):
    """Forget every self-check verdict and warning for the rest of the test."""
    import importlib

    monkeypatch.setattr(kernel, "_verdicts", {})
    monkeypatch.setattr(importlib.import_module("rwkv_ref.wkv"), "_warned", set())


def test_a_correct_kernel_passes_its_self_check_silently(monkeypatch):
    import warnings

    require_kernel("cpp")
    fresh_checks(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel.unavailable_reason("cpp") is None       # its cost: make bench (selfcheck)


def _off_by_a_little(function, which):
    """``function`` with one element of its output number ``which`` changed by 1% of that
    output's scale (ten times the self-check's tolerance)."""
    def wrong(*args):
        out = list(function(*args))
        out[which] = out[which].clone()
        out[which].view(-1)[3] += 1e-2 * max(1.0, out[which].abs().max().item())
        return out
    return wrong


@pytest.mark.parametrize("function, which, what", [
    ("forward", 0, "y"), ("forward", 3, "state.p"), ("backward", 0, "grad w"),
    ("backward", 2, "grad k"), ("backward", 6, "grad p")])
def test_a_wrong_kernel_is_disabled_with_one_warning(monkeypatch, function, which, what):
    """A planted error in one output of the extension: impl='auto' warns once, naming what
    differed and how to report it, and falls back to 'parallel'; impl='cpp' raises."""
    import warnings

    ext = require_kernel("cpp")
    fresh_checks(monkeypatch)
    monkeypatch.setattr(ext, function, _off_by_a_little(getattr(ext, function), which))
    w, u, k, v, _ = make_inputs(2, 7, 5, 1.0, 0, torch.float32)
    with pytest.warns(RuntimeWarning, match=f"self-check on cpu \\({what}:") as record:
        y, _ = rwkv_ref.wkv(w, u, k, v)
    assert len(record) == 1 and "report" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # no second warning
        y_again, _ = rwkv_ref.wkv(w, u, k, v)
    torch.testing.assert_close(y, rwkv_ref.wkv(w, u, k, v, impl="parallel")[0])
    torch.testing.assert_close(y_again, y)
    with pytest.raises(RuntimeError, match="self-check"):
        rwkv_ref.wkv(w, u, k, v, impl="cpp")


def test_results_do_not_depend_on_the_thread_count():
    """make test runs one thread per pytest worker: this test puts the kernel's threads back
    to work (jobs handed out from a shared counter) on an input big enough to be split, and
    holds the result to the single-threaded one, bit for bit."""
    g = torch.Generator().manual_seed(3)
    B, T, C = 4, 256, 70                                  # 4 rows x (2 blocks + 6 channels)
    w, u = torch.rand(C, generator=g) + 0.1, torch.randn(C, generator=g)
    k, v = torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g)
    gy = torch.randn(B, T, C, generator=g)

    def run():
        leaves = [t.clone().requires_grad_() for t in (w, u, k, v)]
        y, state = rwkv_ref.wkv(*leaves, impl="cpp")
        grads = torch.autograd.grad((y * gy).sum() + state.a.sum(), leaves)
        return [y, *state, *grads]

    assert_same_on_one_and_two_threads(run)


def assert_same_on_one_and_two_threads(run) -> None:
    """``run()`` (a list of tensors) gives bit-identical results on one thread and on two."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
