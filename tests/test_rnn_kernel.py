"""The RNN-mode kernel (kernels/rnn_cpu.cpp, rwkv_ref.kernel.matvec / block_step) against the
PyTorch code it stands in for: ``F.linear`` and ``Block.step``."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from rwkv_ref import RWKVConfig, kernel
from rwkv_ref.testing import random_model
from rwkv_ref.state import LayerState, RWKVState
from rwkv_ref.wkv import WKVState

from test_kernel import require_kernel
from test_model import assert_close_rel, assert_states_close, configs, run_rnn, tokens


@pytest.fixture(autouse=True, scope="module")
def rnn_kernel():
    """Skip where no compiler is installed; a kernel that fails to build or to pass its
    self-check fails every test here."""
    require_kernel("rnn")


def torch_only(monkeypatch):
    """RNN mode on PyTorch ops only, for the rest of the test."""
    monkeypatch.setattr(kernel, "RNN_KERNEL", False)


@given(batch=st.integers(1, kernel.RNN_MAX_BATCH), n=st.integers(1, 70), k=st.integers(1, 140),
       bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_matvec_equals_linear(batch, n, k, bf16, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16 if bf16 else torch.float32)
    x = torch.randn(batch, k, generator=g)
    y = kernel.matvec(x, w)
    assert y.shape == (batch, n) and y.dtype == torch.float32
    expected = F.linear(x.double(), w.double())           # the exact sums of the same weights
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5 * k ** 0.5)


def test_matvec_returns_the_dtype_of_x():
    w = torch.randn(5, 9)
    x = torch.randn(2, 9).to(torch.bfloat16)
    y = kernel.matvec(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x.float(), w).bfloat16())


def test_matvec_rejects_bad_input():
    with pytest.raises(RuntimeError, match="expected x"):
        kernel.matvec(torch.randn(1, 4), torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernel.matvec(torch.randn(1, 4), torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="at most 16"):
        kernel.matvec(torch.randn(17, 4), torch.randn(3, 4))


def test_python_knows_how_many_rows_the_kernel_takes():
    """rnn_applies hands the kernel at most RNN_MAX_BATCH rows: the kernel's own limit."""
    assert kernel.extension("rnn").max_batch() == kernel.RNN_MAX_BATCH


def test_the_kernel_applies_only_to_inference_on_a_few_rows():
    w = torch.randn(6, 4)
    x = torch.randn(2, 4)
    assert kernel.rnn_applies(x, w)
    assert not kernel.rnn_applies(torch.randn(17, 4), w)                   # too many rows
    assert not kernel.rnn_applies(torch.randn(2, 3, 4), w)                 # GPT mode
    assert not kernel.rnn_applies(x, w.double())                           # float64
    assert not kernel.rnn_applies(x, w.t().contiguous().t())               # column-major
    assert not kernel.rnn_applies(x, w.requires_grad_())                   # autograd needs it
    with torch.no_grad():
        assert kernel.rnn_applies(x, w)


def random_state(model, batch, seed) -> RWKVState:
    """A state with every field populated: the state after a few random tokens."""
    idx = tokens(model.config, batch, 4, seed)
    with torch.no_grad():
        return model(idx)[1]


@given(cfg=configs(), batch=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_block_step_equals_the_python_block(cfg, batch, seed):
    model = random_model(cfg, seed=seed, dtype=torch.float32).eval()
    state = random_state(model, batch, seed)
    x = torch.randn(batch, cfg.n_embd, generator=torch.Generator().manual_seed(seed))
    block = model.blocks[-1]
    with torch.no_grad():
        assert block._kernel_applies(x)
        after_ln0 = block.ln0(x) if block.layer_id == 0 else x     # Block.step's first line
        got_x, got = block._kernel_step(after_ln0, state.layers[-1])
        kernel.RNN_KERNEL = False
        try:
            want_x, want = block.step(x, state.layers[-1])
        finally:
            kernel.RNN_KERNEL = True
    assert isinstance(got, LayerState) and isinstance(got.wkv, WKVState)
    assert_close_rel(got_x, want_x, 1e-5)
    assert_states_close(RWKVState((got,)), RWKVState((want,)), 1e-5)


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_rnn_mode_with_and_without_the_kernel(monkeypatch, dtype, rel):
    cfg = RWKVConfig(vocab_size=40, n_layer=3, n_embd=48, dim_att=32, dim_ffn=100,
                     wkv_impl="parallel")
    model = random_model(cfg, seed=3, dtype=dtype).eval()
    idx = tokens(cfg, 3, 12, seed=4)
    state = random_state(model, 3, seed=5)
    before = state.clone()
    with torch.no_grad():
        assert model.blocks[1]._kernel_applies(torch.zeros(3, 48, dtype=dtype))
        fast, fast_state = run_rnn(model, idx, state)
        torch_only(monkeypatch)
        slow, slow_state = run_rnn(model, idx, state)
    assert fast.dtype == slow.dtype == dtype
    assert_close_rel(fast.float(), slow.float(), rel)
    assert_states_close(fast_state.to(dtype=torch.float32), slow_state.to(dtype=torch.float32),
                        rel)
    for x, y in zip(state.layers[0].tensors(), before.layers[0].tensors()):
        assert torch.equal(x, y)                          # the given state is not modified


def test_gradients_still_flow_through_rnn_mode():
    cfg = RWKVConfig(vocab_size=20, n_layer=2, n_embd=16, wkv_impl="parallel")
    model = random_model(cfg, seed=6)
    _, state = model.step(torch.tensor([3, 4]))            # grad mode: PyTorch ops
    logits, _ = model.step(torch.tensor([1, 2]), state)    # (the decay acts from token 2 on)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad
               and p is not model.emb.weight)


# ----------------------------------------------------------------------------- self-check


def test_a_correct_rnn_kernel_passes_its_self_check_silently(monkeypatch):
    import warnings

    monkeypatch.setattr(kernel, "_verdicts", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel.unavailable_reason("rnn") is None       # its cost: make bench (selfcheck)


def _scaled(function, factor):
    def wrong(*args):
        out = function(*args)
        return [t * factor for t in out] if isinstance(out, list) else out * factor
    return wrong


@pytest.mark.parametrize("function, what", [("linear", "matvec"), ("block_step", "block_step")])
def test_a_wrong_rnn_kernel_is_disabled_and_rnn_mode_uses_torch_ops(monkeypatch, function,
                                                                     what):
    """A planted error (outputs 0.1% off): one warning naming what differed, then RNN mode
    runs on PyTorch ops, with the same results as with the kernel turned off."""
    import warnings

    ext = kernel.extension("rnn")
    monkeypatch.setattr(kernel, "_verdicts", {})
    monkeypatch.setattr(ext, function, _scaled(getattr(ext, function), 1.001))
    cfg = RWKVConfig(vocab_size=20, n_layer=2, n_embd=16, wkv_impl="parallel")
    model = random_model(cfg, seed=6).eval()
    token = torch.tensor([3, 4])
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match=f"rnn kernel gave wrong .*\\({what}") as record:
            logits, _ = model.step(token)
        assert len(record) == 1 and "RNN mode runs on PyTorch ops" in str(record[0].message)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not model.blocks[0]._kernel_applies(torch.zeros(2, 16))
            again, _ = model.step(token)
        torch_only(monkeypatch)
        want, _ = model.step(token)
    assert torch.equal(logits, want) and torch.equal(again, want)
