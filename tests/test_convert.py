"""Checkpoints in and out, and parity with two implementations nobody here wrote:
the official ``rwkv`` package and transformers' ``RwkvForCausalLM``.

All on random weights saved in the official layout (the initialisation zeros five matrices
per block, which would make parity trivial).
"""
import os
import sys

# The official package reads these when it is imported: TorchScript on, no CUDA kernel build.
os.environ["RWKV_JIT_ON"] = "1"
os.environ["RWKV_CUDA_ON"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

from rwkv_ref import RWKV, RWKVConfig  # noqa: E402
from rwkv_ref import convert  # noqa: E402
from rwkv_ref.files import FileProblem  # noqa: E402
from rwkv_ref.convert import (  # noqa: E402
    from_hf, hf_name, state_from_blinkdl, state_from_hf, state_to_blinkdl, state_to_hf)
from rwkv_ref.testing import random_model, random_state_dict  # noqa: E402
from test_model import assert_close_rel, assert_states_close, run_rnn, tokens  # noqa: E402

CFG = RWKVConfig(vocab_size=37, n_layer=3, n_embd=16, wkv_impl="parallel")
# Wide enough for the rnn kernel's SIMD main loops and the cpp WKV kernel's 32-channel block
# plus a tail (RNN mode on the CPU runs through them); dim_ffn not a multiple of 8.
WIDE = RWKVConfig(vocab_size=41, n_layer=2, n_embd=40, dim_ffn=100, wkv_impl="parallel")


@pytest.fixture(scope="module", params=[CFG, WIDE], ids=["16wide", "40wide"])
def model(request):
    return random_model(request.param, seed=21)


@pytest.fixture(scope="module")
def official_path(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "rwkv4.pth"
    convert.save_blinkdl(model, path)
    return path


def load_official(path, drop_suffix=False):
    from rwkv.model import RWKV as OfficialRWKV

    # it appends ".pth" to a name without it; a path with the suffix is used as given
    name = str(path)[:-len(".pth")] if drop_suffix else str(path)
    return OfficialRWKV(model=name, strategy="cpu fp32", verbose=False)


def assert_same_weights(m1: RWKV, m2: RWKV):
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k


# ----------------------------------------------------------------------------- round trips


def test_save_then_load_is_exact(model, official_path):
    loaded = convert.from_blinkdl(official_path, wkv_impl="parallel")
    assert loaded.config == model.config
    assert_same_weights(loaded, model)
    raw = torch.load(official_path, map_location="cpu", weights_only=True)
    assert raw["blocks.0.att.time_mix_k"].shape == (1, 1, model.config.n_embd)    # official shapes
    assert raw["blocks.0.att.time_decay"].shape == (model.config.dim_att,)
    assert "blocks.1.ln0.weight" not in raw and "blocks.0.ln0.weight" in raw


def test_config_is_inferred_from_shapes():
    cfg = RWKVConfig(vocab_size=29, n_layer=2, n_embd=12, dim_att=8, dim_ffn=20, ctx_len=64,
                     wkv_impl="parallel")
    sd = random_state_dict(cfg, seed=1)
    loaded = convert.from_blinkdl(sd, ctx_len=64, wkv_impl="parallel")
    assert loaded.config == cfg
    sd["emb.weight"].zero_()                       # the caller's dict is not shared
    assert loaded.emb.weight.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storage_loads(model, tmp_path, dtype):
    path = tmp_path / "half.pth"
    convert.save_blinkdl(model, path, dtype=dtype)
    assert torch.load(path, weights_only=True)["head.weight"].dtype == dtype
    loaded = convert.from_blinkdl(path, wkv_impl="parallel")
    assert loaded.head.weight.dtype == torch.float32
    for (name, p), q in zip(model.named_parameters(), loaded.parameters()):
        torch.testing.assert_close(q, p.to(dtype).float(), rtol=0, atol=0, msg=name)
    idx = tokens(model.config, 1, 10, seed=2)
    with torch.no_grad():
        assert_close_rel(loaded(idx)[0], model(idx)[0], rel=0.05)
    kept = convert.from_blinkdl(path, dtype=dtype, wkv_impl="parallel")
    assert kept.head.weight.dtype == dtype


def test_official_to_ours_to_transformers_to_ours(official_path):
    ours = convert.from_blinkdl(official_path, wkv_impl="parallel")
    back = convert.from_hf(convert.to_hf(ours), wkv_impl="parallel")
    assert_same_weights(back, ours)
    official_sd = torch.load(official_path, weights_only=True)
    for k, v in back.state_dict().items():
        assert torch.equal(v, official_sd[k]), k


def test_hf_names_are_transformers_names(model):
    hf_keys = set(convert.to_hf(model).state_dict())
    assert {hf_name(k) for k in model.state_dict()} == hf_keys
    assert hf_name("blocks.0.ln0.weight") == "rwkv.blocks.0.pre_ln.weight"
    assert hf_name("blocks.2.att.time_mix_r") == "rwkv.blocks.2.attention.time_mix_receptance"
    assert hf_name("blocks.1.ffn.value.weight") == "rwkv.blocks.1.feed_forward.value.weight"


def test_from_hf_undoes_transformers_rescaling(model):
    hf = convert.to_hf(model, rescale_every=1)      # block i divided by 2^i
    with torch.no_grad():
        hf(tokens(model.config, 1, 3, seed=3))                # eval mode: divides weights in place
    assert hf.rwkv.layers_are_rescaled
    assert not torch.equal(hf.rwkv.blocks[-1].attention.output.weight,
                           model.blocks[-1].att.output.weight)
    assert_same_weights(from_hf(hf, wkv_impl="parallel"), model)


# ----------------------------------------------------------------------------- refusals


def _bad(sd, **changes):
    out = dict(sd)
    for k, v in changes.items():
        if v is None:
            out.pop(k)
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("key", ["blocks.0.att.time_faaaa", "blocks.0.att.ln_x.weight",
                                 "blocks.0.att.gate.weight", "blocks.0.att.time_maa_x",
                                 "blocks.0.att.w0", "blocks.0.ffn.time_maa_k"])
def test_refuses_later_rwkv_versions(key):
    sd = random_state_dict(CFG)
    sd[key] = torch.zeros(CFG.n_embd)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as info:
        convert.from_blinkdl(sd)
    assert "RWKV-5/6/7" in str(info.value)


def test_refuses_missing_unexpected_and_misshapen_keys():
    sd = random_state_dict(CFG)
    with pytest.raises(ValueError, match=r"missing keys \['blocks\.1\.ffn\.value\.weight'\]"):
        convert.from_blinkdl(_bad(sd, **{"blocks.1.ffn.value.weight": None}))
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks\.0\.att\.extra'\]"):
        convert.from_blinkdl(_bad(sd, **{"blocks.0.att.extra": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"blocks\.2\.att\.time_first: \(15,\)"):
        convert.from_blinkdl(_bad(sd, **{"blocks.2.att.time_first": torch.zeros(15)}))
    with pytest.raises(ValueError, match=r"missing keys \['emb\.weight'\]"):
        convert.from_blinkdl(_bad(sd, **{"emb.weight": None}))
    with pytest.raises(ValueError, match="load_checkpoint"):
        convert.from_blinkdl({"model": sd, "model_config": {}})
    with pytest.raises(FileProblem, match="not found: .*no_such.pth"):
        convert.from_blinkdl("/nonexistent/no_such.pth")


def test_transformers_missing_is_explained(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        convert.to_hf(model)


# ----------------------------------------------------------------------------- official package


def test_parity_with_official_package_gpt_mode(model, official_path):
    official = load_official(official_path)
    idx = tokens(model.config, 1, 23, seed=4)
    logits, _ = official.forward(idx[0].tolist(), None, full_output=True)    # (T, V)
    with torch.no_grad():
        ours, _ = model(idx)
    assert_close_rel(ours[0], logits)


def test_parity_with_official_package_rnn_mode_and_states(model, official_path):
    official = load_official(official_path, drop_suffix=True)
    idx = tokens(model.config, 1, 16, seed=5)
    with torch.no_grad():
        ours, our_state = run_rnn(model, idx[:, :10])
        state = None
        for t in range(10):
            logits, state = official.forward([int(idx[0, t])], state)
            assert_close_rel(ours[0, t], logits)
        # the two states mean the same: convert each and compare
        assert_states_close(state_from_blinkdl(state), our_state)
        # continue: each from its own state, and the official one from ours
        theirs_own, _ = official.forward(idx[0, 10:].tolist(), list(state), full_output=True)
        theirs_from_ours, _ = official.forward(idx[0, 10:].tolist(),
                                               state_to_blinkdl(our_state), full_output=True)
        ours_cont, _ = model(idx[:, 10:], our_state)
        ours_from_theirs, _ = model(idx[:, 10:], state_from_blinkdl(state))
    for other in (theirs_own, theirs_from_ours, ours_from_theirs[0]):
        assert_close_rel(ours_cont[0], other)


# ----------------------------------------------------------------------------- transformers


def test_parity_with_transformers_gpt_mode(model):
    hf = convert.to_hf(model)
    idx = tokens(model.config, 2, 19, seed=6)
    with torch.no_grad():
        theirs = hf(idx, use_cache=False).logits
        ours, _ = model(idx)
    assert_close_rel(ours, theirs)


def test_parity_with_transformers_rnn_mode(model):
    # batch 1: transformers 5.23's one-token path mixes a (B, 1, C) input with a (B, C) shift,
    # which broadcasts to (B, B, C) when B > 1 (its GPT mode with a state is fine, see below)
    hf = convert.to_hf(model)
    idx = tokens(model.config, 1, 8, seed=7)
    with torch.no_grad():
        ours, our_state = run_rnn(model, idx)
        state = None
        for t in range(8):
            out = hf(idx[:, t:t + 1], state=state, use_cache=True)
            state = out.state
            assert_close_rel(ours[:, t], out.logits[:, 0])
    assert_states_close(state_from_hf(state), our_state)


def test_parity_with_transformers_carried_state(model):
    hf = convert.to_hf(model)
    idx = tokens(model.config, 2, 14, seed=8)
    with torch.no_grad():
        _, our_state = model(idx[:, :8])
        state = hf(idx[:, :8], use_cache=True).state
        assert_states_close(state_from_hf(state), our_state)
        # continue: each from its own state, and each from the other's (converted);
        # transformers updates its state tensors in place, so it gets copies
        theirs_own = hf(idx[:, 8:], state=[s.clone() for s in state], use_cache=True).logits
        theirs_from_ours = hf(idx[:, 8:], state=state_to_hf(our_state), use_cache=True).logits
        ours_cont, _ = model(idx[:, 8:], our_state)
        ours_from_theirs, _ = model(idx[:, 8:], state_from_hf(state))
        whole = hf(idx, use_cache=False).logits[:, 8:]
    for other in (theirs_own, theirs_from_ours, ours_from_theirs, whole):
        assert_close_rel(ours_cont, other)


def test_transformers_single_layer():
    # transformers' own init divides by n_layer - 1; to_hf skips it
    one = random_model(RWKVConfig(vocab_size=9, n_layer=1, n_embd=8, wkv_impl="parallel"), 3)
    idx = tokens(one.config, 2, 6, seed=9)
    with torch.no_grad():
        assert_close_rel(one(idx)[0], convert.to_hf(one)(idx, use_cache=False).logits)
