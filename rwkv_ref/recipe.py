"""The training recipe: which model, its optimizer and schedule, the loss and one backward pass.

The model- and optimisation-specific choices of a run live here, apart from the loop that
repeats them (``rwkv_ref.train``). Three choices of the official RWKV-4 training code
(RWKV-LM, ``RWKV-v4neo/src/model.py``) are options of ``TrainConfig``, all on in the
``official`` preset:

* ``layerwise_lr``: ``time_decay`` learns at twice the base rate, ``time_first`` at three
  times (the ``layerwise_lr`` groups of ``configure_optimizers``);
* ``l2wrap``: ``L2Wrap``, a gradient that pulls each position's largest logit toward 0;
* ``emb_init="lr"``: the embedding drawn from U(-lr, lr), as ``generate_init_weight`` does
  with ``lr_init``, instead of the paper's U(-1e-4, 1e-4) (``RWKV.init_weights``).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rwkv_ref.config import TrainConfig
from rwkv_ref.gpt import GPT, GPTConfig
from rwkv_ref.model import RWKV, RWKVConfig


L2WRAP_FACTOR = 1e-4        # the official code's; divided by the B * T positions of the batch
LR_SCALES = {"time_decay": 2.0, "time_first": 3.0}   # layerwise_lr: per-parameter rate factors


def build_model(cfg: TrainConfig, vocab_size: int):
    """The model ``cfg.model`` names, initialised from the global torch RNG (with
    ``emb_init="lr"`` an RWKV's embedding is then redrawn from U(-lr, lr)).

    Args:
        cfg: sizes come from here.  vocab_size: V, from the tokenizer.
    Returns:
        (model, its config dataclass: ``RWKVConfig`` or ``GPTConfig``).
    """
    if cfg.model == "gpt":
        mc = GPTConfig(vocab_size=vocab_size, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                       n_head=cfg.n_head, ctx_len=cfg.ctx_len, dim_ffn=cfg.dim_ffn,
                       dropout=cfg.dropout)
        return GPT(mc), mc
    mc = RWKVConfig(vocab_size=vocab_size, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                    dim_att=cfg.dim_att or None, dim_ffn=cfg.dim_ffn or None,
                    ctx_len=cfg.ctx_len, wkv_impl=cfg.wkv_impl)
    model = RWKV(mc)
    if cfg.emb_init == "lr":
        with torch.no_grad():
            nn.init.uniform_(model.emb.weight, -cfg.lr, cfg.lr)
    return model, mc


def lr_factor(step: int, warmup_iters: int, max_iters: int, min_ratio: float) -> float:
    """The learning rate of 0-based step ``step`` over ``lr``: linear warm-up, then cosine.

    Args:
        step: steps taken before this one.  warmup_iters: length of the warm-up.
        max_iters: the cosine reaches ``min_ratio`` here.  min_ratio: ``min_lr / lr``.
    Returns:
        A factor in (0, 1].
    """
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    progress = min(1.0, (step - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW's parameter groups: weight decay on matrices only; with ``layerwise_lr`` the
    parameters named in ``LR_SCALES`` get their own groups at that multiple of ``cfg.lr``.

    Returns:
        A list of {"params", "weight_decay", "lr"}; every parameter in exactly one group.
    """
    groups: dict[tuple, list] = {(True, 1.0): [], (False, 1.0): []}   # matrices, vectors
    for name, p in model.named_parameters():
        scale = next((s for key, s in LR_SCALES.items() if name.endswith(key)), 1.0)
        matrix = p.squeeze().dim() >= 2                  # time_mix (1, 1, C) is a vector
        groups.setdefault((matrix, scale if cfg.layerwise_lr else 1.0), []).append(p)
    return [{"params": params, "weight_decay": cfg.weight_decay if matrix else 0.0,
             "lr": cfg.lr * scale} for (matrix, scale), params in groups.items() if params]


def build_optimizer(model: nn.Module, cfg: TrainConfig):
    """AdamW over ``param_groups`` and its warm-up + cosine schedule (it scales every group's
    rate by the same factor, so ``layerwise_lr``'s multiples hold at every step).

    Returns:
        (optimizer, scheduler); call ``scheduler.step()`` after every ``optimizer.step()``.
    """
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    schedule = partial(lr_factor, warmup_iters=cfg.warmup_iters, max_iters=cfg.max_iters,
                       min_ratio=cfg.min_lr / cfg.lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def autocast_for(device: torch.device, dtype: str):
    """A function returning the forward pass's autocast context (a no-op for float32)."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=getattr(torch, dtype))


class L2Wrap(torch.autograd.Function):
    """Identity on the loss; in the backward pass it adds ``factor * m`` to the gradient of
    each position's largest logit m (``factor`` is already divided by the positions).

    That is the gradient of ``loss + factor / 2 * sum over positions of m**2``, a penalty
    whose value is never reported: it keeps logits from drifting upward, which the softmax
    alone does not mind (adding a constant to every logit leaves the loss unchanged).
    """

    @staticmethod
    def forward(ctx, loss: Tensor, logits: Tensor, factor: float) -> Tensor:
        ctx.save_for_backward(logits)
        ctx.factor = factor
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (logits,) = ctx.saved_tensors                                   # (B, T, V)
        top, where = logits.max(dim=-1, keepdim=True)                   # (B, T, 1)
        grad_logits = torch.zeros_like(logits).scatter_(-1, where, top * ctx.factor)
        return grad_loss, grad_logits * grad_loss, None


def compute_loss(model: nn.Module, x: Tensor, y: Tensor, l2wrap: bool = False) -> Tensor:
    """Mean next-character cross-entropy (nats), with ``L2Wrap``'s gradient if ``l2wrap``.

    Args:
        model: maps (B, T) ids to ((B, T, V) logits, state).  x, y: (B, T) token ids.
    Returns:
        A scalar.
    """
    logits, _ = model(x)                                             # (B, T, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    if l2wrap:
        loss = L2Wrap.apply(loss, logits, L2WRAP_FACTOR / (x.shape[0] * x.shape[1]))
    return loss


def forward_backward(model: nn.Module, x: Tensor, y: Tensor, grad_clip: float, autocast,
                     l2wrap: bool = False):
    """Loss, gradients (averaged over processes by DDP) and their clipped global norm.

    Args:
        model: the (possibly DDP-wrapped) model, gradients zero.  x, y: (B, T).
        grad_clip: the largest norm kept (0: no clipping).  autocast: from ``autocast_for``.
        l2wrap: add ``L2Wrap``'s gradient.
    Returns:
        (loss, grad norm before clipping), detached scalars.
    """
    with autocast():
        loss = compute_loss(model, x, y, l2wrap)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    return loss.detach(), norm


def num_params(model: nn.Module) -> int:
    """The number of parameters of any model (RWKV, GPT, or DDP around one)."""
    return sum(p.numel() for p in model.parameters())
