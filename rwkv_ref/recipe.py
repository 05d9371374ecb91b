"""The training recipe: which model, its optimizer and schedule, the loss and one backward pass.

The model- and optimisation-specific choices of a run live here, apart from the loop that
repeats them (``rwkv_ref.train``).
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


def build_model(cfg: TrainConfig, vocab_size: int):
    """The model ``cfg.model`` names, initialised from the global torch RNG.

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
    return RWKV(mc), mc


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


def build_optimizer(model: nn.Module, cfg: TrainConfig):
    """AdamW (weight decay on matrices only) and its warm-up + cosine schedule.

    Returns:
        (optimizer, scheduler); call ``scheduler.step()`` after every ``optimizer.step()``.
    """
    params = list(model.parameters())
    matrices = [p for p in params if p.squeeze().dim() >= 2]   # time_mix (1, 1, C) is a vector
    vectors = [p for p in params if p.squeeze().dim() < 2]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay},
              {"params": vectors, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
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


def compute_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean next-character cross-entropy (nats). x, y: (B, T) token ids. Returns: a scalar."""
    logits, _ = model(x)                                             # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def forward_backward(model: nn.Module, x: Tensor, y: Tensor, grad_clip: float, autocast):
    """Loss, gradients (averaged over processes by DDP) and their clipped global norm.

    Args:
        model: the (possibly DDP-wrapped) model, gradients zero.  x, y: (B, T).
        grad_clip: the largest norm kept (0: no clipping).  autocast: from ``autocast_for``.
    Returns:
        (loss, grad norm before clipping), detached scalars.
    """
    with autocast():
        loss = compute_loss(model, x, y)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    return loss.detach(), norm


def num_params(model: nn.Module) -> int:
    """The number of parameters of any model (RWKV, GPT, or DDP around one)."""
    return sum(p.numel() for p in model.parameters())
