"""The GPT baseline: shapes, causality, attention against a hand-written reference, sampling,
and the parameter matching of ``rwkv_ref.compare``."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from rwkv_ref.compare import count_params, matched_configs
from rwkv_ref.gpt import GPT, GPTConfig
from rwkv_ref.config import TrainConfig
from rwkv_ref.report import read_metrics


def state_of(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def small(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=11, n_layer=2, n_embd=16, n_head=4, ctx_len=12)
    cfg.update(overrides)
    return GPT(GPTConfig(**cfg)).eval()


def test_shapes_and_interface():
    model = small()
    idx = torch.randint(11, (3, 12))
    logits, state = model(idx)
    assert logits.shape == (3, 12, 11) and torch.equal(state, idx)   # the state: the window
    assert model(idx[:, :5])[0].shape == (3, 5, 11)
    with pytest.raises(ValueError, match="ctx_len"):
        model(torch.randint(11, (1, 13)))
    with pytest.raises(ValueError, match="state"):
        model(idx, state=object())
    with pytest.raises(ValueError, match="batch"):
        model(idx, state=idx[:2])


def test_the_window_carries_over_like_one_call():
    model = small().eval()
    idx = torch.randint(11, (2, 12))
    whole, _ = model(idx)
    first, window = model(idx[:, :7])
    rest, _ = model(idx[:, 7:], state=window)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), whole)
    logits, window = model.step(idx[:, 7], window)           # one token at a time
    torch.testing.assert_close(logits, whole[:, 7])
    assert window.shape == (2, 8)
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(vocab_size=11, n_layer=1, n_embd=10, n_head=4, ctx_len=8)


def test_causal_no_position_sees_the_future():
    model = small()
    idx = torch.randint(11, (2, 12))
    logits = model(idx)[0]
    for t in (0, 5, 11):
        changed = idx.clone()
        changed[:, t:] = (changed[:, t:] + 1) % 11
        other = model(changed)[0]
        torch.testing.assert_close(other[:, :t], logits[:, :t])    # the past is unchanged
        assert not torch.allclose(other[:, t], logits[:, t])        # position t itself does see


def test_attention_equals_the_explicit_masked_softmax():
    attn = small().blocks[0].attn
    x = torch.randn(2, 7, 16)
    q, k, v = attn.qkv(x).split(16, dim=2)
    q, k, v = (t.view(2, 7, 4, 4).transpose(1, 2) for t in (q, k, v))      # (B, H, T, D)
    scores = q @ k.transpose(-1, -2) / math.sqrt(4)                         # (B, H, T, T)
    future = torch.ones(7, 7, dtype=torch.bool).triu(1)
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_parameter_count_formula():
    V, L, C, F_, T = 11, 3, 16, 40, 12
    model = small(n_layer=L, dim_ffn=F_)
    per_layer = 4 * C * C + 2 * C * F_ + 2 * 2 * C          # attention, MLP, two LayerNorms
    assert sum(p.numel() for p in model.parameters()) == V * C + T * C + L * per_layer \
        + 2 * C + V * C
    assert GPTConfig(vocab_size=V, n_layer=1, n_embd=C, n_head=2, ctx_len=T).dim_ffn == 4 * C


def test_generate_keeps_the_prompt_and_is_reproducible():
    model = small()
    prompt = [1, 2, 3]

    def sample(seed):
        return model.generate(prompt, 20, generator=torch.Generator().manual_seed(seed))

    out = sample(0)
    assert out.shape == (23,) and out[:3].tolist() == prompt and int(out.max()) < 11
    assert torch.equal(out, sample(0)) and not torch.equal(out, sample(1))
    greedy = model.generate(torch.tensor([[1, 2, 3], [4, 5, 6]]), 15, greedy=True)
    assert greedy.shape == (2, 18)                  # past ctx_len = 12: the window slides
    window = greedy[:, -13:-1]
    assert torch.equal(greedy[:, -1], model(window)[0][:, -1].argmax(-1))


def test_one_training_step_lowers_the_loss():
    model = small().train()
    idx = torch.randint(11, (4, 12))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        logits, _ = model(idx[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("n_layer, n_embd, ctx_len", [(4, 128, 128), (2, 64, 256), (3, 96, 64)])
def test_compare_matches_parameter_counts(n_layer, n_embd, ctx_len):
    cfg = dataclasses.replace(TrainConfig(), n_layer=n_layer, n_embd=n_embd, ctx_len=ctx_len,
                              n_head=4)
    rwkv, gpt = matched_configs(cfg, vocab_size=65)
    n_rwkv, n_gpt = count_params(rwkv, 65), count_params(gpt, 65)
    assert rwkv.model == "rwkv" and gpt.model == "gpt"
    assert abs(n_gpt - n_rwkv) <= 0.01 * n_rwkv             # far inside the required 5%
    assert (gpt.n_layer, gpt.n_embd, gpt.ctx_len) == (n_layer, n_embd, ctx_len)


def test_verdict_names_the_winner_and_overlapping_seeds():
    from rwkv_ref.compare import mean_spread, verdict

    assert verdict({"RWKV": [1.50, 1.60], "GPT": [1.40, 1.45]}, "here").startswith(
        "**GPT wins here** by 0.1250")
    assert "overlap" in verdict({"RWKV": [1.50, 1.60], "GPT": [1.55, 1.70]}, "here")
    assert "overlap" not in verdict({"RWKV": [1.50, 1.52], "GPT": [1.55, 1.70]}, "here")
    assert mean_spread([1.0, 1.5]) == "1.2500 ± 0.2500"


def test_compare_end_to_end_on_a_tiny_budget(tmp_path):
    """Sweep, best-of and seeds: the chosen rate is the sweep's best for each model, and each
    final run is its own seed."""
    from rwkv_ref.compare import main

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; " * 40, encoding="utf-8")
    out = tmp_path / "cmp"
    assert main(["--lrs=1e-3,3e-2", "--sweep_iters=3", "--full_iters=3", "--seeds=2",
                 "--nanogpt=false", f"--data={text}", "--n_layer=1", "--n_embd=16",
                 "--n_head=2", "--ctx_len=8", "--batch_size=4", "--eval_iters=1",
                 "--wkv_impl=parallel", "--num_threads=1", f"--out_dir={out}"]) == 0
    md = (out / "results.md").read_text()
    for model in ("rwkv", "gpt"):
        losses = {d.name.split("_lr")[1]: read_metrics(d / "metrics.jsonl")[-1]["val_loss"]
                  for d in out.glob(f"sweep_{model}_lr*")}
        assert {"0.001", "0.03"} <= set(losses) and len(losses) > 2   # a 2-point grid: extended
        best = min(losses, key=losses.get)
        row = next(line for line in md.splitlines() if line.startswith(f"| {model.upper()} "))
        assert f"| {float(best):g}" in row, row
        seeds = [state_of(out / f"final_{model}_seed{s}" / "ckpt.pt")["train_config"]
                 for s in (1337, 1338)]
        assert [c["seed"] for c in seeds] == [1337, 1338]
        assert {c["lr"] for c in seeds} == {float(best)}
    assert "wins at equal parameters and tokens" in md and (out / "compare.png").is_file()


def test_recipe_mode_trains_each_variant_with_its_option(tmp_path):
    """``--recipe``: one run per variant and seed, each with exactly its option switched on,
    and the table's "change" column is each variant's loss minus ours under the same seed."""
    from rwkv_ref.compare import RECIPE_VARIANTS, main

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; " * 40, encoding="utf-8")
    out = tmp_path / "recipe"
    assert main(["--recipe", "--full_iters=2", "--seeds=1", f"--data={text}", "--n_layer=1",
                 "--n_embd=16", "--ctx_len=8", "--batch_size=4", "--eval_iters=1",
                 "--wkv_impl=parallel", "--num_threads=1", f"--out_dir={out}"]) == 0
    rows = [line for line in (out / "recipe.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| variant")]
    assert [r.split(" | ")[0][2:] for r in rows] == list(RECIPE_VARIANTS)
    ours = None
    for v, (name, change) in enumerate(RECIPE_VARIANTS.items()):
        losses = []
        for seed in (1337,):
            saved = state_of(out / f"recipe{v}_seed{seed}" / "ckpt.pt")["train_config"]
            assert saved["seed"] == seed and saved["model"] == "rwkv"
            for option in ("layerwise_lr", "l2wrap", "emb_init", "weight_decay"):
                assert saved[option] == change.get(option, TrainConfig.__dict__[option]), option
            losses.append(read_metrics(out / f"recipe{v}_seed{seed}" / "metrics.jsonl")[-1]
                          ["val_loss"])
        ours = ours or losses
        row = rows[v].split(" | ")
        expected = sum(a - b for a, b in zip(losses, ours)) / len(losses)
        assert abs(float(row[3].rstrip(" |")) - expected) < 1e-4, (name, row)


@pytest.mark.parametrize("best_lr, grid, tried", [
    (4e-3, "1e-3,2e-3,4e-3,8e-3", [1e-3, 2e-3, 4e-3, 8e-3]),                # inside: as given
    (3.2e-2, "1e-3,2e-3,4e-3,8e-3", [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2]),  # up twice
    (1e-1, "1e-3,2e-3,4e-3,8e-3", [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2]),    # at most twice
    (5e-4, "1e-3,2e-3,4e-3", [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3]),   # down until inside
])
def test_sweep_extends_past_an_edge_while_the_best_sits_there(monkeypatch, tmp_path, best_lr,
                                                               grid, tried):
    from rwkv_ref import compare

    def fake_run(cfg):                  # a loss with its minimum at best_lr (log scale)
        return compare.Outcome(cfg, abs(math.log(cfg.lr / best_lr)), 0.0, None)

    monkeypatch.setattr(compare, "run_one", fake_run)
    swept = compare.sweep(TrainConfig(), compare.Budget(lrs=grid), tmp_path)
    assert list(swept) == pytest.approx(tried)
