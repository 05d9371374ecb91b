"""One training run: everything it carries from step to step, built, seeded or restored.

A ``Run`` holds the config, the processes, the data, the model (bare and DDP-wrapped), the
optimizer, the generators and the metrics so far; ``make_run`` builds one at step 0 or
restores it from its checkpoint.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rwkv_ref.checkpoint import restore
from rwkv_ref.config import CHECKPOINT_NAME, TrainConfig
from rwkv_ref.data import TextData, check_length, get_batch, load_data
from rwkv_ref.distributed import Dist
from rwkv_ref.recipe import autocast_for, build_model, build_optimizer


@dataclass
class Run:
    """Everything a training run carries from step to step (and into its checkpoint)."""

    cfg: TrainConfig
    dist: Dist
    data: TextData
    model: nn.Module             # the bare model: evaluation, checkpoints, sampling
    net: nn.Module               # what the steps call: the model, or DDP around it
    model_config: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batch_gen: torch.Generator   # this rank's training windows
    autocast: object
    step: int = 0                # optimizer steps taken
    last_loss: float | None = None   # the minibatch loss of the latest step
    history: list = field(default_factory=list)   # one metrics row per evaluation
    saved_step: int = -1         # the step of the latest checkpoint
    elapsed_before: float = 0.0  # seconds spent by earlier sessions (before --resume)
    started: float = field(default_factory=time.time)
    window: list = field(default_factory=lambda: [0.0, 0])   # [train seconds, steps] since eval

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def elapsed(self) -> float:
        """Wall-clock seconds of the whole run so far, earlier sessions included."""
        return self.elapsed_before + time.time() - self.started

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.ctx_len


def batch_generator(seed: int, rank: int) -> torch.Generator:
    """The generator of one rank's training windows: seeded with ``seed + rank``."""
    return torch.Generator().manual_seed(seed + rank)


def next_batch(run: Run, ids: Tensor, generator: torch.Generator):
    """This rank's share of a step: ``batch_size / world_size`` windows, on the device.

    Returns:
        x, y: (B / world_size, T) int64.
    """
    x, y = get_batch(ids, run.cfg.batch_size // run.dist.world_size, run.cfg.ctx_len, generator)
    return x.to(run.dist.device, non_blocking=True), y.to(run.dist.device, non_blocking=True)


def load_data_in_turn(path: str, d: Dist) -> TextData:
    """``load_data`` on every rank, rank 0 first (it may download into the shared cache)."""
    if d.world_size > 1 and not d.is_main:
        dist.barrier()
    data = load_data(path or None)
    if d.world_size > 1 and d.is_main:
        dist.barrier()
    return data


def make_run(cfg: TrainConfig, d: Dist) -> Run:
    """Data, model, optimizer and generators, seeded; restored from the checkpoint on --resume.

    Returns:
        A ``Run`` at step 0, or at the checkpoint's step.
    """
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    data = load_data_in_turn(cfg.data, d)
    check_length(data, cfg.ctx_len)
    torch.manual_seed(cfg.seed)                      # the same initial weights on every rank
    random.seed(cfg.seed)
    model, model_config = build_model(cfg, data.tokenizer.vocab_size)
    if d.rank:             # then each rank its own stream (the GPT's dropout); rank 0 goes on
        torch.manual_seed(cfg.seed + d.rank)         # as a single process does
    model.to(d.device)
    optimizer, scheduler = build_optimizer(model, cfg)
    run = Run(cfg, d, data, model, model, model_config, optimizer, scheduler,
              batch_generator(cfg.seed, d.rank), autocast_for(d.device, cfg.dtype))
    if cfg.resume:
        restore(run, run.ckpt_path)
    run.net = wrap(model, cfg, d)
    return run


def wrap(model: nn.Module, cfg: TrainConfig, d: Dist) -> nn.Module:
    """What the training steps call: the model, compiled if ``cfg.compile``, inside DDP when
    there are several processes. The bare model keeps its parameter names, so checkpoints
    written from it carry no "_orig_mod." prefix."""
    net = torch.compile(model) if cfg.compile else model
    if d.world_size > 1:
        device_ids = [d.device.index] if d.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(net, device_ids=device_ids)
    return net
