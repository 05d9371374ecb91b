"""What RWKV can and cannot do, measured at small scale (arXiv 2305.13048, sections 1, 4, 9).

    python -m rwkv_ref.experiments --out_dir=out/experiments [--size=full|small|tiny]

Four experiments, each a function that returns plain rows (a list of dicts) and a plot
function that draws them:

1. ``parallel_vs_sequential``: seconds per training step (forward + backward) against T, in
   GPT mode and in RNN mode used for training (``model.step`` in a loop under autograd), with
   the number of autograd nodes of each; ``compare_gradients`` checks that both give the same
   gradients.
2. ``gradient_stability``: the gradient norm at each layer's output and at the embedding
   output of token ``T-1-Δ`` for the loss at the last token, for RWKV, an LSTM stack and the
   GPT baseline, at depths 2..32, at initialisation and after a short training.
3. ``recall_experiment``: associative recall (key-value pairs, then a query key; predict its
   value): accuracy against distance and number of pairs, RWKV against a GPT of (nearly) the
   same parameter count, at several widths (the RWKV state grows with ``n_embd``).
4. ``prompt_order``: the same task with the query after the context and before it.

Every model gets its own learning rate from a tiny sweep on its own task (``sweep_lr``).
The CLI writes one PNG per experiment and ``results.md`` (tables and wall times).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from rwkv_ref.model import RWKV, RWKVConfig

from rwkv_ref.recall import (  # noqa: F401 (the chapter reaches them as experiments.X)
    LSTMStack, RecallBatch, RecallSetup, RecallSpec, _select, build_model, markdown_table,
    matched_gpt_ffn, num_params, prompt_order, recall_accuracy, recall_batch, recall_batches,
    recall_experiment, recall_length, recall_loss, recall_pivot, sweep_lr, train_recall_model,
    train_steps)


# ----------------------------------------------------------------------------- 1. parallel vs RNN


def rnn_mode_logits(model: RWKV, idx: Tensor) -> Tensor:
    """RWKV's logits computed the RNN way: ``model.step`` once per token, carrying the state.

    Args:
        idx: (B, T) token ids.
    Returns:
        (B, T, V), in the autograd graph when gradients are enabled (T sequential steps).
    """
    state, out = None, []
    for t in range(idx.shape[1]):
        logits, state = model.step(idx[:, t], state)                         # (B, V)
        out.append(logits)
    return torch.stack(out, dim=1)                                           # (B, T, V)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy of logits (B, T, V) against targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def mode_gradients(model: RWKV, idx: Tensor, targets: Tensor, mode: str) -> dict[str, Tensor]:
    """The gradient of ``lm_loss`` for every parameter, from GPT mode ("gpt") or RNN mode
    ("rnn"). Args: idx, targets (B, T). Returns: {parameter name: gradient}."""
    model.zero_grad(set_to_none=True)
    logits = model(idx)[0] if mode == "gpt" else rnn_mode_logits(model, idx)
    lm_loss(logits, targets).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()
             if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def compare_gradients(model: RWKV, idx: Tensor, targets: Tensor, rtol: float = 1e-6,
                      atol: float = 1e-9) -> dict[str, float]:
    """Assert that GPT mode and RNN mode give the same parameter gradients.

    Use a float64 model for tight tolerances. Every parameter is compared (its largest
    absolute difference, relative to the largest gradient entry of either mode).

    Args:
        model: an RWKV.  idx, targets: (B, T).  rtol, atol: as in ``torch.testing``.
    Returns:
        {parameter name: max |g_gpt - g_rnn|}; ``AssertionError`` naming the first parameter
        that differs (or that only one mode gives a gradient to).
    """
    gpt, rnn = mode_gradients(model, idx, targets, "gpt"), mode_gradients(model, idx, targets,
                                                                           "rnn")
    if gpt.keys() != rnn.keys():
        raise AssertionError(f"GPT and RNN mode give gradients to different parameters: "
                             f"{sorted(gpt.keys() ^ rnn.keys())}")
    diffs = {}
    for name in gpt:
        torch.testing.assert_close(rnn[name], gpt[name], rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")
        diffs[name] = float((gpt[name] - rnn[name]).abs().max())
    return diffs


def count_graph_nodes(loss: Tensor) -> int:
    """The number of autograd nodes behind ``loss``: the operations the backward pass runs,
    one kernel launch (or more) each."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(fn for fn, _ in node.next_functions)
    return len(seen)


def time_training_step(model: RWKV, idx: Tensor, mode: str, repeats: int) -> tuple[float, int]:
    """The best of ``repeats`` timings of forward + backward in ``mode`` ("gpt" or "rnn"), and
    the number of autograd nodes of one step."""
    targets = torch.roll(idx, -1, dims=1)
    best, nodes = math.inf, 0
    for _ in range(repeats):
        start = time.perf_counter()
        logits = model(idx)[0] if mode == "gpt" else rnn_mode_logits(model, idx)
        loss = lm_loss(logits, targets)
        nodes = count_graph_nodes(loss)
        loss.backward()
        best = min(best, time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return best, nodes


def parallel_vs_sequential(Ts=(16, 32, 64, 128, 256), n_layer: int = 2, n_embd: int = 64,
                           batch: int = 8, repeats: int = 3, vocab_size: int = 65) -> list:
    """Seconds per training step (forward + backward) against T: GPT mode with the compiled
    WKV kernel ("gpt-cpp", or ``parallel`` where it is unavailable), GPT mode with the pure
    PyTorch chunked WKV ("gpt-parallel") and RNN mode under autograd ("rnn").

    Before timing, ``compare_gradients`` checks in float64 that the modes agree.

    Returns:
        rows: mode, T, seconds, tokens_per_s, graph_nodes, max_grad_diff (float64 check).
    """
    torch.manual_seed(0)
    check = RWKV(RWKVConfig(vocab_size, n_layer, n_embd)).double()
    _randomise(check)
    idx = torch.randint(vocab_size, (2, 12))
    max_diff = max(compare_gradients(check, idx, torch.roll(idx, -1, 1)).values())
    rows = []
    for mode, impl in (("gpt-cpp", "auto"), ("gpt-parallel", "parallel"), ("rnn", "auto")):
        torch.manual_seed(0)
        model = RWKV(RWKVConfig(vocab_size, n_layer, n_embd, wkv_impl=impl))
        for T in Ts:
            idx = torch.randint(vocab_size, (batch, T))
            seconds, nodes = time_training_step(model, idx, mode.split("-")[0], repeats)
            rows.append({"mode": mode, "T": T, "seconds": seconds,
                         "tokens_per_s": batch * T / seconds, "graph_nodes": nodes,
                         "max_grad_diff": max_diff})
    return rows


@torch.no_grad()
def _randomise(model: RWKV, scale: float = 0.3) -> None:
    """Give every zero-initialised matrix random entries: at the official init the attention
    output is zero, so most gradients would be zero and a comparison of them vacuous."""
    for p in model.parameters():
        if p.dim() == 2:
            p.add_(scale * torch.randn_like(p) / math.sqrt(p.shape[1]))


# ----------------------------------------------------------------------------- 2. gradients


def _first_tensor(out) -> Tensor:
    """A module's main output: the tensor itself, or the first item of a tuple (RWKV blocks
    return (x, state), LSTMs (x, (h, c)))."""
    return out[0] if isinstance(out, tuple) else out


def gradient_profile(model: nn.Module, idx: Tensor, targets: Tensor) -> dict[str, list]:
    """Gradient norms through depth and through time.

    ``layer``: ``||dL/dh_l||`` for the output h_l (B, T, C) of every layer l, L the mean loss
    over all positions. ``time``: ``||d loss_T / d e_{T-1-Δ}||`` for Δ = 0..T-1, e (B, T, C)
    the embedding output and loss_T the loss at the last position (norm over batch and
    channels).

    Args:
        model: RWKV, GPT or LSTMStack (anything with ``emb``/``wte`` and ``blocks``).
        idx, targets: (B, T).
    Returns:
        {"layer": n_layer floats, "time": T floats}.
    """
    captured = []
    emb = model.emb if hasattr(model, "emb") else model.wte
    hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(_first_tensor(out)))
             for m in (emb, *model.blocks)]
    try:
        logits, _ = model(idx)                                               # (B, T, V)
    finally:
        for h in hooks:
            h.remove()
    e, layers = captured[0], captured[1:]
    layer_grads = torch.autograd.grad(lm_loss(logits, targets), layers, retain_graph=True)
    (e_grad,) = torch.autograd.grad(F.cross_entropy(logits[:, -1], targets[:, -1]), e)
    time_norms = e_grad.flip(1).transpose(0, 1).flatten(1).norm(dim=1)       # (T,) by Δ
    return {"layer": [float(g.norm()) for g in layer_grads], "time": time_norms.tolist()}


def text_batches(ids: Tensor, batch: int, T: int, generator: torch.Generator):
    """A function returning (x, y) windows of tiny-shakespeare (``rwkv_ref.data.get_batch``)."""
    from rwkv_ref.data import get_batch

    return lambda: get_batch(ids, batch, T, generator)


def text_loss(model: nn.Module, batch) -> Tensor:
    x, y = batch
    return lm_loss(model(x)[0], y)


def gradient_stability(depths=(2, 4, 8, 16, 32), n_embd: int = 64, T: int = 64,
                       batch: int = 16, steps: int = 60, lrs=(1e-3, 3e-3, 1e-2),
                       sweep_steps: int = 30, sweep_depth: int = 4,
                       kinds=("rwkv", "lstm", "gpt"), text: Tensor | None = None) -> list:
    """Gradient norms per layer and per time distance, at initialisation and after ``steps``
    AdamW steps on tiny-shakespeare, for each kind at each depth.

    Each kind's learning rate comes from a sweep over ``lrs`` at ``sweep_depth`` (kept for
    every depth). ``text``: the token ids to train on (default: tiny-shakespeare's training
    split). Widths are equal (n_embd), so parameter counts differ by kind.

    Returns:
        rows: model, depth, phase ("init" / "trained"), kind ("layer" / "time"), index (the
        layer l from 0, or Δ), grad_norm, relative (to the last layer, or to Δ = 0), lr.
    """
    if text is None:
        from rwkv_ref.data import load_data

        text = load_data().train
    V = int(text.max()) + 1
    eval_batch = text_batches(text, batch, T, torch.Generator().manual_seed(99))()
    rows = []
    for kind in kinds:
        def make(depth=sweep_depth):
            torch.manual_seed(0)
            return build_model(kind, V, depth, n_embd, T)

        lr, _ = sweep_lr(make, text_batches(text, batch, T, torch.Generator().manual_seed(1)),
                         text_loss, lrs, sweep_steps)
        for depth in depths:
            model = make(depth)
            for phase in ("init", "trained"):
                if phase == "trained":
                    train_steps(model, text_batches(text, batch, T,
                                                    torch.Generator().manual_seed(2)),
                                lr, steps, text_loss)
                profile = gradient_profile(model, *eval_batch)
                for what, norms, ref in (("layer", profile["layer"], profile["layer"][-1]),
                                         ("time", profile["time"], profile["time"][0])):
                    rows += [{"model": kind, "depth": depth, "phase": phase, "kind": what,
                              "index": i, "grad_norm": n, "relative": n / ref if ref else 0.0,
                              "lr": lr} for i, n in enumerate(norms)]
    return rows


# ----------------------------------------------------------------------------- plots


def plot_parallel(rows, ax=None):
    """Seconds per training step against T, one line per mode (log-log)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        sel = _select(rows, mode=mode)
        ax.loglog([r["T"] for r in sel], [r["seconds"] for r in sel], "o-", label=mode)
    ax.set(xlabel="T (tokens per sequence)", ylabel="seconds per step (fwd + bwd)",
           title="GPT mode against RNN mode for training")
    ax.legend()
    return ax.figure


def plot_gradients(rows, depth=None, phase="trained"):
    """Two panels at one depth: relative gradient norm per layer, and per time distance."""
    import matplotlib.pyplot as plt

    depth = depth or max(r["depth"] for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for kind, ax, xlabel in (("layer", axes[0], "layer l (0 = first)"),
                             ("time", axes[1], "distance Δ (tokens before the last)")):
        for model in dict.fromkeys(r["model"] for r in rows):
            sel = _select(rows, model=model, depth=depth, phase=phase, kind=kind)
            ax.semilogy([r["index"] for r in sel], [max(r["relative"], 1e-12) for r in sel],
                        ".-", label=model)
        ax.set(xlabel=xlabel, ylabel="gradient norm, relative",
               title=f"{kind}: depth {depth}, {phase}")
        ax.legend()
    fig.tight_layout()
    return fig


def plot_recall(rows, n_pairs=None):
    """Accuracy against distance (at ``n_pairs``, default the largest) and against the number
    of pairs (at the largest distance), one line per (model, width)."""
    import matplotlib.pyplot as plt

    n_pairs = n_pairs or max(r["n_pairs"] for r in rows)
    d_max = max(r["distance"] for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for model, width in dict.fromkeys((r["model"], r["n_embd"]) for r in rows):
        style = "o-" if model == "rwkv" else "s--"
        a = _select(rows, model=model, n_embd=width, n_pairs=n_pairs)
        axes[0].plot([r["distance"] for r in a], [r["accuracy"] for r in a], style,
                     label=f"{model} C={width}")
        b = _select(rows, model=model, n_embd=width, distance=d_max)
        axes[1].plot([r["n_pairs"] for r in b], [r["accuracy"] for r in b], style,
                     label=f"{model} C={width}")
    axes[0].set(xlabel="distance (tokens)", ylabel="accuracy", title=f"{n_pairs} pairs")
    axes[1].set(xlabel="number of pairs", ylabel="accuracy", title=f"distance {d_max}")
    for ax in axes:
        ax.set_ylim(0, 1.02)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_order(rows, ax=None):
    """Accuracy against the number of pairs, query after and before the context."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    for model, order in dict.fromkeys((r["model"], r["order"]) for r in rows):
        sel = _select(rows, model=model, order=order)
        ax.plot([r["n_pairs"] for r in sel], [r["accuracy"] for r in sel],
                "o-" if order == "before" else "s--", label=f"{model}, query {order}")
    ax.set(xlabel="number of pairs", ylabel="accuracy", ylim=(0, 1.02),
           title="prompt order")
    ax.legend()
    return ax.figure


# ----------------------------------------------------------------------------- tables


def gradient_summary(rows) -> list:
    """One row per (model, depth, phase): the first layer's gradient norm relative to the
    last layer's, and the gradient norm at Δ = 8 and at the largest Δ relative to Δ = 0."""
    out = []
    keys = dict.fromkeys((r["model"], r["depth"], r["phase"]) for r in rows)
    for model, depth, phase in keys:
        layer = _select(rows, model=model, depth=depth, phase=phase, kind="layer")
        tm = _select(rows, model=model, depth=depth, phase=phase, kind="time")
        out.append({"model": model, "depth": depth, "phase": phase, "lr": layer[0]["lr"],
                    "first/last layer": layer[0]["relative"],
                    "Δ=8 / Δ=0": tm[min(8, len(tm) - 1)]["relative"],
                    f"Δ={len(tm) - 1} / Δ=0": tm[-1]["relative"]})
    return out


# ----------------------------------------------------------------------------- the CLI

# The settings of each size: keyword arguments of each experiment function.
SIZES = {
    "tiny": {   # the tests: a few seconds in all
        "parallel": dict(Ts=(8, 16), n_layer=1, n_embd=16, batch=2, repeats=1),
        "gradients": dict(depths=(2,), n_embd=16, T=16, batch=4, steps=3, lrs=(3e-3,),
                          sweep_steps=2, sweep_depth=2),
        "recall": dict(widths=(16,), setup=RecallSetup(max_pairs=2, max_distance=6, batch=8,
                                                       steps=4), lrs=(3e-3,), n_eval=16),
        "order_width": 16,
    },
    "small": {  # a few minutes
        "parallel": dict(Ts=(16, 32, 64, 128), n_layer=2, n_embd=32, batch=4, repeats=2),
        "gradients": dict(depths=(2, 8), n_embd=32, T=32, batch=8, steps=30,
                          lrs=(1e-3, 3e-3, 1e-2), sweep_steps=15),
        "recall": dict(widths=(32,), setup=RecallSetup(max_pairs=4, max_distance=16, batch=32,
                                                       steps=500), sweep_steps=120),
        "order_width": 32,
    },
    "full": {   # make experiments: about 20 minutes on 2 cores
        "parallel": dict(Ts=(16, 32, 64, 128, 256, 512), n_layer=2, n_embd=64, batch=8,
                         repeats=3),
        "gradients": dict(depths=(2, 4, 8, 16, 32), n_embd=64, T=64, batch=16, steps=60),
        "recall": dict(widths=(32, 64), setup=RecallSetup(max_pairs=6, max_distance=32,
                                                          batch=32, steps=1500),
                       sweep_steps=250),
        "order_width": 64,
    },
}


def run_all(out_dir: Path, size: str = "full", text: Tensor | None = None) -> dict:
    """Run the four experiments at ``size``; write their PNGs and ``results.md``.

    Returns:
        {"parallel", "gradients", "recall", "recall_models", "order", "order_models",
         "seconds"}: the rows of each experiment and its wall time.
    """
    import matplotlib

    matplotlib.use("Agg")
    cfg, out_dir = SIZES[size], Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res, seconds = {}, {}

    def timed(name, fn):
        start = time.perf_counter()
        value = fn()
        seconds[name] = time.perf_counter() - start
        print(f"experiments: {name} took {seconds[name]:.1f} s", flush=True)
        return value

    res["parallel"] = timed("parallel", lambda: parallel_vs_sequential(**cfg["parallel"]))
    res["gradients"] = timed("gradients", lambda: gradient_stability(**cfg["gradients"],
                                                                     text=text))
    res["recall"], res["recall_models"] = timed("recall",
                                                lambda: recall_experiment(**cfg["recall"]))
    order_kwargs = {k: v for k, v in cfg["recall"].items() if k != "widths"}
    res["order"], res["order_models"] = timed("order", lambda: prompt_order(
        cfg["order_width"], after=(res["recall"], res["recall_models"]), **order_kwargs))
    res["seconds"] = seconds
    write_outputs(res, out_dir, size)
    return res


def write_outputs(res: dict, out_dir: Path, size: str) -> None:
    """The four PNGs and ``results.md`` from ``run_all``'s results."""
    import matplotlib.pyplot as plt

    for name, fig in (("parallel", plot_parallel(res["parallel"])),
                      ("gradients", plot_gradients(res["gradients"])),
                      ("recall", plot_recall(res["recall"])),
                      ("order", plot_order(res["order"]))):
        fig.savefig(out_dir / f"{name}.png", dpi=100)
        plt.close(fig)
    model_cols = ["model", "n_embd", "order", "params", "lr", "sweep", "final_loss", "seconds"]
    pivot = recall_pivot(res["recall"])
    sections = [
        f"# What RWKV can and cannot do: results (--size={size})",
        "## 1. Training step, GPT mode against RNN mode",
        markdown_table(res["parallel"], ["mode", "T", "seconds", "tokens_per_s", "graph_nodes",
                                         "max_grad_diff"]),
        "## 2. Gradient stability",
        markdown_table(gradient_summary(res["gradients"]),
                       list(gradient_summary(res["gradients"])[0])),
        "## 3. Associative recall (accuracy at the largest distance, by number of pairs)",
        markdown_table(pivot, list(pivot[0])),
        markdown_table(res["recall_models"], model_cols),
        "## 4. Prompt order",
        markdown_table(recall_pivot(res["order"]), list(recall_pivot(res["order"])[0])),
        markdown_table(res["order_models"], model_cols),
        "## Wall time",
        markdown_table([{"experiment": k, "seconds": v} for k, v in res["seconds"].items()],
                       ["experiment", "seconds"]),
    ]
    (out_dir / "results.md").write_text("\n\n".join(sections) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rwkv_ref.experiments",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default="out/experiments")
    parser.add_argument("--size", default="full", choices=sorted(SIZES))
    parser.add_argument("--data", default=None, help="the text to train on (default: "
                        "tiny-shakespeare, found as rwkv_ref.data does)")
    args = parser.parse_args(argv)
    from rwkv_ref.data import DataError, load_data

    try:
        text = load_data(args.data).train
    except DataError as e:
        print(f"experiments: {e}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    run_all(Path(args.out_dir), args.size, text)
    print(f"experiments: all done in {time.perf_counter() - start:.1f} s; "
          f"wrote {args.out_dir}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
