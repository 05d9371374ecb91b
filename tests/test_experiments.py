"""rwkv_ref.experiments at tiny sizes: the recall task, the gradient check, rows, the CLI."""
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rwkv_ref import experiments as ex
from rwkv_ref.model import RWKV, RWKVConfig

SPEC = ex.RecallSpec(n_keys=10, n_values=7, n_noise=3)


@st.composite
def recall_settings(draw):
    n_pairs = draw(st.integers(1, SPEC.n_keys))
    distance = draw(st.integers(3, 30))
    extra = draw(st.integers(0, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    return n_pairs, distance, ex.recall_length(n_pairs, distance) + extra, seed


def _pairs_of(row: list[int], start: int, n_ctx: int) -> dict[int, int]:
    """{key: the token after it} for every key token in row[start:start + n_ctx]."""
    return {row[i]: row[i + 1] for i in range(start, start + n_ctx) if row[i] < SPEC.n_keys}


@settings(max_examples=40, deadline=None)
@given(recall_settings())
def test_recall_answer_is_the_value_of_the_query_key_at_the_distance_asked(case):
    n_pairs, distance, T, seed = case
    b = ex.recall_batch(6, n_pairs, distance, "after", T, SPEC,
                        torch.Generator().manual_seed(seed))
    assert b.idx.shape == (6, T)
    for row, target, key_pos in zip(b.idx.tolist(), b.target.tolist(), b.key_pos.tolist()):
        assert row[-3:-1] == [SPEC.query, row[-2]] and row[-1] == SPEC.answer
        query_key = row[-2]
        context = row[:-3]
        keys = [t for t in context if t < SPEC.n_keys]
        assert len(keys) == len(set(keys)) == n_pairs              # distinct keys, n of them
        assert context.index(query_key) == key_pos                 # the key occurs once
        assert target == context[key_pos + 1]                      # its value is the answer
        assert SPEC.n_keys <= target < SPEC.n_keys + SPEC.n_values
        assert (T - 2) - key_pos == distance                       # query key to its pair


@settings(max_examples=30, deadline=None)
@given(recall_settings())
def test_both_orders_hold_the_same_information(case):
    n_pairs, distance, T, seed = case
    after, before = (ex.recall_batch(4, n_pairs, distance, order, T, SPEC,
                                     torch.Generator().manual_seed(seed))
                     for order in ("after", "before"))
    assert torch.equal(after.target, before.target)
    assert torch.equal(after.query_key, before.query_key)
    for a, b, q in zip(after.idx.tolist(), before.idx.tolist(), after.query_key.tolist()):
        assert Counter(a) == Counter(b)                            # the same tokens
        assert b[:2] == [SPEC.query, q] and b[-1] == SPEC.answer   # question first
        assert _pairs_of(a, 0, T - 3) == _pairs_of(b, 2, T - 3)    # the same pairs


def test_recall_rejects_impossible_settings_in_one_line():
    with pytest.raises(ValueError, match="too short"):
        ex.recall_batch(2, 4, 10, length=17, spec=SPEC)
    with pytest.raises(ValueError, match="distance must be >= 3"):
        ex.recall_batch(2, 1, 2, spec=SPEC)
    with pytest.raises(ValueError, match="order"):
        ex.recall_batch(2, 1, 5, order="middle", spec=SPEC)


def _float64_model(seed=0):
    torch.manual_seed(seed)
    model = RWKV(RWKVConfig(vocab_size=11, n_layer=2, n_embd=8)).double()
    ex._randomise(model)
    return model


def test_gpt_and_rnn_mode_gradients_agree_in_float64():
    model = _float64_model()
    idx = torch.randint(11, (2, 9))
    diffs = ex.compare_gradients(model, idx, torch.roll(idx, -1, 1))
    assert set(diffs) == {name for name, _ in model.named_parameters()}
    assert max(diffs.values()) < 1e-10
    # the comparison is not vacuous: the gradients themselves are far from zero
    grads = ex.mode_gradients(model, idx, torch.roll(idx, -1, 1), "gpt")
    assert min(float(g.abs().max()) for g in grads.values()) > 1e-6


def test_the_gradient_check_fails_when_rnn_mode_differs(monkeypatch):
    model = _float64_model()
    idx = torch.randint(11, (2, 9))
    real = ex.rnn_mode_logits
    # one token's logits slightly off: the gradients of the head and beyond change
    def off_by_a_little(m, i):
        logits = real(m, i)
        return torch.cat([logits[:, :1] * (1 + 1e-4), logits[:, 1:]], dim=1)
    monkeypatch.setattr(ex, "rnn_mode_logits", off_by_a_little)
    with pytest.raises(AssertionError, match="gradient of"):
        ex.compare_gradients(model, idx, torch.roll(idx, -1, 1))


def test_rnn_mode_builds_a_graph_that_grows_with_T_and_gpt_mode_does_not():
    torch.manual_seed(0)
    model = RWKV(RWKVConfig(vocab_size=11, n_layer=1, n_embd=8))
    _, gpt8 = ex.time_training_step(model, torch.randint(11, (1, 8)), "gpt", 1)
    _, gpt16 = ex.time_training_step(model, torch.randint(11, (1, 16)), "gpt", 1)
    _, rnn8 = ex.time_training_step(model, torch.randint(11, (1, 8)), "rnn", 1)
    _, rnn16 = ex.time_training_step(model, torch.randint(11, (1, 16)), "rnn", 1)
    assert gpt8 == gpt16
    assert rnn16 > 1.8 * rnn8 and rnn8 > gpt8


def test_gradient_profile_sees_no_time_gradient_through_identity_blocks():
    # At the official init every RWKV block is the identity on the residual stream (its
    # output matrices are zero), so the last token's loss cannot depend on earlier tokens.
    torch.manual_seed(0)
    model = RWKV(RWKVConfig(vocab_size=11, n_layer=3, n_embd=8))
    idx = torch.randint(11, (2, 6))
    profile = ex.gradient_profile(model, idx, torch.roll(idx, -1, 1))
    assert len(profile["layer"]) == 3 and len(profile["time"]) == 6
    assert profile["time"][0] > 0 and max(profile["time"][1:]) == 0.0
    ex._randomise(model)
    profile = ex.gradient_profile(model, idx, torch.roll(idx, -1, 1))
    assert min(profile["time"]) > 0


def test_matched_gpt_is_within_two_percent_of_the_rwkv():
    for n_layer, n_embd, T in ((2, 32, 40), (2, 64, 44), (4, 16, 100)):
        ffn = ex.matched_gpt_ffn(74, n_layer, n_embd, T)
        rwkv = ex.num_params(ex.build_model("rwkv", 74, n_layer, n_embd, T))
        gpt = ex.num_params(ex.build_model("gpt", 74, n_layer, n_embd, T, dim_ffn=ffn))
        assert abs(gpt - rwkv) <= 0.02 * rwkv


def test_train_steps_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = ex.build_model("lstm", 11, 1, 16, 8)
    x = torch.randint(11, (4, 8))
    losses = ex.train_steps(model, lambda: (x, torch.roll(x, -1, 1)), 1e-2, 30, ex.text_loss)
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    text = torch.randint(20, (2000,))
    return out, ex.run_all(out, "tiny", text=text)


def test_rows_have_the_expected_fields(tiny_run):
    _, res = tiny_run
    fields = {
        "parallel": {"mode", "T", "seconds", "tokens_per_s", "graph_nodes", "max_grad_diff"},
        "gradients": {"model", "depth", "phase", "kind", "index", "grad_norm", "relative",
                      "lr"},
        "recall": {"model", "n_embd", "order", "params", "n_pairs", "distance", "accuracy"},
        "order": {"model", "n_embd", "order", "params", "n_pairs", "distance", "accuracy"},
    }
    for name, expected in fields.items():
        assert res[name] and all(set(row) == expected for row in res[name]), name
    assert {r["mode"] for r in res["parallel"]} == {"gpt-cpp", "gpt-parallel", "rnn"}
    assert {r["model"] for r in res["gradients"]} == {"rwkv", "lstm", "gpt"}
    assert {r["order"] for r in res["order"]} == {"after", "before"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in res["recall"])


def test_cli_writes_its_files(tmp_path, monkeypatch):
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be, that is the question. " * 60)
    assert ex.main([f"--out_dir={tmp_path / 'out'}", "--size=tiny", f"--data={text}"]) == 0
    for name in ("parallel.png", "gradients.png", "recall.png", "order.png", "results.md"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## 4. Prompt order" in md and "| gpt-cpp |" in md


def test_cli_names_a_missing_text_file(tmp_path, capsys):
    assert ex.main([f"--out_dir={tmp_path}", "--size=tiny", f"--data={tmp_path}/nope"]) == 1
    assert "not a file" in capsys.readouterr().err
