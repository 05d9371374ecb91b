"""Training throughput of RWKV against the GPT baseline at equal parameters, and the ``cpu``
preset's result against its targets.

    python -m benchmarks.bench_train

1. Tokens per second of a whole training step (forward, backward, AdamW) for the ``cpu``
   preset's RWKV and a GPT of the same parameter count (``rwkv_ref.compare``), at context 256
   and 1024 with 8192 tokens per step: the fastest of several steps, the median beside it (a
   shared machine is noisy), and the ratio. RWKV's WKV is the fastest available (``auto``).
2. The ``cpu`` preset as ``make run`` trained it: final validation loss and wall time from
   ``out/cpu/metrics.jsonl`` against the targets (at most 1.70 in at most 10 minutes) and
   nanoGPT's CPU reference (1.88). Nothing is retrained here; without the file it says so.

Prints figures only; asserts nothing about time.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from rwkv_ref.compare import count_params, matched_configs, train_seconds
from rwkv_ref.config import PRESETS, TrainConfig, apply_preset
from rwkv_ref.recipe import build_model, build_optimizer, forward_backward
from rwkv_ref.report import read_metrics

ROOT = Path(__file__).resolve().parent.parent
METRICS = ROOT / "out" / "cpu" / "metrics.jsonl"
TOKENS_PER_STEP = 8192
CONTEXTS = (256, 1024)
REPEATS = 4
VOCAB = 65                   # tiny-shakespeare's characters
TARGET_VAL_LOSS = 1.70
TARGET_MINUTES = 10.0
NANOGPT_CPU_VAL_LOSS = 1.88  # nanoGPT, 4 x 128, ctx 64, batch 12, 2000 iterations (DESIGN.md)


def wkv_impl_used() -> str:
    """The WKV variant that ``auto`` picks on the CPU."""
    from rwkv_ref import kernel

    return "cpp" if kernel.unavailable_reason("cpp") is None else "parallel"


def step_seconds(cfg: TrainConfig, batch: int, repeats: int = REPEATS) -> list[float]:
    """Seconds of each of ``repeats`` training steps on random tokens (after one warm-up).

    Args:
        cfg: the model (``cfg.model``, sizes) at context ``cfg.ctx_len``.  batch: B.
    Returns:
        ``repeats`` durations.
    """
    torch.manual_seed(0)
    model, _ = build_model(cfg, VOCAB)
    optimizer, _ = build_optimizer(model, cfg)
    x, y = (torch.randint(VOCAB, (batch, cfg.ctx_len)) for _ in range(2))   # (B, T)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        forward_backward(model, x, y, cfg.grad_clip, nullcontext)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:                                   # the first step warms up (kernel load, caches)
            times.append(time.perf_counter() - start)
    return times


def throughput() -> None:
    """Print tokens/s of RWKV and the matched GPT at each context length, with the ratio."""
    base = apply_preset(TrainConfig(), "cpu")
    rwkv, gpt = matched_configs(base, VOCAB)
    print(f"cpu preset model, {torch.get_num_threads()} threads, WKV {wkv_impl_used()!r}: "
          f"RWKV {count_params(rwkv, VOCAB):,} parameters ({rwkv.n_layer} x {rwkv.n_embd}), "
          f"GPT {count_params(gpt, VOCAB):,} ({gpt.n_layer} x {gpt.n_embd}, MLP {gpt.dim_ffn})")
    print(f"{'context':>8} {'batch':>6} | {'RWKV tok/s (best, median)':>26} | "
          f"{'GPT tok/s (best, median)':>25} | RWKV / GPT")
    for ctx in CONTEXTS:
        batch = TOKENS_PER_STEP // ctx
        rates = {}
        for name, cfg in (("rwkv", rwkv), ("gpt", gpt)):
            seconds = step_seconds(dataclasses.replace(cfg, ctx_len=ctx), batch)
            rates[name] = (TOKENS_PER_STEP / min(seconds),
                           TOKENS_PER_STEP / statistics.median(seconds))
        r, g = rates["rwkv"], rates["gpt"]
        print(f"{ctx:>8} {batch:>6} | {r[0]:>14,.0f} {r[1]:>11,.0f} | {g[0]:>13,.0f} "
              f"{g[1]:>11,.0f} | {r[0] / g[0]:>9.2f}x")


def preset_report(path: Path = METRICS) -> None:
    """Print the finished ``make run``'s final validation loss and time beside the targets."""
    if not path.is_file():
        print(f"cpu preset: no {path.relative_to(ROOT)} (run `make run` first); "
              f"targets: val loss <= {TARGET_VAL_LOSS} in <= {TARGET_MINUTES:.0f} min, "
              f"nanoGPT's CPU reference {NANOGPT_CPU_VAL_LOSS}")
        return
    rows = read_metrics(path)
    last, minutes = rows[-1], rows[-1]["elapsed_s"] / 60
    preset = {**dataclasses.asdict(TrainConfig()), **PRESETS["cpu"]}
    complete = last["step"] == preset["max_iters"]
    print(f"cpu preset ({path.relative_to(ROOT)}, step {last['step']} of "
          f"{preset['max_iters']}{'' if complete else ': NOT FINISHED'}, "
          f"{last['tokens']:,} tokens):")

    def verdict(ok: bool) -> str:
        return ("met" if ok else "MISSED") if complete else "(not finished)"

    print(f"  val loss  {last['val_loss']:.4f}   target <= {TARGET_VAL_LOSS:.2f}  "
          f"{verdict(last['val_loss'] <= TARGET_VAL_LOSS)};  nanoGPT CPU reference "
          f"{NANOGPT_CPU_VAL_LOSS:.2f}")
    print(f"  wall time {minutes:.1f} min   target <= {TARGET_MINUTES:.0f} min  "
          f"{verdict(minutes <= TARGET_MINUTES)} (evaluations included; a busy machine is "
          f"slower)")
    if last["tokens"]:
        print(budget(rows, preset))


def budget(rows: list[dict], preset: dict) -> str:
    """The run's training throughput, the tokens 10 minutes hold at it, and the preset's."""
    rate = rows[-1]["tokens"] / train_seconds(rows)
    planned = preset["max_iters"] * preset["batch_size"] * preset["ctx_len"]
    return (f"  training  {rate:,.0f} tokens/s: 10 minutes hold "
            f"{rate * 60 * TARGET_MINUTES / 1e6:.1f}M tokens; the preset takes "
            f"{planned / 1e6:.1f}M")


def main() -> None:
    """Both parts: throughput, then the cpu preset's result."""
    throughput()
    preset_report()


if __name__ == "__main__":
    main()
