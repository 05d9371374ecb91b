"""RWKV against the GPT baseline, each at its own best learning rate, at equal parameters and
equal tokens (the paper's first question, at small scale).

    python -m rwkv_ref.compare --out_dir=out/compare      # make compare: under 30 min on 2 cores
    python -m rwkv_ref.compare --full_iters=100 --seeds=1 # smaller budgets (see BUDGET_KEYS)
    python -m rwkv_ref.compare --recipe --out_dir=out/recipe  # make recipe: the official extras

Three stages, every run through ``rwkv_ref.train`` with the ``compare`` preset's sizes:

1. sweep: each model alone over the learning-rate grid ``lrs`` for ``sweep_iters`` steps
   (seed ``seed``), extended by factors of 2 while the best sits on the grid's edge; its best
   is the rate of lowest validation loss;
2. final: each model at its best rate for ``full_iters`` steps, once per seed (``seeds`` of
   them: seed, seed + 1, ...): the same batches for both models under the same seed;
3. nanoGPT's CPU setting (4 x 128, context 64, batch 12, 2000 steps; the GPT with nanoGPT's
   own recipe: lr 1e-3 cosine to 1e-4, 100 warm-up steps, weight decay 0.1, dropout 0), beside
   nanoGPT's published validation loss for it.

Every schedule warms up over a tenth of its steps, then follows a cosine to lr / 10. The GPT's
MLP width is chosen so that the parameter counts agree within 5% (``matched_configs``).
Writes ``out_dir/results.md`` (the table), ``out_dir/compare.png`` (the final runs' curves)
and one sub-folder per run.

With ``--recipe`` it measures instead what each of the official trainer's extras does to RWKV
(``RECIPE_VARIANTS``: each option alone, then all three, beside our defaults), every variant at
the preset's learning rate for ``full_iters`` steps and ``seeds`` seeds, into
``out_dir/recipe.md``.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from rwkv_ref.config import (ConfigError, TrainConfig, _parse_value, config_from_args,
                             run_command, usage)
from rwkv_ref.data import load_data
from rwkv_ref.recipe import build_model, num_params
from rwkv_ref.train import TrainResult, train

TOLERANCE = 0.05          # the largest relative difference in parameter count
MAX_EXTENSIONS = 2        # how far the sweep may go past its grid's edges
NANOGPT_FIGURE = 1.88     # nanoGPT's README: val loss of its CPU shakespeare_char example
NANOGPT_SIZES = dict(n_layer=4, n_embd=128, n_head=4, ctx_len=64, batch_size=12,
                     max_iters=2000, eval_interval=250, eval_iters=20, dim_ffn=0)
NANOGPT_GPT_RECIPE = dict(lr=1e-3, min_lr=1e-4, warmup_iters=100, weight_decay=0.1,
                          dropout=0.0, beta2=0.99, grad_clip=1.0)


@dataclass
class Budget:
    """How much ``make compare`` trains; each field is also a ``--key=value`` option."""

    lrs: str = "1e-3,2e-3,4e-3,8e-3,1.6e-2"   # the sweep's grid (factors of 2)
    sweep_iters: int = 120             # 60 left the GPT on its unigram plateau (val 2.5)
    full_iters: int = 500              # 2M tokens at the cpu preset's sizes
    seeds: int = 2
    nanogpt: bool = True               # also run nanoGPT's CPU setting
    recipe: bool = False               # measure the official recipe's options instead

    @property
    def grid(self) -> list[float]:
        return [float(x) for x in self.lrs.split(",")]


BUDGET_KEYS = {f.name for f in dataclasses.fields(Budget)}


def count_params(cfg: TrainConfig, vocab_size: int) -> int:
    """The parameter count of the model ``cfg`` describes (built on the meta device: shapes
    only, no memory, no initialisation work)."""
    with torch.device("meta"):
        model, _ = build_model(cfg, vocab_size)
    return num_params(model)


def matched_configs(cfg: TrainConfig, vocab_size: int) -> tuple[TrainConfig, TrainConfig]:
    """The RWKV config and a GPT config of (nearly) the same parameter count.

    The GPT keeps depth, width and heads; its MLP width F is moved until the counts agree
    (one more unit of F adds a row of ``fc`` and a column of ``proj`` in every layer).

    Args:
        cfg: the shared settings.  vocab_size: V.
    Returns:
        (rwkv config, gpt config); ``ConfigError`` if no F comes within 5%.
    """
    rwkv = dataclasses.replace(cfg, model="rwkv")
    gpt = dataclasses.replace(cfg, model="gpt", dim_ffn=cfg.dim_ffn or 4 * cfg.n_embd)
    target, base = count_params(rwkv, vocab_size), count_params(gpt, vocab_size)
    per_unit = 2 * cfg.n_embd * cfg.n_layer
    gpt = dataclasses.replace(gpt, dim_ffn=max(1, gpt.dim_ffn + round((target - base) / per_unit)))
    got = count_params(gpt, vocab_size)
    if abs(got - target) > TOLERANCE * target:
        raise ConfigError(f"no GPT MLP width matches RWKV's {target:,} parameters within 5% "
                          f"(best: {got:,}); change n_embd or n_layer")
    return rwkv, gpt


def train_seconds(history: list[dict]) -> float:
    """Seconds spent in training steps (evaluations excluded), from the metrics rows."""
    seconds, tokens = 0.0, 0
    for row in history:
        if row["tokens_per_s"]:
            seconds += (row["tokens"] - tokens) / row["tokens_per_s"]
        tokens = row["tokens"]
    return seconds


def scheduled(cfg: TrainConfig, iters: int, lr: float, seed: int, out_dir: Path,
              evals: int = 5) -> TrainConfig:
    """``cfg`` for ``iters`` steps at peak rate ``lr``: a tenth warm-up, cosine to lr / 10,
    ``evals`` evaluations after the one at step 0, no sample."""
    return dataclasses.replace(cfg, max_iters=iters, lr=lr, min_lr=lr / 10, seed=seed,
                               warmup_iters=max(1, iters // 10), sample_tokens=0,
                               eval_interval=max(1, iters // evals), out_dir=str(out_dir))


@dataclass
class Outcome:
    """One finished run: its config, its final validation loss and its wall time."""

    cfg: TrainConfig
    val_loss: float
    wall_s: float
    result: TrainResult


def run_one(cfg: TrainConfig) -> Outcome:
    """Train ``cfg``; ``KeyboardInterrupt`` if it was stopped by Ctrl-C."""
    start = time.time()
    result = train(cfg)
    if result.interrupted:
        raise KeyboardInterrupt
    return Outcome(cfg, result.history[-1]["val_loss"], time.time() - start, result)


def sweep(cfg: TrainConfig, budget: Budget, out: Path) -> dict[float, Outcome]:
    """One model over the learning-rate grid at ``sweep_iters`` steps, extended by a factor of
    2 past either edge (up to ``MAX_EXTENSIONS`` times) while the best rate sits on that edge.

    Returns:
        {lr: outcome}, in increasing lr.
    """
    def run_at(lr: float) -> Outcome:
        return run_one(scheduled(cfg, budget.sweep_iters, lr, cfg.seed,
                                 out / f"sweep_{cfg.model}_lr{lr:g}", evals=1))

    swept = {lr: run_at(lr) for lr in sorted(budget.grid)}
    for _ in range(MAX_EXTENSIONS):
        best, grid = best_of(swept), sorted(swept)
        if len(grid) < 2 or best not in (grid[0], grid[-1]):
            break
        lr = float(f"{best * 2 if best == grid[-1] else best / 2:.3g}")
        print(f"{cfg.model}: the best rate {best:g} is on the grid's edge; trying {lr:g}")
        swept[lr] = run_at(lr)
    return dict(sorted(swept.items()))


def best_of(swept: dict[float, Outcome]) -> float:
    """The learning rate of the lowest validation loss."""
    return min(swept, key=lambda lr: swept[lr].val_loss)


def mean_spread(values: list[float]) -> str:
    """'mean ± half the range' (the range of 2 seeds is all they say), or the one value."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {(max(values) - min(values)) / 2:.4f}"


def nanogpt_runs(cfg: TrainConfig, rwkv_lr: float, out: Path) -> dict[str, Outcome]:
    """Both models at nanoGPT's CPU sizes for 2000 steps: the GPT on nanoGPT's recipe, the RWKV
    at its swept rate on the compare schedule (a tenth warm-up, cosine to lr / 10)."""
    base = dataclasses.replace(cfg, **NANOGPT_SIZES)
    rwkv = scheduled(dataclasses.replace(base, model="rwkv"), base.max_iters, rwkv_lr, cfg.seed,
                     out / "nanogpt_rwkv", evals=8)
    gpt = dataclasses.replace(base, model="gpt", **NANOGPT_GPT_RECIPE, seed=cfg.seed,
                              sample_tokens=0, out_dir=str(out / "nanogpt_gpt"))
    return {"RWKV": run_one(rwkv), "GPT": run_one(gpt)}


def size_of(cfg: TrainConfig) -> str:
    return (f"{cfg.n_layer} x {cfg.n_embd}, ffn {cfg.dim_ffn or 4 * cfg.n_embd}, "
            f"ctx {cfg.ctx_len}, batch {cfg.batch_size}")


def results_markdown(swept: dict, finals: dict, nano: dict, budget: Budget, vocab: int,
                     total_s: float) -> str:
    """The whole comparison as markdown: what was compared, the sweep, best against best, and
    nanoGPT's setting. swept: {name: {lr: Outcome}}; finals: {name: [Outcome per seed]};
    nano: {name: Outcome} or {}."""
    cfg = next(iter(finals.values()))[0].cfg
    lines = ["## RWKV against GPT, each at its best learning rate", "",
             f"Tiny-shakespeare, character level (V = {vocab}). Learning rate swept over "
             f"{budget.grid} for {budget.sweep_iters} steps (seed {cfg.seed}), "
             f"then the best of each trained for {budget.full_iters} steps with "
             f"{budget.seeds} seed(s). Schedule: a tenth warm-up, cosine to lr / 10; "
             f"AdamW betas ({cfg.beta1:g}, {cfg.beta2:g}), weight decay {cfg.weight_decay:g} "
             f"(matrices), gradient clip {cfg.grad_clip:g}. "
             f"Total wall time {total_s / 60:.1f} min.", "",
             "| model | size | parameters | tokens | lr sweep: val loss | chosen lr "
             "| final val loss (mean ± half-range) | seeds | wall time per run |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for name, runs in finals.items():
        cfg, grid = runs[0].cfg, swept[name]
        best = best_of(grid)
        edge = " (grid edge)" if best in (min(grid), max(grid)) else ""
        sweep_text = ", ".join(f"{lr:g}: {o.val_loss:.3f}" for lr, o in grid.items())
        tokens = cfg.max_iters * cfg.batch_size * cfg.ctx_len
        lines.append(f"| {name} | {size_of(cfg)} | {runs[0].result.num_params:,} | {tokens:,} "
                     f"| {sweep_text} | {best:g}{edge} | "
                     f"{mean_spread([o.val_loss for o in runs])} | {len(runs)} | "
                     f"{statistics.mean(o.wall_s for o in runs) / 60:.1f} min |")
    lines += ["", verdict({n: [o.val_loss for o in r] for n, r in finals.items()}, "at equal "
              "parameters and tokens")]
    if nano:
        lines += nanogpt_markdown(nano)
    return "\n".join(lines) + "\n"


def nanogpt_markdown(nano: dict[str, Outcome]) -> list[str]:
    """The lines of nanoGPT's CPU setting: both models and nanoGPT's own figure."""
    size, gpt = NANOGPT_SIZES, NANOGPT_GPT_RECIPE
    tokens = size["max_iters"] * size["batch_size"] * size["ctx_len"]
    lines = ["", "## nanoGPT's CPU setting", "",
             f"{size['n_layer']} x {size['n_embd']}, context {size['ctx_len']}, batch "
             f"{size['batch_size']}, {size['max_iters']} steps ({tokens:,} tokens); the GPT on "
             f"nanoGPT's recipe (lr {gpt['lr']:g} cosine to {gpt['min_lr']:g}, "
             f"{gpt['warmup_iters']} warm-up steps, weight decay {gpt['weight_decay']:g}, dropout "
             f"{gpt['dropout']:g}), the RWKV at its swept rate; one seed. nanoGPT's GPT ties its "
             "embedding and head, ours does not.", "",
             "| model | size | parameters | lr | val loss | wall time |",
             "|---|---|---:|---:|---:|---:|"]
    for name, o in nano.items():
        lines.append(f"| {name} | {size_of(o.cfg)} | {o.result.num_params:,} | {o.cfg.lr:g} | "
                     f"{o.val_loss:.4f} | {o.wall_s / 60:.1f} min |")
    lines.append(f"| nanoGPT (published, its README) | {size['n_layer']} x {size['n_embd']}, ctx "
                 f"{size['ctx_len']}, batch {size['batch_size']} | (tied head) | {gpt['lr']:g} | "
                 f"{NANOGPT_FIGURE:.2f} | |")
    lines += ["", verdict({n: [o.val_loss] for n, o in nano.items()}, "at nanoGPT's setting")]
    return lines


def verdict(losses: dict[str, list[float]], where: str) -> str:
    """One sentence: who wins ``where``, by how much, and whether the seeds' ranges overlap."""
    (a, la), (b, lb) = sorted(losses.items(), key=lambda kv: statistics.mean(kv[1]))
    gap = statistics.mean(lb) - statistics.mean(la)
    overlap = max(la) >= min(lb)
    tail = " (their seed ranges overlap: no clear winner)" if overlap and len(la) > 1 else ""
    return f"**{a} wins {where}** by {gap:.4f} nats per character{tail}."


def plot(finals: dict[str, list[Outcome]], path: Path) -> None:
    """Validation loss of every final run against tokens and against wall-clock time."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    by_tokens, by_time = fig.subplots(1, 2, sharey=True)
    for name, runs in finals.items():
        for o in runs:
            rows, label = o.result.history, f"{name} lr {o.cfg.lr:g} seed {o.cfg.seed}"
            val = [r["val_loss"] for r in rows]
            by_tokens.plot([r["tokens"] / 1e6 for r in rows], val, marker=".", label=label)
            by_time.plot([r["elapsed_s"] / 60 for r in rows], val, marker=".", label=label)
    by_tokens.set(xlabel="tokens seen (millions)", ylabel="validation loss (nats per char)")
    by_time.set(xlabel="wall-clock time (minutes, evaluations included)")
    for ax in (by_tokens, by_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def compare(cfg: TrainConfig, budget: Budget = Budget()) -> str:
    """Sweep, final runs and nanoGPT's setting as the module docstring says; write
    ``results.md`` and ``compare.png`` into ``cfg.out_dir``.

    Returns:
        The markdown of results.md.
    """
    start, out = time.time(), Path(cfg.out_dir)
    vocab = load_data(cfg.data or None).tokenizer.vocab_size
    models = dict(zip(("RWKV", "GPT"), matched_configs(cfg, vocab)))
    print("parameters: " + ", ".join(f"{n} {count_params(c, vocab):,}" for n, c in models.items()))
    swept = {name: sweep(c, budget, out) for name, c in models.items()}
    finals = {name: [run_one(scheduled(c, budget.full_iters, best_of(swept[name]), c.seed + i,
                                       out / f"final_{c.model}_seed{c.seed + i}"))
                     for i in range(budget.seeds)] for name, c in models.items()}
    nano = nanogpt_runs(cfg, best_of(swept["RWKV"]), out) if budget.nanogpt else {}
    text = results_markdown(swept, finals, nano, budget, vocab, time.time() - start)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    plot(finals, out / "compare.png")
    print(f"\n{text}\nwrote {out / 'results.md'} and {out / 'compare.png'}")
    return text


# What the official v4neo trainer does differently, one TrainConfig change each (book/design.md,
# "Training recipe"); the first row is our default, the last the official preset's three together.
RECIPE_VARIANTS: dict[str, dict] = {
    "ours (no extras)": {},
    "layerwise lr (time_decay 2x, time_first 3x)": dict(layerwise_lr=True),
    "L2Wrap": dict(l2wrap=True),
    "embedding init U(+-lr)": dict(emb_init="lr"),
    "weight decay 0.1 (matrices)": dict(weight_decay=0.1),
    "official (the first three together)": dict(layerwise_lr=True, l2wrap=True, emb_init="lr"),
}


def recipe_effects(cfg: TrainConfig, budget: Budget) -> str:
    """Every ``RECIPE_VARIANTS`` entry on RWKV at ``cfg.lr`` for ``budget.full_iters`` steps,
    ``budget.seeds`` seeds (the same batches for every variant under one seed); write
    ``recipe.md`` into ``cfg.out_dir``.

    Returns:
        The markdown: per variant the validation loss of each seed, their mean and the
        difference from our default under the same seeds.
    """
    start, out = time.time(), Path(cfg.out_dir)
    rwkv = dataclasses.replace(cfg, model="rwkv")
    runs = {name: [run_one(scheduled(dataclasses.replace(rwkv, **change), budget.full_iters,
                                     cfg.lr, cfg.seed + i, out / f"recipe{v}_seed{cfg.seed + i}"))
                   for i in range(budget.seeds)]
            for v, (name, change) in enumerate(RECIPE_VARIANTS.items())}
    text = recipe_markdown(runs, budget, time.time() - start)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.md").write_text(text)
    print(f"\n{text}\nwrote {out / 'recipe.md'}")
    return text


def recipe_markdown(runs: dict[str, list[Outcome]], budget: Budget, total_s: float) -> str:
    """The table of ``recipe_effects``. runs: {variant: [Outcome per seed]}, ours first."""
    first = next(iter(runs.values()))
    cfg, base = first[0].cfg, [o.val_loss for o in first]
    seeds = ", ".join(str(o.cfg.seed) for o in first)
    lines = ["## The official recipe's options, measured on RWKV", "",
             f"{size_of(cfg)}, lr {cfg.lr:g} (a tenth warm-up, cosine to lr / 10), "
             f"{budget.full_iters} steps ({budget.full_iters * cfg.batch_size * cfg.ctx_len:,} "
             f"tokens), seeds {seeds}: every variant sees the same batches under one seed. "
             f"Total wall time {total_s / 60:.1f} min.", "",
             "| variant | val loss per seed | mean | change from ours (mean over seeds) |",
             "|---|---|---:|---:|"]
    for name, outcomes in runs.items():
        losses = [o.val_loss for o in outcomes]
        change = statistics.mean(a - b for a, b in zip(losses, base))
        lines.append(f"| {name} | {', '.join(f'{x:.4f}' for x in losses)} | "
                     f"{statistics.mean(losses):.4f} | {change:+.4f} |")
    if len(base) > 1:
        lines += ["", f"Seed noise for scale: our default's {len(base)} seeds lie within "
                  f"{(max(base) - min(base)) / 2:.4f} of their midpoint; a change smaller than "
                  "that is not an effect these runs can show."]
    else:
        lines += ["", "One seed: these runs cannot tell an effect from seed noise."]
    return "\n".join(lines) + "\n"


def split_budget(argv: list[str]) -> tuple[Budget, list[str]]:
    """The ``Budget`` options of ``argv`` and the rest (TrainConfig overrides)."""
    values, rest = {}, []
    types = typing.get_type_hints(Budget)
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if arg.startswith("--") and key in BUDGET_KEYS:
            values[key] = _parse_value(key, types[key], value if eq else None)
        else:
            rest.append(arg)
    budget = Budget(**values)
    try:
        grid = budget.grid
    except ValueError:
        raise ConfigError(f"--lrs expects comma-separated numbers, got {budget.lrs!r}") from None
    if not grid or min(grid) <= 0 or budget.seeds < 1 or min(budget.sweep_iters,
                                                             budget.full_iters) < 1:
        raise ConfigError("--lrs must be positive numbers; --seeds, --sweep_iters and "
                          "--full_iters at least 1")
    return budget, rest


def main(argv: list[str] | None = None) -> int:
    """The command line: Budget options, then TrainConfig overrides on top of the ``compare``
    preset (they apply to every run; the stages set lr, steps, seed and out_dir)."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n\nBudget options: " + ", ".join(
            f"--{f.name}={f.default}" for f in dataclasses.fields(Budget)) + "\n\n" + usage())
        return 0

    def body(args: list[str]) -> int:
        budget, rest = split_budget(args)
        cfg = config_from_args(rest, default_preset="compare")
        (recipe_effects if budget.recipe else compare)(cfg, budget)
        return 0

    return run_command("rwkv_ref.compare", body, argv)


if __name__ == "__main__":
    sys.exit(main())
