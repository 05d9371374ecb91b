"""Training throughput of our RWKV against our GPT (configured like nanoGPT), eager and
compiled, and the ``cpu`` preset's result against its targets.

    python -m benchmarks.bench_train

1. Tokens per second of a whole training step (forward, backward, AdamW) at 4 x 128 (the
   ``cpu`` preset's shape) for contexts 64, 128, 256 and 1024, and at 6 x 384 (the ``gpu``
   preset's) for context 256, with 4096 tokens per step. The GPT has the same depth and
   width, ``n_embd / 64`` heads (at least 2), an MLP of 4 C, learned positions and no biases:
   nanoGPT's shape. Each (model, mode) has its own copy; their steps are alternated in one
   process, so that load from other processes hits all of them alike; the figure is the
   fastest of ``REPEATS`` steps, the median beside it. "compiled" is ``torch.compile`` of
   the loss (forward and backward; the optimizer stays eager), its compile time printed
   apart. RWKV's WKV is the fastest available (``auto``: the cpp kernel), and its mixing blocks
   run through the fused ``ops`` kernel (``rwkv_ref.ops``); the row "eager, no ops" is RWKV
   with them off (``ops.OPS_KERNEL = False``, the plain PyTorch lines), against the same GPT.
   The process keeps freed memory for reuse, as training does
   (``rwkv_ref.distributed.keep_freed_memory``); the minor page faults per step (median) are
   printed beside the times. ``make bench`` first times 4 x 128 at context 64 with glibc's
   default thresholds (the row "glibc default"), where RWKV takes thousands per step.
   Then the matrix products of one layer of each model, forward and backward, timed alone:
   what RWKV's 13 C^2 weights in 7 products cost against the GPT's 12 C^2 in 4.
   Targets (README): RWKV >= 1.0x the GPT at every context, >= 1.2x at 4 x 128 from 256.
2. The ``cpu`` preset as ``make run`` trained it: final validation loss and wall time from
   ``out/cpu/metrics.jsonl`` against the targets (at most 1.70 in at most 10 minutes) and
   nanoGPT's CPU reference (1.88). Nothing is retrained here; without the file it says so.

Prints figures only; asserts nothing about time.
"""
from __future__ import annotations

import dataclasses
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rwkv_ref import ops
from rwkv_ref.compare import train_seconds
from rwkv_ref.config import PRESETS, TrainConfig
from rwkv_ref.distributed import keep_freed_memory
from rwkv_ref.gpt import GPT, GPTConfig
from rwkv_ref.model import RWKV, RWKVConfig
from rwkv_ref.report import read_metrics

ROOT = Path(__file__).resolve().parent.parent
METRICS = ROOT / "out" / "cpu" / "metrics.jsonl"
TOKENS_PER_STEP = 4096
SHAPES = ((4, 128, 64), (4, 128, 128), (4, 128, 256), (4, 128, 1024), (6, 384, 256))
REPEATS = 10
NO_OPS = "eager, no ops"     # RWKV without the fused mixing-block ops
MALLOC_DEFAULT = "glibc default"   # eager, before keep_freed_memory
VOCAB = 65                   # tiny-shakespeare's characters
TARGET_RATIO = {64: 1.0, 128: 1.0, 256: 1.2, 1024: 1.2}   # RWKV / GPT, at 4 x 128
TARGET_VAL_LOSS = 1.70
TARGET_MINUTES = 10.0
# nanoGPT, 4 x 128, ctx 64, batch 12, 2000 iterations (book/design.md, "Reference figures")
NANOGPT_CPU_VAL_LOSS = 1.88


def wkv_impl_used() -> str:
    """The WKV variant that ``auto`` picks on the CPU."""
    from rwkv_ref import kernel

    return "cpp" if kernel.unavailable_reason("cpp") is None else "parallel"


def make_models(n_layer: int, n_embd: int, ctx: int) -> dict[str, torch.nn.Module]:
    """Our RWKV and a nanoGPT-shaped GPT of the same depth and width, seeded alike."""
    torch.manual_seed(0)
    rwkv = RWKV(RWKVConfig(vocab_size=VOCAB, n_layer=n_layer, n_embd=n_embd, ctx_len=ctx))
    gpt = GPT(GPTConfig(vocab_size=VOCAB, n_layer=n_layer, n_embd=n_embd,
                        n_head=max(2, n_embd // 64), ctx_len=ctx))
    return {"rwkv": rwkv, "gpt": gpt}


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-token prediction, with its gradients. x, y: (B, T)."""
    logits, _ = model(x)                                               # (B, T, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    return loss.detach()


class Trainer:
    """One model (a fresh copy) with its AdamW, stepping eagerly or through torch.compile."""

    def __init__(self, model: torch.nn.Module, compiled: bool, fused_ops: bool = True):
        self.model, self.fused_ops = model, fused_ops
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.loss = torch.compile(loss_of) if compiled else loss_of
        self.times: list[float] = []           # seconds of each step
        self.faults: list[int] = []            # minor page faults of each step

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One training step; appends its seconds and page faults, and returns the seconds."""
        was, ops.OPS_KERNEL = ops.OPS_KERNEL, self.fused_ops
        try:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            self.loss(self.model, x, y)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.times.append(time.perf_counter() - start)
            self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
            return self.times[-1]
        finally:
            ops.OPS_KERNEL = was


def measure(n_layer: int, n_embd: int, ctx: int, modes=("eager", "compiled")) -> dict:
    """{(model, mode): (best tok/s, median tok/s, first-step seconds, median page faults per
    step)}: all alternated."""
    batch = TOKENS_PER_STEP // ctx
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(VOCAB, (batch, ctx), generator=g) for _ in range(2))   # (B, T)
    trainers = {}
    for mode in modes:
        for name, model in make_models(n_layer, n_embd, ctx).items():
            trainers[name, mode] = Trainer(model, mode == "compiled")
    if "eager" in modes:          # RWKV on the plain PyTorch lines, against the eager GPT
        trainers["rwkv", NO_OPS] = Trainer(make_models(n_layer, n_embd, ctx)["rwkv"], False,
                                           fused_ops=False)
        trainers["gpt", NO_OPS] = trainers["gpt", "eager"]
    unique = list({id(t): t for t in trainers.values()}.values())
    first = {key: t.step(x, y) for key, t in trainers.items()}   # warm-up, compilation
    for t in unique:                                             # time only what follows
        t.times.clear()
        t.faults.clear()
    for _ in range(REPEATS):
        for t in unique:
            t.step(x, y)
    return {key: (TOKENS_PER_STEP / min(t.times), TOKENS_PER_STEP / statistics.median(t.times),
                  first[key], round(statistics.median(t.faults)))
            for key, t in trainers.items()}


def throughput(shapes=SHAPES, modes=("eager", "compiled"), malloc_default=False) -> None:
    """Print tokens/s of RWKV and the GPT per shape and mode, with the ratio and its target;
    ``malloc_default``: first a row at 4 x 128, context 64, before keeping freed memory."""
    before = measure(4, 128, 64, ("eager",)) if malloc_default else None
    kept = keep_freed_memory()
    print(f"training step (forward, backward, AdamW), {TOKENS_PER_STEP} tokens per step, "
          f"{torch.get_num_threads()} threads, WKV {wkv_impl_used()!r}; tok/s: best of "
          f"{REPEATS} (median); freed memory kept for reuse: {'yes' if kept else 'no'}")
    print(f"{'shape':>7} {'ctx':>5} {'mode':>13} | {'RWKV tok/s':>16} | {'GPT tok/s':>16} | "
          f"{'RWKV/GPT':>8} {'target':>7} | first step s | page faults/step")
    if before:
        print_row((4, 128, 64), MALLOC_DEFAULT, before["rwkv", "eager"], before["gpt", "eager"])
    for shape in shapes:
        rates = measure(*shape, modes)
        for mode in (*modes, NO_OPS) if "eager" in modes else modes:
            print_row(shape, mode, rates["rwkv", mode], rates["gpt", mode])


def print_row(shape: tuple[int, int, int], mode: str, r: tuple, g: tuple) -> None:
    """One row of the throughput table; r, g: ``measure``'s figures for RWKV and the GPT."""
    n_layer, n_embd, ctx = shape
    target = TARGET_RATIO.get(ctx) if n_embd == 128 else 1.0
    print(f"{n_layer}x{n_embd:<5} {ctx:>5} {mode:>13} | {r[0]:>7,.0f} ({r[1]:>6,.0f}) | "
          f"{g[0]:>7,.0f} ({g[1]:>6,.0f}) | {r[0] / g[0]:>7.2f}x {target:>6.1f}x | "
          f"{r[2]:>5.1f}, {g[2]:<5.1f} | {r[3]:>6,}, {g[3]:,}", flush=True)


def layer_products(n_embd: int = 128, tokens: int = TOKENS_PER_STEP) -> None:
    """Print the time of one layer's matrix products, forward and backward (the product and
    both gradients), for each model: its block's Linear weights applied to ``tokens`` rows,
    the two models' rounds alternated, freed memory kept as in training."""
    keep_freed_memory()
    print(f"matrix products of one layer at width {n_embd}, {tokens} tokens, forward + "
          f"backward, timed alone (best of {REPEATS}, alternated):")
    work, rounds = {}, {}
    for name, model in make_models(1, n_embd, 64).items():
        weights = [m.weight.detach().requires_grad_() for m in model.blocks[0].modules()
                   if isinstance(m, torch.nn.Linear)]
        inputs = [torch.randn(tokens, w.shape[1], requires_grad=True) for w in weights]
        grads = [torch.randn(tokens, w.shape[0]) for w in weights]
        work[name] = (weights, list(zip(inputs, weights, grads)))
        rounds[name] = []
    for _ in range(REPEATS + 1):                       # the first round warms up
        for name, (_, triples) in work.items():
            start = time.perf_counter()
            for x, w, g in triples:
                torch.autograd.grad(F.linear(x, w), (x, w), g)
            rounds[name].append(time.perf_counter() - start)
    best, size = {}, {}
    for name, (weights, _) in work.items():
        best[name] = min(rounds[name][1:])
        size[name] = sum(w.numel() for w in weights)
        print(f"  {name:>4}: {len(weights)} products, {size[name] / n_embd ** 2:.0f} C^2 "
              f"weights: {best[name] * 1e3:6.2f} ms")
    print(f"  RWKV / GPT: {best['rwkv'] / best['gpt']:.3f}x the time, "
          f"{size['rwkv'] / size['gpt']:.3f}x the weights")


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


def main(argv: list[str] | None = None) -> None:
    """Both parts: throughput, then the cpu preset's result. ``--eager``: no compiled rows."""
    argv = sys.argv[1:] if argv is None else argv
    throughput(modes=("eager",) if "--eager" in argv else ("eager", "compiled"),
               malloc_default=True)
    layer_products()
    preset_report()


if __name__ == "__main__":
    main()
