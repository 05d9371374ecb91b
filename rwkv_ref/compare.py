"""RWKV against the GPT baseline at equal parameter count and equal tokens.

    python -m rwkv_ref.compare --out_dir=out/compare      # make compare: ~10-15 min on 2 cores
    python -m rwkv_ref.compare --max_iters=100            # any TrainConfig override, for both

Both models train through ``rwkv_ref.train`` with one ``TrainConfig`` (the ``compare`` preset
and the overrides): the same text, batches, schedule and number of steps, hence the same
tokens. Only the GPT's MLP width differs from the RWKV's channel-mixing width: it is chosen so
that the two parameter counts agree within 5% (both are printed).

Writes ``out_dir/rwkv/`` and ``out_dir/gpt/`` (each run's checkpoint, metrics, curve and
sample), ``out_dir/compare.md`` (the table) and ``out_dir/compare.png`` (validation loss
against tokens and against wall-clock time).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from rwkv_ref.data import load_data
from rwkv_ref.config import ConfigError, TrainConfig, config_from_args, usage
from rwkv_ref.recipe import build_model, num_params
from rwkv_ref.train import TrainResult, train

TOLERANCE = 0.05   # the largest relative difference in parameter count


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


def table(results: dict[str, TrainResult], configs: dict[str, TrainConfig]) -> str:
    """The markdown table: final val loss, parameters, tokens, tokens/s, wall time."""
    lines = ["| model | size | parameters | tokens | final val loss | tokens/s | wall time |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, result in results.items():
        cfg, last = configs[name], result.history[-1]
        size = f"{cfg.n_layer} x {cfg.n_embd}, ffn {cfg.dim_ffn or 4 * cfg.n_embd}"
        tps = last["tokens"] / train_seconds(result.history)
        lines.append(f"| {name} | {size} | {result.num_params:,} | {last['tokens']:,} | "
                     f"{last['val_loss']:.4f} | {tps:,.0f} | {last['elapsed_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, TrainResult], path: Path) -> None:
    """Two panels: validation loss against tokens seen and against wall-clock time."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    by_tokens, by_time = fig.subplots(1, 2, sharey=True)
    for name, result in results.items():
        rows = result.history
        val = [r["val_loss"] for r in rows]
        by_tokens.plot([r["tokens"] / 1e6 for r in rows], val, marker=".", label=name)
        by_time.plot([r["elapsed_s"] / 60 for r in rows], val, marker=".", label=name)
    by_tokens.set(xlabel="tokens seen (millions)", ylabel="validation loss (nats per char)")
    by_time.set(xlabel="wall-clock time (minutes, evaluations included)")
    for ax in (by_tokens, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=120)


def compare(cfg: TrainConfig) -> dict[str, TrainResult]:
    """Train both models as above, then write the table and the figure into ``cfg.out_dir``.

    Returns:
        {"RWKV": result, "GPT": result}.
    """
    out = Path(cfg.out_dir)
    vocab_size = load_data(cfg.data or None).tokenizer.vocab_size
    rwkv, gpt = matched_configs(cfg, vocab_size)
    n_rwkv, n_gpt = count_params(rwkv, vocab_size), count_params(gpt, vocab_size)
    print(f"parameters: RWKV {n_rwkv:,}, GPT {n_gpt:,} ({n_gpt / n_rwkv - 1:+.2%}); "
          f"{cfg.max_iters * cfg.batch_size * cfg.ctx_len:,} tokens each")
    configs = {"RWKV": dataclasses.replace(rwkv, out_dir=str(out / "rwkv")),
               "GPT": dataclasses.replace(gpt, out_dir=str(out / "gpt"))}
    results = {}
    for name, run_cfg in configs.items():
        results[name] = train(run_cfg)
        if results[name].interrupted:
            return results
    text = table(results, configs)
    (out / "compare.md").write_text(text)
    plot(results, out / "compare.png")
    print(f"\n{text}\nwrote {out / 'compare.md'} and {out / 'compare.png'}")
    return results


def main(argv: list[str] | None = None) -> int:
    """The command line: TrainConfig overrides on top of the ``compare`` preset."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n\n" + usage())
        return 0
    try:
        results = compare(config_from_args(argv, default_preset="compare"))
    except ConfigError as e:
        print(f"rwkv_ref.compare: {e}", file=sys.stderr)
        return 2
    return 130 if any(r.interrupted for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
