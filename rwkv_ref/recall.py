"""The synthetic associative-recall task of chapter 12, the small models it compares, and the
tiny training loop the experiments share (``rwkv_ref.experiments`` runs them).

A sequence holds key-value pairs, filler, and a query key; the model must name the value paired
with the query, ``distance`` tokens after (or, in the "before" order, before) the pair.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from rwkv_ref.gpt import GPT, GPTConfig
from rwkv_ref.model import RWKV, RWKVConfig

# ----------------------------------------------------------------------------- the recall task


@dataclass(frozen=True)
class RecallSpec:
    """The alphabet of the associative-recall task.

    Token ids: keys ``[0, n_keys)``, values ``[n_keys, n_keys + n_values)``, then ``n_noise``
    filler symbols, then the query marker ``Q`` and the answer marker ``A``.
    """

    n_keys: int = 32
    n_values: int = 32
    n_noise: int = 8

    @property
    def query(self) -> int:
        return self.n_keys + self.n_values + self.n_noise

    @property
    def answer(self) -> int:
        return self.query + 1

    @property
    def vocab_size(self) -> int:
        return self.query + 2


def recall_length(n_pairs: int, distance: int) -> int:
    """The shortest sequence that holds ``n_pairs`` pairs with the query ``distance`` tokens
    after its key: ``2 n_pairs + distance``."""
    return 2 * n_pairs + distance


@dataclass
class RecallBatch:
    idx: Tensor        # (B, T) int64 token ids
    target: Tensor     # (B,) the value paired with the query key (predicted at idx[:, -1])
    query_key: Tensor  # (B,)
    key_pos: Tensor    # (B,) position of the queried pair's key in idx


def recall_batch(batch: int, n_pairs: int, distance: int, order: str = "after",
                 length: int | None = None, spec: RecallSpec = RecallSpec(),
                 generator: torch.Generator | None = None) -> RecallBatch:
    """Associative-recall sequences: ``n_pairs`` (key, value) pairs, one of which is queried.

    order "after" (context, then question)::

        noise  k_1 v_1 ... k_n v_n  noise  Q k_q A        -> predict v_q at A

    with ``distance`` = position of the ``k_q`` after Q minus position of k_q in the pairs,
    exactly, for every row (the queried pair is drawn among those that allow it, the noise
    before the pairs pads every row to ``length``). order "before" (question, then context)
    moves the two tokens ``Q k_q`` to the front: the same tokens, the same pairs, the same
    answer. Keys within a row are distinct; values and noise are drawn uniformly.

    Args:
        batch: B.  n_pairs: n >= 1 (at most ``spec.n_keys``).  distance: >= 3.
        order: "after" or "before".  length: T >= ``recall_length(n_pairs, distance) ``
            (default: that).  spec: the alphabet.  generator: the torch RNG.
    Returns:
        ``RecallBatch``; idx (B, T).
    """
    T = recall_length(n_pairs, distance) if length is None else length
    _check_recall(n_pairs, distance, order, T, spec)
    g = generator
    keys = torch.argsort(torch.rand(batch, spec.n_keys, generator=g), dim=1)[:, :n_pairs]
    values = spec.n_keys + torch.randint(spec.n_values, (batch, n_pairs), generator=g)
    # pair j sits at 2j after the front noise; d = 2n + gap + 1 - 2j with gap >= 0
    j_min = max(0, math.ceil((2 * n_pairs + 1 - distance) / 2))
    j = torch.randint(j_min, n_pairs, (batch,), generator=g)                  # (B,)
    gap = distance - 1 - 2 * n_pairs + 2 * j                                  # (B,)
    front = T - 3 - 2 * n_pairs - gap                                         # (B,)
    n_ctx = T - 3
    idx = spec.n_keys + spec.n_values + torch.randint(spec.n_noise, (batch, T), generator=g)
    pos = front[:, None] + 2 * torch.arange(n_pairs)                          # (B, n)
    rows = torch.arange(batch)[:, None]
    idx[rows, pos], idx[rows, pos + 1] = keys, values
    query_key, target = keys[torch.arange(batch), j], values[torch.arange(batch), j]
    idx[:, n_ctx], idx[:, n_ctx + 1], idx[:, n_ctx + 2] = spec.query, query_key, spec.answer
    key_pos = front + 2 * j
    if order == "before":
        idx = torch.cat([idx[:, n_ctx:n_ctx + 2], idx[:, :n_ctx], idx[:, -1:]], dim=1)
        key_pos = key_pos + 2
    return RecallBatch(idx, target, query_key, key_pos)


def _check_recall(n_pairs: int, distance: int, order: str, T: int, spec: RecallSpec) -> None:
    """One clear ``ValueError`` for task settings that cannot make a sequence."""
    if not 1 <= n_pairs <= spec.n_keys:
        raise ValueError(f"recall_batch: n_pairs must lie in [1, {spec.n_keys}] (n_keys), "
                         f"got {n_pairs}")
    if distance < 3:
        raise ValueError(f"recall_batch: distance must be >= 3 (the last pair's key to the "
                         f"query key), got {distance}")
    if order not in ("after", "before"):
        raise ValueError(f"recall_batch: order must be 'after' or 'before', got {order!r}")
    if T < recall_length(n_pairs, distance):
        raise ValueError(f"recall_batch: length {T} is too short; n_pairs = {n_pairs} at "
                         f"distance {distance} needs {recall_length(n_pairs, distance)}")


# ----------------------------------------------------------------------------- models


class LSTMStack(nn.Module):
    """The classic recurrent baseline: embedding, ``n_layer`` stacked LSTMs of width C (no
    residual connections, no normalisation), linear head. Called like ``RWKV``:
    ``logits, None = model(idx)``."""

    def __init__(self, vocab_size: int, n_layer: int, n_embd: int):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, n_embd)
        self.blocks = nn.ModuleList(nn.LSTM(n_embd, n_embd, batch_first=True)
                                    for _ in range(n_layer))
        self.head = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, idx: Tensor, state=None):
        """idx (B, T) -> logits (B, T, V), None."""
        x = self.emb(idx)                                                    # (B, T, C)
        for block in self.blocks:
            x, _ = block(x)                                                  # (B, T, C)
        return self.head(x), None


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(kind: str, vocab_size: int, n_layer: int, n_embd: int, ctx_len: int,
                dim_ffn: int | None = None, wkv_impl: str = "auto") -> nn.Module:
    """A freshly initialised model: kind "rwkv", "gpt" (n_head = max(1, C // 32)) or "lstm".

    Args:
        vocab_size: V.  n_layer, n_embd: depth and width.  ctx_len: the longest input (the
        GPT's learned positions).  dim_ffn: the MLP width (None: 4C).  wkv_impl: RWKV's WKV.
    """
    if kind == "rwkv":
        return RWKV(RWKVConfig(vocab_size, n_layer, n_embd, dim_ffn=dim_ffn, ctx_len=ctx_len,
                               wkv_impl=wkv_impl))
    if kind == "gpt":
        return GPT(GPTConfig(vocab_size, n_layer, n_embd, max(1, n_embd // 32), ctx_len,
                             dim_ffn=dim_ffn or 0))
    if kind == "lstm":
        return LSTMStack(vocab_size, n_layer, n_embd)
    raise ValueError(f"unknown model kind {kind!r}; choose 'rwkv', 'gpt' or 'lstm'")


def matched_gpt_ffn(vocab_size: int, n_layer: int, n_embd: int, ctx_len: int) -> int:
    """The GPT MLP width that brings its parameter count closest to the RWKV's of the same
    depth and width (one more MLP unit adds 2C parameters per layer)."""
    with torch.device("meta"):
        target = num_params(build_model("rwkv", vocab_size, n_layer, n_embd, ctx_len))
        base = num_params(build_model("gpt", vocab_size, n_layer, n_embd, ctx_len))
    return max(1, 4 * n_embd + round((target - base) / (2 * n_embd * n_layer)))


# ----------------------------------------------------------------------------- training


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW with the RWKV-4 betas (0.9, 0.99), no weight decay."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)


def train_steps(model: nn.Module, batches, lr: float, steps: int, loss_fn) -> list[float]:
    """``steps`` AdamW steps with a linear warm-up over the first 10% and gradient clipping at
    1.0; ``batches()`` returns one batch, ``loss_fn(model, batch)`` its scalar loss.

    Returns:
        the loss of every step (float; a NaN stops training and fills the rest with NaN).
    """
    opt = make_optimizer(model, lr)
    warmup = max(1, steps // 10)
    losses = []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        loss = loss_fn(model, batches())
        if not torch.isfinite(loss):
            return losses + [math.nan] * (steps - step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def sweep_lr(make, batches, loss_fn, lrs, steps: int) -> tuple[float, dict]:
    """The learning rate among ``lrs`` whose short run of ``steps`` ends lowest (the mean loss
    of its last quarter), each run from the same fresh model ``make()``.

    Returns:
        (best lr, {lr: that final loss}).
    """
    finals = {}
    for lr in lrs:
        losses = train_steps(make(), batches, lr, steps, loss_fn)
        tail = losses[-max(1, steps // 4):]
        finals[lr] = sum(tail) / len(tail)
    best = min(finals, key=lambda lr: math.inf if math.isnan(finals[lr]) else finals[lr])
    return best, finals


# ----------------------------------------------------------------------------- recall training


@dataclass(frozen=True)
class RecallSetup:
    """How the recall models train: each batch draws n_pairs in [1, max_pairs] and a distance
    in [3, max_distance]; every sequence is padded to ``length`` so that the answer always
    sits at the same position."""

    max_pairs: int = 8
    max_distance: int = 48
    order: str = "after"
    batch: int = 32
    steps: int = 600
    spec: RecallSpec = RecallSpec()

    @property
    def length(self) -> int:
        return recall_length(self.max_pairs, self.max_distance)


def recall_batches(setup: RecallSetup, generator: torch.Generator):
    """A function that returns the next training ``RecallBatch`` of ``setup``."""
    def next_batch() -> RecallBatch:
        n = int(torch.randint(1, setup.max_pairs + 1, (), generator=generator))
        d = int(torch.randint(3, setup.max_distance + 1, (), generator=generator))
        return recall_batch(setup.batch, n, d, setup.order, setup.length, setup.spec,
                            generator)
    return next_batch


def recall_loss(model: nn.Module, batch: RecallBatch) -> Tensor:
    """Cross-entropy of the answer, predicted at the last position only."""
    logits, _ = model(batch.idx)                                             # (B, T, V)
    return F.cross_entropy(logits[:, -1], batch.target)


@torch.no_grad()
def recall_accuracy(model: nn.Module, setup: RecallSetup, n_pairs: int, distance: int,
                    n_eval: int, generator: torch.Generator) -> float:
    """The fraction of ``n_eval`` fresh sequences whose answer is the argmax at the end."""
    model.eval()
    batch = recall_batch(n_eval, n_pairs, distance, setup.order, setup.length, setup.spec,
                         generator)
    logits, _ = model(batch.idx)                                             # (B, T, V)
    return float((logits[:, -1].argmax(-1) == batch.target).float().mean())


def train_recall_model(kind: str, n_embd: int, setup: RecallSetup, lrs, sweep_steps: int,
                       n_layer: int = 2, seed: int = 0) -> tuple[nn.Module, dict]:
    """Sweep the learning rate on short runs, then train ``kind`` for ``setup.steps``.

    The GPT's MLP width is set so that its parameter count matches the RWKV's of the same
    depth and width (``matched_gpt_ffn``). Returns the trained model and a row describing it
    (kind, n_embd, params, lr, the sweep's losses, final loss, seconds).
    """
    V, T = setup.spec.vocab_size, setup.length
    ffn = matched_gpt_ffn(V, n_layer, n_embd, T) if kind == "gpt" else None

    def make() -> nn.Module:
        torch.manual_seed(seed)
        return build_model(kind, V, n_layer, n_embd, T, dim_ffn=ffn)

    start = time.perf_counter()
    lr, finals = sweep_lr(make, recall_batches(setup, torch.Generator().manual_seed(seed + 1)),
                          recall_loss, lrs, sweep_steps) if len(lrs) > 1 else (lrs[0], {})
    model = make()
    losses = train_steps(model, recall_batches(setup, torch.Generator().manual_seed(seed + 2)),
                         lr, setup.steps, recall_loss)
    tail = losses[-max(1, len(losses) // 10):]
    return model, {"model": kind, "n_embd": n_embd, "order": setup.order,
                   "params": num_params(model), "lr": lr,
                   "sweep": {f"{k:g}": round(v, 3) for k, v in finals.items()},
                   "final_loss": sum(tail) / len(tail),
                   "seconds": time.perf_counter() - start}


def recall_experiment(widths=(32, 64), setup: RecallSetup = RecallSetup(),
                      distances=None, pairs=None, lrs=(1e-3, 3e-3), sweep_steps: int = 200,
                      n_eval: int = 256, kinds=("rwkv", "gpt")) -> tuple[list, list]:
    """Associative recall, RWKV against the GPT at (nearly) equal parameters, at each width.

    Each (kind, width) trains once on the mixture of ``setup`` and is then evaluated on fresh
    sequences at every (n_pairs, distance) of the grid.

    Args:
        widths: the n_embd values (the RWKV state per layer grows as 5 n_embd numbers).
        setup: the task and training lengths.  distances, pairs: the evaluation grid (default:
        6 distances up to ``max_distance`` and 1, 2, 4, ... up to ``max_pairs``).
        lrs: the learning-rate sweep.  sweep_steps: steps of each sweep run.  n_eval: sequences
        per grid point.  kinds: which models.
    Returns:
        (accuracy rows: model, n_embd, order, params, n_pairs, distance, accuracy;
         model rows: one per trained model, see ``train_recall_model``).
    """
    distances = distances or sorted({3, *(max(3, round(setup.max_distance * f)) for f in
                                          (0.2, 0.4, 0.6, 0.8, 1.0))})
    pairs = pairs or sorted({1, *(2 ** i for i in range(1, 8) if 2 ** i < setup.max_pairs),
                             setup.max_pairs})
    rows, models = [], []
    for n_embd in widths:
        for kind in kinds:
            model, info = train_recall_model(kind, n_embd, setup, lrs, sweep_steps)
            models.append(info)
            g = torch.Generator().manual_seed(12345)
            for n in pairs:
                for d in distances:
                    acc = recall_accuracy(model, setup, n, d, n_eval, g)
                    rows.append({"model": kind, "n_embd": n_embd, "order": setup.order,
                                 "params": info["params"], "n_pairs": n, "distance": d,
                                 "accuracy": acc})
    return rows, models


def prompt_order(n_embd: int = 64, setup: RecallSetup = RecallSetup(), pairs=None,
                 distance: int | None = None, after: tuple | None = None,
                 **kwargs) -> tuple[list, list]:
    """The recall task with the query after the context and before it (``recall_experiment``
    at one width, once per order; ``kwargs`` go there).

    Args:
        after: (rows, models) of a ``recall_experiment`` run of the "after" order at this width
            and ``setup`` to reuse instead of training those models again.
    Returns:
        (accuracy rows as ``recall_experiment``'s at ``distance`` (default the largest),
        with "order"; model rows).
    """
    distance = distance or setup.max_distance
    rows, models = [], []
    for order in ("after", "before"):
        if order == "after" and after is not None:
            r = [x for x in after[0] if x["n_embd"] == n_embd and x["distance"] == distance]
            m = [x for x in after[1] if x["n_embd"] == n_embd]
        else:
            r, m = recall_experiment((n_embd,), dataclasses.replace(setup, order=order),
                                     distances=[distance], pairs=pairs, **kwargs)
        rows, models = rows + r, models + m
    return rows, models


# ----------------------------------------------------------------------------- tables


def _select(rows, **match) -> list:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def markdown_table(rows, columns) -> str:
    """A markdown table of ``rows`` (dicts) with the given columns; floats to 4 significant
    digits."""
    def fmt(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)



def recall_pivot(rows, distance=None) -> list:
    """Accuracy by number of pairs (columns) at one distance, one row per (model, width,
    order)."""
    distance = distance or max(r["distance"] for r in rows)
    out = {}
    for r in _select(rows, distance=distance):
        key = (r["model"], r["n_embd"], r["order"])
        row = out.setdefault(key, {"model": r["model"], "n_embd": r["n_embd"],
                                   "order": r["order"], "params": r["params"]})
        row[f"{r['n_pairs']} pairs"] = r["accuracy"]
    return list(out.values())
