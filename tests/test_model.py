"""The model: its initialisation, GPT mode = RNN mode, state hand-off, validation.

Random weights (``random_model``) everywhere except the init tests: the initialisation zeros
five matrices per block, which would make most equalities trivial. Values against the
official package and transformers are in test_convert.py; here, properties: GPT mode = RNN
mode, a split run = one run, every WKV variant gives the same logits, rows are independent.
Shapes (``strategies.configs``) reach n_embd 33..40, past the rnn kernel's SIMD main loops.
"""
import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rwkv_ref import RWKV, RWKVConfig, RWKVState
from rwkv_ref.testing import random_model
from strategies import configs, models_and_tokens, runnable_variants  # noqa: F401 (configs:
# test_rnn_kernel.py imports it from here)


def tokens(cfg, batch, length, seed):
    """(batch, length) token ids from a seeded generator, for the example-based tests."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=g)


def run_rnn(model, idx, state=None):
    """Logits (B, T, V) of RNN mode, one ``step`` per token, and the final state."""
    outs = []
    for t in range(idx.shape[1]):
        logits, state = model.step(idx[:, t], state)
        outs.append(logits)
    return torch.stack(outs, dim=1), state


def assert_close_rel(actual, expected, rel=1e-4):
    """max |actual - expected| <= rel * max |expected| (a relative error on the whole tensor)."""
    scale = expected.abs().max().clamp(min=1.0)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} * {scale:.3g}"


def assert_states_close(s1: RWKVState, s2: RWKVState, rel=1e-4):
    """Two states equal: shifts directly, WKV sums as num = a e^p and den = b e^p.

    The a, b, p representation is not unique where the exponents are equal up to rounding,
    so the sums are compared relative to the larger of the two exponents.
    """
    assert s1.n_layer == s2.n_layer and s1.batch_size == s2.batch_size
    for l1, l2 in zip(s1.layers, s2.layers):
        assert_close_rel(l1.att_x, l2.att_x, rel)
        assert_close_rel(l1.ffn_x, l2.ffn_x, rel)
        p = torch.maximum(l1.wkv.p, l2.wkv.p)
        for x1, x2 in ((l1.wkv.a, l2.wkv.a), (l1.wkv.b, l2.wkv.b)):
            assert_close_rel(x1 * torch.exp(l1.wkv.p - p), x2 * torch.exp(l2.wkv.p - p), rel)


# ----------------------------------------------------------------------------- config


def test_config_defaults_and_validation():
    cfg = RWKVConfig(vocab_size=65, n_layer=4, n_embd=256)
    assert (cfg.dim_att, cfg.dim_ffn) == (256, 1024)
    for bad in (dict(n_layer=0), dict(n_embd=-1), dict(vocab_size=2.5), dict(dim_ffn=0),
                dict(wkv_impl="fast")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RWKVConfig(**{**dict(vocab_size=65, n_layer=4, n_embd=256), **bad})


# ----------------------------------------------------------------------------- init


@pytest.fixture(scope="module")
def init_model():
    torch.manual_seed(0)
    return RWKV(RWKVConfig(vocab_size=97, n_layer=4, n_embd=48, dim_att=40, wkv_impl="parallel"))


def test_init_time_decay(init_model):
    decays = torch.stack([b.att.time_decay.detach() for b in init_model.blocks])   # (L, A)
    # every layer spans -5 (channel 0: w = e^-5, the longest memory) to 3, rising across channels
    torch.testing.assert_close(decays[:, 0], torch.full((4,), -5.0))
    torch.testing.assert_close(decays[:, -1], torch.full((4,), 3.0))
    assert bool((decays.diff(dim=1) > 0).all())
    # deeper layers have a larger exponent: interior channels decay slower (lower values)
    assert bool((decays[1:, 1:-1] < decays[:-1, 1:-1]).all())


def test_init_time_first(init_model):
    for block in init_model.blocks:
        u = block.att.time_first.detach()
        levels = {round(x, 5) for x in u.tolist()}
        assert levels == {round(math.log(0.3) + z, 5) for z in (-0.5, 0.0, 0.5)}
        torch.testing.assert_close(u[3:], u[:-3])             # period 3 across channels


def test_init_mixes(init_model):
    L, C = init_model.config.n_layer, init_model.config.n_embd
    for i, block in enumerate(init_model.blocks):
        att, ffn = block.att, block.ffn
        k, v, r = (m.detach().flatten() for m in (att.time_mix_k, att.time_mix_v, att.time_mix_r))
        assert k[0] == 0 and bool((k.diff() > 0).all()) and bool((k < 1).all())
        assert bool((r >= k).all()) and bool((r.diff() > 0).all())   # d^(e/2) >= d^e on [0, 1)
        # v is k shifted by a constant that grows from 0 (first layer) to 0.3 (last layer)
        torch.testing.assert_close(v - k, torch.full((C,), 0.3 * i / (L - 1)))
        torch.testing.assert_close(ffn.time_mix_k.detach().flatten(), k)
        torch.testing.assert_close(ffn.time_mix_r.detach().flatten(), k)
    # the first layer mixes linearly in the channel index: k = j / C
    first = init_model.blocks[0].att.time_mix_k.detach().flatten()
    torch.testing.assert_close(first, torch.arange(C) / C)
    # deeper layers take more of the current token at every channel
    ks = torch.stack([b.att.time_mix_k.detach().flatten() for b in init_model.blocks])
    assert bool((ks[1:, 1:] > ks[:-1, 1:]).all())


# The official RWKV-4 initialisation (RWKV-LM, RWKV-v4 model.py), stated once as facts:
# five matrices per block start at zero; the others are orthogonal with gain
# sqrt(rows / cols) when rows > cols, else 1; the head has gain 0.5 * sqrt(V / C) when V > C,
# else 0.5. For init_model (V = 97, C = 48, A = 40, F = 4 C = 192) that is:
OFFICIAL_ZERO = ("att.key", "att.receptance", "att.output", "ffn.value", "ffn.receptance")
OFFICIAL_GAINS = {"att.value": 1.0,                  # (40, 48): rows <= cols
                  "ffn.key": 2.0,                    # (192, 48): sqrt(192 / 48)
                  "head": 0.5 * math.sqrt(97 / 48)}  # (97, 48)


def assert_orthogonal_with_gain(weight, gain, name):
    """All singular values of an (out, in) matrix equal ``gain``: W W^T = gain^2 I (out <= in)
    or W^T W = gain^2 I (out > in), which is what an orthogonal init with that gain means."""
    s = torch.linalg.svdvals(weight.detach().double())
    assert s.numel() == min(weight.shape), name
    torch.testing.assert_close(s, torch.full_like(s, gain), rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"{name}: {m}")


def test_init_matrices(init_model):
    m = init_model
    assert (m.config.vocab_size, m.config.n_embd, m.config.dim_att, m.config.dim_ffn) == (
        97, 48, 40, 192)                              # the shapes the gains above are for
    for i, block in enumerate(m.blocks):
        for name in OFFICIAL_ZERO:
            weight = block.get_submodule(name).weight
            assert bool((weight == 0).all()), f"blocks.{i}.{name}"
        for name in ("att.value", "ffn.key"):
            assert_orthogonal_with_gain(block.get_submodule(name).weight, OFFICIAL_GAINS[name],
                                        f"blocks.{i}.{name}")
    assert_orthogonal_with_gain(m.head.weight, OFFICIAL_GAINS["head"], "head")
    emb = m.emb.weight.detach()
    assert emb.abs().max() <= 1e-4 and emb.std() > 1e-5        # official: U(-1e-4, 1e-4)
    for name, p in m.named_parameters():
        if ".ln" in name or name.startswith("ln_out"):
            assert bool((p == (1.0 if name.endswith("weight") else 0.0)).all()), name


def test_init_head_gain_when_vocab_small():
    torch.manual_seed(1)
    m = RWKV(RWKVConfig(vocab_size=5, n_layer=1, n_embd=16, wkv_impl="parallel"))
    assert_orthogonal_with_gain(m.head.weight, 0.5, "head")    # V <= C: the official 0.5


def test_init_single_layer_is_finite():
    m = RWKV(RWKVConfig(vocab_size=11, n_layer=1, n_embd=8, wkv_impl="parallel"))
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
    att = m.blocks[0].att
    torch.testing.assert_close(att.time_mix_v, att.time_mix_k)              # r01 = 0
    torch.testing.assert_close(att.time_mix_k.flatten(), torch.arange(8) / 8)


def test_init_blocks_start_as_identity():
    # with att.output and ffn.value zero, the logits at t depend only on the token at t
    torch.manual_seed(2)
    m = RWKV(RWKVConfig(vocab_size=13, n_layer=2, n_embd=16, wkv_impl="parallel"))
    idx = tokens(m.config, 1, 9, seed=3)
    logits, _ = m(idx)
    alone, _ = m(idx.reshape(-1, 1))                                        # (9, 1, V)
    torch.testing.assert_close(logits[0], alone[:, 0])


# ----------------------------------------------------------------------------- GPT = RNN


@given(problem=models_and_tokens())
def test_gpt_mode_equals_rnn_mode(problem):
    cfg, seed, idx = problem
    batch, length = idx.shape
    model = random_model(cfg, seed=seed)
    with torch.no_grad():
        gpt, gpt_state = model(idx)
        rnn, rnn_state = run_rnn(model, idx)
    assert gpt.shape == (batch, length, cfg.vocab_size)
    assert_close_rel(rnn, gpt)
    assert_states_close(rnn_state, gpt_state)


@given(problem=models_and_tokens(batch=(2, 2), length=(2, 14)), data=st.data())
def test_split_and_carry_equals_one_run(problem, data):
    cfg, seed, idx = problem
    model = random_model(cfg, seed=seed)
    cut = data.draw(st.integers(1, idx.shape[1] - 1), label="cut")
    with torch.no_grad():
        whole, whole_state = model(idx)
        first, state = model(idx[:, :cut])
        second, state = model(idx[:, cut:], state)
        # and GPT mode for the prefix, RNN mode for the rest
        rnn, rnn_state = run_rnn(model, idx[:, cut:], model(idx[:, :cut])[1])
    assert_close_rel(torch.cat([first, second], dim=1), whole)
    assert_close_rel(rnn, whole[:, cut:])
    assert_states_close(state, whole_state)
    assert_states_close(rnn_state, whole_state)


def gpt_mode(model, idx, impl, state=None):
    """``model(idx, state)`` with WKV variant ``impl``; "cuda" runs a copy on the GPU."""
    if impl == "cuda":
        gpu = copy.deepcopy(model).cuda()
        gpu.config.wkv_impl = impl
        logits, out = gpu(idx.cuda(), None if state is None else state.to("cuda"))
        return logits.cpu(), out.to("cpu")
    model.config.wkv_impl = impl
    return model(idx, state)


@given(problem=models_and_tokens(batch=(1, 2), length=(1, 40)))
def test_every_wkv_variant_gives_the_same_logits(problem):
    """Every registered variant (``strategies.runnable_variants``: WKV_IMPLS, "cuda" only
    with a GPU), the float64 model with ``logspace`` as the reference."""
    cfg, seed, idx = problem
    model = random_model(cfg, seed=seed)
    ref = random_model(cfg, seed=seed, dtype=torch.float64)
    with torch.no_grad():
        ref_logits, ref_state = gpt_mode(ref, idx, "logspace")
        for impl in runnable_variants():
            logits, state = gpt_mode(model, idx, impl)
            assert_close_rel(logits.double(), ref_logits)
            assert_states_close(state, ref_state)


@given(problem=models_and_tokens(batch=(3, 3), length=(1, 10)))
def test_batch_rows_are_independent(problem):
    cfg, seed, idx = problem
    model = random_model(cfg, seed=seed)
    with torch.no_grad():
        batched, state = model(idx)
        step_batched, _ = model.step(idx[:, 0], state)
        for row in range(3):
            alone, alone_state = model(idx[row:row + 1])
            assert_close_rel(batched[row:row + 1], alone)
            assert_states_close(state.select(row), alone_state)
            step_alone, _ = model.step(idx[row:row + 1, 0], alone_state)
            assert_close_rel(step_batched[row:row + 1], step_alone)


def test_a_state_can_seed_two_continuations():
    cfg = RWKVConfig(vocab_size=20, n_layer=2, n_embd=8, wkv_impl="parallel")
    model = random_model(cfg, seed=5)
    idx = tokens(cfg, 2, 12, seed=6)
    with torch.no_grad():
        _, state = model(idx[:, :5])
        before = state.clone()
        a1, _ = model(idx[:, 5:])
        b1, _ = model(idx[:, 5:], state)                     # GPT mode from the state
        c1, _ = model.step(idx[:, 5], state)                 # RNN mode from the same state
        b2, _ = model(idx[:, 5:], state)                     # again: the same result
        c2, _ = model.step(idx[:, 5], state)
        whole, _ = model(idx)
    for t1, t2 in zip(before.layers, state.layers):          # nothing changed in place
        for x, y in zip(t1.tensors(), t2.tensors()):
            assert torch.equal(x, y)
    assert torch.equal(b1, b2) and torch.equal(c1, c2)
    assert_close_rel(b1, whole[:, 5:])
    assert_close_rel(c1, whole[:, 5])
    assert not torch.allclose(a1, b1)                        # the state did matter


def _drift(n_tokens: int):
    """Float32 RNN-mode logits against a float64 GPT-mode reference over n_tokens tokens.

    Returns: the max error over the first and over the last 10% of the positions.
    """
    cfg = RWKVConfig(vocab_size=7, n_layer=2, n_embd=8, wkv_impl="parallel")
    model = random_model(cfg, seed=7)
    for block in model.blocks:                 # some channels remember ~3000 tokens
        with torch.no_grad():
            block.att.time_decay[::2] = -8.0
    ref = random_model(cfg, seed=7, dtype=torch.float64)
    ref.load_state_dict(model.state_dict())
    idx = tokens(cfg, 1, n_tokens, seed=8)
    with torch.no_grad():
        expected, _ = ref(idx)
        gpt32, _ = model(idx)
        rnn32, _ = run_rnn(model, idx)
    err = (rnn32.double() - expected).abs().amax(dim=(0, 2))          # (T,)
    gpt_err = (gpt32.double() - expected).abs().max()
    scale = expected.abs().max()
    tenth = n_tokens // 10
    return err[:tenth].max() / scale, err[-tenth:].max() / scale, gpt_err / scale


@pytest.mark.parametrize("n_tokens", [
    2_000, pytest.param(10_000, marks=pytest.mark.slow)])   # 10_000: ~30 s on a busy core
def test_rnn_mode_does_not_drift(n_tokens):
    early, late, gpt = _drift(n_tokens)
    # float32 rounding: ~1e-7 per operation, a few hundred operations deep
    assert late < 1e-5 and gpt < 1e-5, (early, late, gpt)
    assert late < 10 * early + 1e-6, (early, late)


# ----------------------------------------------------------------------------- validation


@pytest.fixture(scope="module")
def small():
    return random_model(RWKVConfig(vocab_size=10, n_layer=2, n_embd=4, wkv_impl="parallel"),
                        seed=9)


@pytest.mark.parametrize("idx, message", [
    (torch.tensor([[1, 10]]), r"\[0, 10\)"),
    (torch.tensor([[-1, 2]]), r"\[0, 10\)"),
    (torch.tensor([1, 2]), r"shape \(B, T\)"),
    (torch.zeros(1, 2, 3, dtype=torch.long), r"shape \(B, T\)"),
    (torch.zeros(1, 0, dtype=torch.long), "non-empty"),
    (torch.tensor([[1.0, 2.0]]), "integer"),
    ([[1, 2]], "torch.Tensor"),
])
def test_forward_rejects_bad_tokens(small, idx, message):
    with pytest.raises(ValueError, match=message):
        small(idx)


def test_step_rejects_bad_tokens(small):
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        small.step(torch.tensor([[1]]))
    with pytest.raises(ValueError, match="vocab_size"):
        small.step(torch.tensor([10]))


def test_forward_rejects_bad_states(small):
    _, state = small(torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="batch size"):
        small(torch.tensor([[1, 2]]), state)
    with pytest.raises(ValueError, match="batch size"):
        small.step(torch.tensor([1, 2, 3]), state)
    with pytest.raises(ValueError, match="layers"):
        small(torch.tensor([[1], [2]]), RWKVState(state.layers[:1]))
    with pytest.raises(ValueError, match="RWKVState"):
        small(torch.tensor([[1]]), [t for layer in state.layers for t in layer.tensors()])
    other = random_model(RWKVConfig(vocab_size=10, n_layer=2, n_embd=6, wkv_impl="parallel"))
    with pytest.raises(ValueError, match="att_x"):
        other(torch.tensor([[1, 2], [3, 4]]), state)


# ----------------------------------------------------------------------------- state helpers


def test_state_helpers(small):
    idx = tokens(small.config, 3, 5, seed=10)
    with torch.no_grad():
        _, state = small(idx)
        parts = state.split()
        assert [p.batch_size for p in parts] == [1, 1, 1]
        joined = RWKVState.cat(parts)
        for x, y in zip(joined.layers[1].tensors(), state.layers[1].tensors()):
            assert torch.equal(x, y)
        # a selection continues exactly like the same rows of the whole batch
        rows = [2, 0]
        sel_logits, _ = small.step(idx[rows, 0], state.select(rows))
        all_logits, _ = small.step(idx[:, 0], state)
        torch.testing.assert_close(sel_logits, all_logits[rows])
        # clone shares no storage; to() casts the shifts only
        copy = state.clone()
        assert copy.layers[0].att_x.data_ptr() != state.layers[0].att_x.data_ptr()
        half = state.to(dtype=torch.bfloat16)
        assert half.layers[0].att_x.dtype == torch.bfloat16
        assert half.layers[0].wkv.a.dtype == torch.float32
        empty = small.empty_state(4)
        assert empty.batch_size == 4 and empty.n_layer == 2
        assert bool((empty.layers[0].wkv.b == 0).all())
    with pytest.raises(ValueError, match="layer counts"):
        RWKVState.cat([state, RWKVState(state.layers[:1])])


def test_gpt_mode_is_differentiable():
    cfg = RWKVConfig(vocab_size=12, n_layer=2, n_embd=8, wkv_impl="parallel")
    model = random_model(cfg, seed=11)
    idx = tokens(cfg, 2, 6, seed=12)
    logits, _ = model(idx[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        if name != "emb.weight":
            assert p.grad.abs().sum() > 0, name


def test_bfloat16_model_runs_both_modes():
    cfg = RWKVConfig(vocab_size=16, n_layer=2, n_embd=16, wkv_impl="parallel")
    model32 = random_model(cfg, seed=13)
    model16 = random_model(cfg, seed=13, dtype=torch.bfloat16)
    idx = tokens(cfg, 1, 8, seed=14)
    with torch.no_grad():
        ref, _ = model32(idx)
        gpt, state = model16(idx)
        rnn, _ = run_rnn(model16, idx)
    assert gpt.dtype == torch.bfloat16 and state.layers[0].wkv.a.dtype == torch.float32
    assert_close_rel(gpt.float(), ref, rel=0.1)
    assert_close_rel(rnn.float(), gpt.float(), rel=0.1)
