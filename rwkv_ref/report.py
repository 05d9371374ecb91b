"""What a run reports: evaluation, the metrics file, the loss plot and a sample of text.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from rwkv_ref.distributed import all_mean
from rwkv_ref.files import atomic_write
from rwkv_ref.recipe import compute_loss, lr_factor
from rwkv_ref.run import Run, next_batch

METRICS_NAME = "metrics.jsonl"


@torch.no_grad()
def estimate_loss(run: Run) -> dict[str, float]:
    """Mean loss over ``eval_iters`` batches per split and process, the same windows each time
    (their own generator, so evaluating never moves the training batches).

    Returns:
        {"train": float, "val": float}, averaged over all processes.
    """
    run.model.eval()
    losses = {}
    for split, ids in (("train", run.data.train), ("val", run.data.val)):
        generator = torch.Generator().manual_seed(run.cfg.seed + 999_983 + run.dist.rank)
        total = torch.zeros((), device=run.dist.device)
        for _ in range(run.cfg.eval_iters):
            x, y = next_batch(run, ids, generator)
            with run.autocast():
                total += compute_loss(run.model, x, y)
        losses[split] = all_mean(total / run.cfg.eval_iters, run.dist).item()
    run.model.train()
    return losses


def evaluate(run: Run) -> dict:
    """Evaluate, append a metrics row to the history and (rank 0) rewrite metrics.jsonl.

    Returns:
        The row: step, tokens, loss (the latest minibatch), train_loss, val_loss, lr (of the
        latest step), tokens_per_s (training only, since the previous row), elapsed_s.
    """
    losses = estimate_loss(run)
    seconds, steps = run.window
    cfg = run.cfg
    row = {"step": run.step, "tokens": run.step * run.tokens_per_step,
           "loss": run.last_loss, "train_loss": losses["train"], "val_loss": losses["val"],
           "lr": cfg.lr * lr_factor(max(run.step - 1, 0), cfg.warmup_iters, cfg.max_iters,
                                    cfg.min_lr / cfg.lr),
           "tokens_per_s": steps * run.tokens_per_step / seconds if seconds else None,
           "elapsed_s": round(run.elapsed(), 2)}
    run.history.append(row)
    run.window = [0.0, 0]
    if run.dist.is_main:
        write_metrics(run.history, run.out_dir / METRICS_NAME)
        tqdm.write(f"step {run.step}: train loss {row['train_loss']:.4f}, "
                   f"val loss {row['val_loss']:.4f}")
    return row


def write_metrics(history: list[dict], path: Path) -> None:
    """The history as JSON lines, replacing the file atomically."""
    with atomic_write(path) as f:
        f.write("".join(json.dumps(row) + "\n" for row in history).encode())


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(history: list[dict], path: Path, title: str) -> None:
    """Train and validation loss against steps, as a PNG (matplotlib, no display needed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    steps = [row["step"] for row in history]
    ax.plot(steps, [row["train_loss"] for row in history], label="train")
    ax.plot(steps, [row["val_loss"] for row in history], label="validation")
    ax.set(xlabel="step", ylabel="loss (nats per character)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)


def write_sample(run: Run) -> str:
    """Sample ``sample_tokens`` characters after ``sample_prompt`` (RNN mode for RWKV), print
    them and save them to out_dir/sample.txt.

    Returns:
        The prompt and its continuation.
    """
    tokenizer, cfg = run.data.tokenizer, run.cfg
    try:
        prompt = torch.tensor(tokenizer.encode(cfg.sample_prompt), dtype=torch.long)   # (T,)
    except ValueError as e:                 # a character the text never uses
        print(f"sample_prompt: {e}; starting from the text's first character instead")
        prompt = torch.empty(0, dtype=torch.long)
    if len(prompt) == 0:
        prompt = run.data.train[:1]
    generator = torch.Generator(device=run.dist.device).manual_seed(cfg.seed)
    run.model.eval()
    with run.autocast():
        ids = run.model.generate(prompt.to(run.dist.device), cfg.sample_tokens,
                                 generator=generator)           # (T + sample_tokens,)
    text = tokenizer.decode(ids.tolist())
    (run.out_dir / "sample.txt").write_text(text + "\n", encoding="utf-8")
    print(f"\n--- sample ({cfg.sample_tokens} characters) ---\n{text}\n---")
    return text
