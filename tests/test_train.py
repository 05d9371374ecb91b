"""rwkv_ref.train: config overrides, a tiny end-to-end run, resume bit for bit, Ctrl-C, NaN.

Every run here is tiny (a few thousand parameters, a few steps) on a small text written by the
test, so that the whole file takes seconds.
"""
import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rwkv_ref import config, distributed, recipe
from rwkv_ref import train as train_mod
from rwkv_ref.config import (PRESETS, ConfigError, TrainConfig, apply_overrides, config_from_args,
                             parse_args)
from rwkv_ref.recipe import lr_factor
from rwkv_ref.report import read_metrics
from rwkv_ref.train import TrainingDiverged, main, train

REPO = Path(__file__).resolve().parents[1]
SENTENCE = "the quick brown fox jumps over the lazy dog; "


@pytest.fixture
def text_file(tmp_path):
    """A small, very regular text: a tiny model can learn it in a few dozen steps."""
    path = tmp_path / "fox.txt"
    path.write_text(SENTENCE * 60, encoding="utf-8")
    return path


def tiny(tmp_path, text_file, **overrides) -> TrainConfig:
    """A config that trains in well under a second per ten steps on one core."""
    values = dict(n_layer=2, n_embd=32, n_head=2, ctx_len=16, batch_size=8, max_iters=8,
                  lr=1e-2, min_lr=1e-3, warmup_iters=2, eval_interval=4, eval_iters=2,
                  data=str(text_file), out_dir=str(tmp_path / "out"), sample_tokens=0,
                  wkv_impl="parallel", num_threads=1)
    values.update(overrides)
    return dataclasses.replace(TrainConfig(), **values)


def state_of(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- configuration


def test_overrides_are_parsed_by_field_type():
    cfg = apply_overrides(TrainConfig(), {"lr": "3e-4", "n_layer": "2", "resume": None,
                                          "data": "poem.txt", "grad_clip": "0", "dtype":
                                          "bfloat16", "sample_tokens": "7"})
    assert cfg.lr == 3e-4 and isinstance(cfg.lr, float)
    assert cfg.n_layer == 2 and isinstance(cfg.n_layer, int)
    assert cfg.resume is True and cfg.data == "poem.txt" and cfg.grad_clip == 0.0
    assert apply_overrides(cfg, {"resume": "false"}).resume is False
    assert TrainConfig().lr != 3e-4                    # the defaults are untouched


@pytest.mark.parametrize("key, value, message", [
    ("n_layer", "2.5", "expects int"),
    ("lr", "fast", "expects float"),
    ("resume", "maybe", "true or false"),
    ("n_embd", None, "needs a value"),
])
def test_overrides_reject_values_of_the_wrong_type(key, value, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), {key: value})


def test_unknown_keys_list_close_matches():
    with pytest.raises(ConfigError, match="--n_layer") as err:
        apply_overrides(TrainConfig(), {"n_layr": "3"})
    assert "unknown option --n_layr" in str(err.value)
    with pytest.raises(ConfigError, match="unknown option --zzz"):
        apply_overrides(TrainConfig(), {"zzz": "1"})


def test_presets_and_command_line(capsys):
    assert parse_args(["--preset=gpu", "--lr=1e-3", "--resume"]) == (
        "gpu", {"lr": "1e-3", "resume": None})
    cfg = config_from_args(["--preset=gpu", "--lr=1e-4"])
    assert (cfg.n_layer, cfg.n_embd, cfg.ctx_len, cfg.max_iters) == (6, 384, 256, 5000)
    assert cfg.dtype == "bfloat16" and cfg.lr == 1e-4            # the override wins
    assert config_from_args([]) == TrainConfig()                   # cpu: the defaults
    assert set(PRESETS) >= {"cpu", "gpu"}
    with pytest.raises(ConfigError, match="cpu, gpu"):
        config_from_args(["--preset=tpu"])
    assert main(["--n_embed=64"]) == 2
    assert "--n_embd" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "--batch_size" in capsys.readouterr().out


def test_config_checks(tmp_path, text_file):
    with pytest.raises(ConfigError, match="model"):
        train(tiny(tmp_path, text_file, model="lstm"))
    with pytest.raises(ConfigError, match="batch_size"):
        config.check_config(tiny(tmp_path, text_file, batch_size=5), world_size=2)


def test_learning_rate_schedule():
    f = [lr_factor(s, warmup_iters=10, max_iters=110, min_ratio=0.1) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)       # linear warm-up
    assert all(a >= b for a, b in zip(f[9:], f[10:]))                      # then only down
    assert f[60] == pytest.approx(0.55)                                     # cosine midpoint
    assert f[110] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)   # floor at min_lr


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("model", ["rwkv", "gpt"])
def test_tiny_run_learns_and_writes_its_files(tmp_path, text_file, model):
    cfg = tiny(tmp_path, text_file, model=model, max_iters=40, eval_interval=20,
               sample_tokens=30, sample_prompt="the ")
    result = train(cfg)
    out = Path(cfg.out_dir)
    assert {p.name for p in out.iterdir()} == {"ckpt.pt", "metrics.jsonl", "loss.png",
                                               "sample.txt"}
    rows = read_metrics(out / "metrics.jsonl")
    assert rows == result.history and [r["step"] for r in rows] == [0, 20, 40]
    assert set(rows[0]) == {"step", "tokens", "loss", "train_loss", "val_loss", "lr",
                            "tokens_per_s", "elapsed_s"}
    assert rows[-1]["tokens"] == 40 * 8 * 16
    # tokens/s: the tokens of the 20 steps since the previous row over their training time,
    # which is less than the wall time between the rows (that also holds an evaluation and a
    # checkpoint, a few forward passes: far less than the 20 training steps). elapsed_s is
    # rounded to 0.01 s, so the wall time between two rows is known to within 0.01 s.
    wall = rows[2]["elapsed_s"] - rows[1]["elapsed_s"]
    assert rows[0]["tokens_per_s"] is None
    assert 20 * 8 * 16 / (wall + 0.01) < rows[2]["tokens_per_s"]
    assert rows[2]["tokens_per_s"] < 10 * 20 * 8 * 16 / max(wall - 0.01, 0.001)
    assert rows[0]["train_loss"] > 2.5                       # about ln(V), V = 22 characters
    assert rows[-1]["train_loss"] < 0.5 * rows[0]["train_loss"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "sample.txt").read_text().startswith("the ")
    assert len((out / "sample.txt").read_text()) == len("the ") + 30 + 1
    ckpt = state_of(out / "ckpt.pt")
    assert ckpt["step"] == 40 and ckpt["model_type"] == model
    assert ckpt["train_config"] == dataclasses.asdict(cfg)


def test_losses_are_each_steps_minibatch_loss(tmp_path, text_file):
    """The first recorded loss is the seeded initial model's loss on the first window batch,
    computed here from scratch; one loss per step; the metrics rows' losses are among them."""
    from rwkv_ref.data import get_batch, load_data
    from rwkv_ref.model import RWKV, RWKVConfig

    cfg = tiny(tmp_path, text_file, max_iters=6, eval_interval=3, device="cpu",
               dtype="float32")
    result = train(cfg)
    assert len(result.losses) == 6 and all(isinstance(v, float) for v in result.losses)
    assert [row["loss"] for row in result.history[1:]] == [result.losses[2], result.losses[5]]
    text = load_data(cfg.data)
    torch.manual_seed(cfg.seed)                     # the weights: the global generator
    model = RWKV(RWKVConfig(vocab_size=text.tokenizer.vocab_size, n_layer=cfg.n_layer,
                            n_embd=cfg.n_embd, ctx_len=cfg.ctx_len, wkv_impl=cfg.wkv_impl))
    x, y = get_batch(text.train, cfg.batch_size, cfg.ctx_len,
                     torch.Generator().manual_seed(cfg.seed))       # rank 0's batches
    with torch.no_grad():
        log_p = torch.log_softmax(model(x)[0], dim=-1)                     # (B, T, V)
    first = -log_p.gather(-1, y[..., None]).mean().item()
    assert result.losses[0] == pytest.approx(first, rel=1e-6, abs=0)
    assert result.losses[1] != pytest.approx(first, rel=1e-3)     # later steps differ


def test_checkpoint_feeds_generate_and_resume(tmp_path, text_file):
    from rwkv_ref.checkpoint import load_checkpoint

    cfg = tiny(tmp_path, text_file, max_iters=2)
    train(cfg)
    model, tokenizer = load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
    ids = model.generate(tokenizer.encode("the "), 10, greedy=True)
    assert len(tokenizer.decode(ids)) == 14
    # --resume --out_dir=DIR continues the saved run's config; given options still apply
    resumed = config_from_args(["--resume", f"--out_dir={cfg.out_dir}", "--max_iters=5"])
    assert resumed == dataclasses.replace(cfg, resume=True, max_iters=5)


# ----------------------------------------------------------------------------- resume, stop


def _sigint_after(step, monkeypatch):
    """Make the run send itself a real SIGINT once it has taken ``step`` steps."""
    original = train_mod.take_step

    def take_step(run, stop):
        stop_now = original(run, stop)
        if run.step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return stop_now

    monkeypatch.setattr(train_mod, "take_step", take_step)


DETERMINISTIC = ("step", "tokens", "loss", "train_loss", "val_loss", "lr")


def test_resume_is_bit_for_bit(tmp_path, text_file, monkeypatch):
    straight = tiny(tmp_path, text_file, max_iters=10, eval_interval=2, weight_decay=0.1,
                    out_dir=str(tmp_path / "straight"))
    whole = train(straight)
    split = dataclasses.replace(straight, out_dir=str(tmp_path / "split"))
    with monkeypatch.context() as m:
        _sigint_after(4, m)
        first = train(split)                # Ctrl-C at step 4: it saves after step 5
    assert first.interrupted and state_of(tmp_path / "split" / "ckpt.pt")["step"] == 5
    second = train(dataclasses.replace(split, resume=True))
    assert not second.interrupted
    assert first.losses + second.losses == whole.losses and len(second.losses) == 5
    a, b = state_of(tmp_path / "straight/ckpt.pt"), state_of(tmp_path / "split/ckpt.pt")
    assert b["step"] == 10
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
    rows_a, rows_b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("straight", "split"))
    assert [[r[k] for k in DETERMINISTIC] for r in rows_a] == \
           [[r[k] for k in DETERMINISTIC] for r in rows_b]
    assert len(rows_a) == 6


def test_sigint_to_a_subprocess_saves_a_checkpoint(tmp_path, text_file):
    out = tmp_path / "out"
    args = [f"--{k}={v}" for k, v in dataclasses.asdict(
        tiny(tmp_path, text_file, max_iters=100_000, eval_interval=100_000)).items()]
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_ref.train", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = proc.stdout.readline()          # printed just before the first step
        assert first.startswith("training rwkv"), first
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        output = first + proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 130, output
    assert "stopped at step" in output
    ckpt = state_of(out / "ckpt.pt")
    assert 1 <= ckpt["step"] < 100_000
    assert [p.name for p in out.iterdir() if p.suffix == ".tmp"] == []


def test_ctrl_c_twice(monkeypatch):
    """Repeats within a few seconds are one request (torchrun forwards the terminal's Ctrl-C);
    a later one quits at once."""
    with distributed.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        monkeypatch.setattr(stop, "PATIENCE_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)                  # the handler runs between bytecodes
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, text_file, monkeypatch):
    original, calls = recipe.compute_loss, []

    def poisoned(model, x, y, *args):       # training steps only: evaluation runs without grad
        loss = original(model, x, y, *args)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 7:
                return loss * math.nan
        return loss

    monkeypatch.setattr(recipe, "compute_loss", poisoned)
    cfg = tiny(tmp_path, text_file, max_iters=20, eval_interval=3)
    with pytest.raises(TrainingDiverged, match="step 7") as err:
        train(cfg)
    assert "untouched" in str(err.value)
    ckpt = state_of(Path(cfg.out_dir) / "ckpt.pt")
    assert ckpt["step"] == 6                  # the evaluation at step 6, nothing after
    assert all(torch.isfinite(p).all() for p in ckpt["model"].values())
    assert [p.name for p in Path(cfg.out_dir).iterdir() if p.suffix == ".tmp"] == []


def test_huge_learning_rate_is_stopped_by_the_command_line(tmp_path, text_file, capsys):
    cfg = tiny(tmp_path, text_file, lr=1e30, min_lr=1e29, warmup_iters=1, max_iters=50,
               grad_clip=0.0, eval_interval=50)
    argv = [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items()]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "training stopped" in err and "no checkpoint was written" in err
    assert not (Path(cfg.out_dir) / "ckpt.pt").exists()     # no good checkpoint to keep


# ----------------------------------------------------------------------------- the official recipe


def test_l2wrap_leaves_the_loss_and_adds_the_gradient_of_a_max_logit_penalty():
    """L2Wrap's extra gradient is that of factor / 2 * sum over positions of (max logit)**2
    (checked against float64 finite differences of that penalty); the loss is unchanged."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)     # (B, T, V)
    y = torch.randint(5, (2, 3))
    factor = 0.37                                  # large, so the term is far above rounding

    def ce(z):
        return torch.nn.functional.cross_entropy(z.flatten(0, 1), y.flatten())

    wrapped = recipe.L2Wrap.apply(ce(logits), logits, factor)
    assert wrapped.item() == ce(logits).item()
    (grad,) = torch.autograd.grad(wrapped, logits)

    def penalised(z):
        return ce(z) + factor / 2 * (z.max(dim=-1).values ** 2).sum()

    h, expected = 1e-6, torch.zeros_like(logits)
    flat = expected.view(-1)
    for i in range(flat.numel()):
        bump = torch.zeros_like(logits).view(-1)
        bump[i] = h
        bump = bump.view_as(logits)
        flat[i] = (penalised(logits + bump) - penalised(logits - bump)) / (2 * h)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-7)
    (plain,) = torch.autograd.grad(ce(logits), logits)
    assert (grad - plain).abs().max() > 0.1        # the extra term is really there


def test_l2wrap_in_compute_loss_uses_the_official_factor():
    """B = 2, T = 1, V = 3: the extra gradient at the argmax is 1e-4 / (B * T) times the max."""
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.z = torch.nn.Parameter(torch.tensor([[[2.0, -1.0, 0.5]], [[0.0, 3.0, 1.0]]]))

        def forward(self, x):
            return self.z, None

    model, x, y = Fixed(), torch.zeros(2, 1, dtype=torch.long), torch.tensor([[1], [2]])
    recipe.compute_loss(model, x, y).backward()
    plain = model.z.grad.clone()
    model.z.grad = None
    recipe.compute_loss(model, x, y, l2wrap=True).backward()
    extra = model.z.grad - plain
    expected = torch.zeros(2, 1, 3)
    expected[0, 0, 0], expected[1, 0, 1] = 1e-4 / 2 * 2.0, 1e-4 / 2 * 3.0
    torch.testing.assert_close(extra, expected, rtol=0, atol=5e-8)   # float32 loss: 3e-8


def test_layerwise_lr_groups(tmp_path, text_file):
    """time_decay at 2 x lr, time_first at 3 x, all else at lr, through the whole schedule;
    weight decay only on matrices."""
    cfg = tiny(tmp_path, text_file, layerwise_lr=True, weight_decay=0.1)
    model, _ = recipe.build_model(cfg, 22)
    optimizer, scheduler = recipe.build_optimizer(model, cfg)
    rate = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups
            for p in g["params"]}
    assert len(rate) == len(list(model.parameters()))           # each parameter once
    for _ in range(3):
        optimizer.step()
        scheduler.step()
        rate = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups
                for p in g["params"]}
        base = rate[id(model.head.weight)][0]
        for name, p in model.named_parameters():
            lr, decay = rate[id(p)]
            factor = 2.0 if name.endswith("time_decay") else 3.0 if name.endswith(
                "time_first") else 1.0
            assert lr == pytest.approx(factor * base), name
            assert decay == (0.1 if p.squeeze().dim() >= 2 else 0.0), name
    plain, _ = recipe.build_optimizer(model, dataclasses.replace(cfg, layerwise_lr=False))
    assert len({g["lr"] for g in plain.param_groups}) == 1


def test_embedding_init(tmp_path, text_file):
    paper, _ = recipe.build_model(tiny(tmp_path, text_file), 22)
    official, _ = recipe.build_model(tiny(tmp_path, text_file, emb_init="lr", lr=3e-2), 22)
    for model, bound in ((paper, 1e-4), (official, 3e-2)):
        w = model.emb.weight
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound   # U(-bound, bound)
    assert config_from_args(["--preset=official"]).l2wrap is True


# ----------------------------------------------------------------------------- start-up, compile


def test_stale_temporaries_are_removed_at_start(tmp_path, text_file, capsys):
    cfg = tiny(tmp_path, text_file, max_iters=1, eval_interval=1)
    out = Path(cfg.out_dir)
    out.mkdir()
    stale = [out / "ckpt.pt.k3j2h1.tmp", out / "metrics.jsonl.x9y8.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    keep = out / "notes.tmp"                          # not one of ours: left alone
    keep.write_text("mine")
    train(cfg)
    assert not any(p.exists() for p in stale) and keep.exists()
    assert "removed" in capsys.readouterr().out


def test_compile_wraps_the_training_model_only(tmp_path, text_file, monkeypatch):
    """With compile, the steps call torch.compile's result; the checkpoint holds the bare
    model's names (no "_orig_mod." prefix) and loads back."""
    from rwkv_ref.checkpoint import load_checkpoint

    compiled = []

    def fake_compile(model, **kwargs):            # the real one is tested on the GPU machine
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = tiny(tmp_path, text_file, compile=True, max_iters=2, eval_interval=2)
    train(cfg)
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)
    names = state_of(Path(cfg.out_dir) / "ckpt.pt")["model"]
    assert not any(k.startswith("_orig_mod.") for k in names)
    load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
    assert config_from_args(["--preset=gpu"]).compile and not TrainConfig().compile


@pytest.mark.slow
def test_compile_really_trains(tmp_path, text_file):
    """torch.compile for real (inductor needs a C++ compiler; about a minute on a CPU)."""
    cfg = tiny(tmp_path, text_file, model="gpt", compile=True, max_iters=6, eval_interval=6)
    result = train(cfg)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


PAGE_FAULTS = """
import resource, sys, torch
from rwkv_ref.distributed import keep_freed_memory
from rwkv_ref.model import RWKV, RWKVConfig
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.manual_seed(0)
torch.set_num_threads(1)
model = RWKV(RWKVConfig(vocab_size=65, n_layer=2, n_embd=128, ctx_len=64))
x = torch.randint(65, (64, 64))

def step():
    logits, _ = model(x)
    logits.square().mean().backward()
    model.zero_grad(set_to_none=True)

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

step(); step()
per_step = []
for _ in range(9):
    before = faults()
    step()
    per_step.append(faults() - before)
print(kept, sorted(per_step)[4])        # the median: the kept heap still grows now and then
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_kept_freed_memory_spares_the_page_faults_of_every_step():
    """After ``keep_freed_memory`` (which ``train`` calls) a training step at the cpu preset's
    width takes its memory from the heap: a handful of page faults in the median step, where
    glibc's own thresholds give thousands (it returns the freed activations to the kernel)."""
    def faults_per_step(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], cwd=REPO, check=True,
                             capture_output=True, text=True, timeout=120).stdout.split()
        return out[0], int(out[1])

    kept, with_it = faults_per_step("keep")
    _, without = faults_per_step("default")
    assert kept == "True", "keep_freed_memory() did not set glibc's thresholds"
    assert with_it < 200, (f"{with_it} minor page faults in the median step with freed memory "
                           f"kept ({without} without)")


def test_train_keeps_freed_memory(tmp_path, text_file, monkeypatch):
    calls = []
    monkeypatch.setattr(train_mod, "keep_freed_memory", lambda: calls.append(1) or True)
    train(tiny(tmp_path, text_file, max_iters=2, eval_interval=2))
    assert calls == [1]
