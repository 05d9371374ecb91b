"""The fused mixing-block ops (kernels/ops_cpu.cpp, rwkv_ref.ops) against the PyTorch lines
they stand in for, and against numerical derivatives (gradcheck), and a whole training step of
the model with and without them."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rwkv_ref import RWKVConfig, kernel, ops
from rwkv_ref.testing import random_model

from strategies import channels, grid
from test_kernel import assert_same_on_one_and_two_threads, require_kernel


@pytest.fixture(autouse=True, scope="module")
def ops_kernel():
    """Skip where no compiler is installed; a kernel that fails to build or to pass its
    self-check fails every test here."""
    require_kernel("ops")


def plain_only(monkeypatch):
    monkeypatch.setattr(ops, "OPS_KERNEL", False)


@st.composite
def mixes_problem(draw):
    """x, x_prev (rows, C) and M = 2 or 3 mus (1, 1, C) in [0, 1], float64, as values."""
    rows, C, M = draw(st.integers(1, 6)), draw(channels), draw(st.sampled_from([2, 3]))
    x, x_prev = draw(grid((rows, C), -3, 3)), draw(grid((rows, C), -3, 3))
    mus = [draw(grid((1, 1, C), 0, 1)) for _ in range(M)]
    return x, x_prev, mus


@given(mixes_problem())
def test_mixes_equal_lerp_outputs_and_gradients(problem):
    x, x_prev, mus = problem
    for t in (x, x_prev, *mus):
        t.requires_grad_()
    fused = ops.mixes(x, x_prev, *mus)
    assert ops._applies(x, x_prev, *mus)
    weights = [torch.linspace(-1, 2, x.numel(), dtype=x.dtype).view_as(x) * (m + 1)
               for m in range(len(mus))]
    loss = sum((o * w).sum() for o, w in zip(fused, weights))
    got = torch.autograd.grad(loss, [x, x_prev, *mus])
    for out, mu in zip(fused, mus):                   # the definition, written out
        torch.testing.assert_close(out, mu.reshape(-1) * x + (1 - mu.reshape(-1)) * x_prev,
                                   rtol=1e-12, atol=1e-12)
    # gradients, independently: d/dx = sum w mu, d/dx_prev = sum w (1-mu), d/dmu = sum w (x-x')
    mu_rows = [m.reshape(-1) for m in mus]
    torch.testing.assert_close(got[0], sum(w * m for w, m in zip(weights, mu_rows)))
    torch.testing.assert_close(got[1], sum(w * (1 - m) for w, m in zip(weights, mu_rows)))
    for g, w, m in zip(got[2:], weights, mus):
        torch.testing.assert_close(g, (w * (x - x_prev)).sum(0).reshape(m.shape))


@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 5), channels))
def test_mixes_and_relu_square_pass_gradcheck(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x, x_prev = (torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
                 for _ in range(2))
    mus = [torch.rand(1, 1, shape[-1], generator=g, dtype=torch.float64, requires_grad=True)
           for _ in range(3)]
    # Past 64 elements, the Jacobian between random vectors (fast mode, a tenth of the time) at
    # tolerances tight enough that one entry off by 0.1% fails it; below, the whole Jacobian.
    tol = dict(fast_mode=True, atol=1e-8, rtol=1e-7) if x.numel() > 64 else {}
    assert torch.autograd.gradcheck(lambda *t: ops.mixes(*t), (x, x_prev, *mus), **tol)
    assert torch.autograd.gradcheck(lambda *t: ops.mixes(*t), (x, x_prev, *mus[:2]), **tol)
    # relu² has a kink at 0: keep the inputs away from it for the finite differences
    y = (x.detach().sign() * (0.1 + x.detach().abs())).requires_grad_()
    assert torch.autograd.gradcheck(ops.relu_square, (y,), **tol)


def test_relu_square_is_zero_below_zero_and_the_square_above():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0], requires_grad=True)
    y = ops.relu_square(x)
    assert y.tolist() == [0.0, 0.0, 0.0, 0.25, 9.0]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 1.0, 6.0]


def test_fused_ops_apply_only_to_eager_cpu_training():
    x = torch.randn(2, 3, 8, requires_grad=True)
    mu = torch.rand(1, 1, 8, requires_grad=True)
    assert ops._applies(x, x, mu)
    with torch.no_grad():
        assert not ops._applies(x, x, mu)                  # inference: the PyTorch lines
    assert not ops._applies(x.detach(), x.detach(), mu.detach())
    assert not ops._applies(x.bfloat16(), x.bfloat16(), mu.bfloat16())
    assert not ops._applies(x.transpose(0, 1), x.transpose(0, 1), mu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ops._applies(x, x, mu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_training_step_with_the_fused_ops_equals_one_without(dtype, monkeypatch):
    config = RWKVConfig(vocab_size=23, n_layer=2, n_embd=40, dim_att=36, dim_ffn=72,
                        wkv_impl="logspace")
    idx = torch.randint(23, (3, 9), generator=torch.Generator().manual_seed(0))

    def step():
        model = random_model(config, seed=1, dtype=dtype)
        logits, _ = model(idx)
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters()}

    calls = []
    real = ops._mixes
    monkeypatch.setattr(ops, "_mixes", lambda *a: calls.append(1) or real(*a))
    fused = step()
    assert len(calls) == 2 * config.n_layer                    # both blocks of every layer
    plain_only(monkeypatch)
    plain = step()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(fused[0], plain[0], rtol=tol, atol=tol)
    for name, grad in plain[1].items():
        torch.testing.assert_close(fused[1][name], grad, rtol=tol, atol=tol, msg=name)


def test_the_self_check_catches_a_wrong_kernel(monkeypatch):
    ext = kernel.extension("ops")

    class Wrong:
        def __getattr__(self, name):
            return getattr(ext, name)

        def mixes_backward(self, x, x_prev, mu, grads):        # the sign of d/dmu flipped
            gx, gp, gmu = ext.mixes_backward(x, x_prev, mu, grads)
            return gx, gp, -gmu

    monkeypatch.setattr(kernel, "_modules", {**kernel._modules, "ops": Wrong()})
    problem = ops._self_check("cpu")
    assert problem is not None and "mixes" in problem and "gradient" in problem


def test_the_training_benchmark_times_rwkv_with_and_without_the_fused_ops(capsys):
    from benchmarks import bench_train

    bench_train.throughput(shapes=((1, 8, 8),), modes=("eager",))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("1x8")]
    assert [row.split("|")[0].split()[-1] for row in rows] == ["eager", "ops"], rows
    assert ops.OPS_KERNEL                              # switched back on after the bench


def test_the_training_benchmark_times_each_models_layer_products(capsys):
    """RWKV's block has 7 matrix products holding 13 C² weights, the GPT's 4 holding 12 C²
    (qkv 3 C², the projection C², the MLP 8 C²)."""
    from benchmarks import bench_train

    bench_train.layer_products(n_embd=16, tokens=8)
    out = capsys.readouterr().out
    assert "rwkv: 7 products, 13 C^2 weights" in out and "gpt: 4 products, 12 C^2" in out, out
    assert "1.083x the weights" in out, out


def test_results_do_not_depend_on_the_thread_count():
    """make test runs one thread per pytest worker: here the ops run on two threads (their
    rows split into chunks) against one, bit for bit; the mu gradient is summed per chunk, and
    the chunks do not depend on the thread count."""
    g = torch.Generator().manual_seed(4)
    x, x_prev = (torch.randn(16, 64, 70, generator=g) for _ in range(2))   # 2 chunks
    mus = [torch.rand(1, 1, 70, generator=g) for _ in range(3)]
    weights = [torch.randn(16, 64, 70, generator=g) for _ in range(3)]

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, x_prev, *mus)]
        outs = ops.mixes(*leaves)
        hidden = ops.relu_square(outs[0])
        loss = sum((o * w).sum() for o, w in zip(outs, weights)) + (hidden * weights[1]).sum()
        return [*outs, hidden, *torch.autograd.grad(loss, leaves)]

    assert_same_on_one_and_two_threads(run)
