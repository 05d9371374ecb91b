"""Train RWKV (or the GPT baseline) on tiny-shakespeare, on one process or many.

    python -m rwkv_ref.train                              # the cpu preset: ~10 min on 2 cores
    python -m rwkv_ref.train --preset=gpu                 # 6 x 384, ctx 256, bf16 on one GPU
    python -m rwkv_ref.train --n_layer=2 --lr=1e-3        # any TrainConfig field, type-checked
    python -m rwkv_ref.train --model=gpt                  # the transformer baseline, same loop
    python -m rwkv_ref.train --resume --out_dir=out/cpu   # continue from out/cpu/ckpt.pt
    torchrun --nproc_per_node=2 -m rwkv_ref.train         # DistributedDataParallel

Every size and knob is a field of ``TrainConfig``; a preset is a named set of overrides.
Writes to ``out_dir``: ``ckpt.pt`` (at every evaluation, at the end and on Ctrl-C),
``metrics.jsonl``, ``loss.png`` and ``sample.txt``.

Under torchrun every process (rank) draws its own batches, ``batch_size / world_size`` windows
from a generator seeded with ``seed + rank``; DDP averages the gradients, so a step sees
``batch_size`` windows in all. Only rank 0 prints, draws the progress bar and writes files.
"""
from __future__ import annotations

import dataclasses
import difflib
import gc
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from rwkv_ref.data import TextData, get_batch, load_data
from rwkv_ref.wkv import WKV_IMPLS


@dataclass
class TrainConfig:
    """Every knob of a training run. The defaults are the ``cpu`` preset."""

    # model
    model: str = "rwkv"          # "rwkv", or "gpt" for the transformer baseline
    n_layer: int = 4
    n_embd: int = 128
    dim_att: int = 0             # RWKV's WKV width; 0 means n_embd
    dim_ffn: int = 0             # channel-mixing / MLP width; 0 means 4 * n_embd
    n_head: int = 4              # GPT only
    dropout: float = 0.0         # GPT only
    ctx_len: int = 128
    wkv_impl: str = "auto"       # RWKV only: one of rwkv_ref.WKV_IMPLS, or "auto" (fastest)
    # data
    data: str = ""               # a UTF-8 text file; "" for tiny-shakespeare (rwkv_ref.data)
    batch_size: int = 32         # windows per step over all processes
    # optimisation
    max_iters: int = 1000
    lr: float = 4e-3
    min_lr: float = 4e-4         # the cosine ends here at max_iters
    warmup_iters: int = 100      # linear warm-up from lr / warmup_iters
    beta1: float = 0.9
    beta2: float = 0.99          # the official RWKV-4 betas
    weight_decay: float = 0.0    # on matrices only (tensors with 2 or more dimensions)
    grad_clip: float = 1.0       # the largest global gradient norm; 0 means no clipping
    # evaluation and output
    eval_interval: int = 100     # evaluate, log and checkpoint every this many steps
    eval_iters: int = 12         # batches per split and process at each evaluation
    out_dir: str = "out/cpu"
    resume: bool = False         # continue from out_dir/ckpt.pt
    sample_tokens: int = 500     # sampled in RNN mode at the end (0: none)
    sample_prompt: str = "ROMEO:"
    # system
    device: str = "auto"         # "cpu", "cuda", "cuda:1" ...; auto: cuda if available
    dtype: str = "auto"          # "float32" or "bfloat16" (autocast); auto: bf16 on CUDA
    seed: int = 1337
    num_threads: int = 0         # CPU threads per process; 0: the cores / local processes


PRESETS: dict[str, dict] = {
    # The defaults above: 4.1M tokens in under 10 minutes on 2 cores. With the compiled WKV a
    # step of 4096 tokens costs about 0.4 core-seconds (10.5k tokens/s on one quiet core): about
    # 7 minutes on one core, less on two. Validation loss: 1.65 after 1M tokens, 1.52 after
    # 2.5M, 1.48 at the end (nanoGPT's CPU example: 1.88).
    "cpu": {},
    # nanoGPT's shakespeare-char size: 6 x 384, context 256, on one GPU with bf16 autocast
    # (and, as there, weight decay 0.1 against overfitting 1M characters for 80 epochs)
    "gpu": dict(n_layer=6, n_embd=384, ctx_len=256, batch_size=64, max_iters=5000,
                lr=1e-3, min_lr=1e-4, warmup_iters=200, weight_decay=0.1, eval_interval=250,
                eval_iters=100, device="cuda", dtype="bfloat16", out_dir="out/gpu"),
    # make compare: the cpu preset's RWKV, then a GPT of as many parameters, on as many tokens
    "compare": dict(out_dir="out/compare"),
}

CHOICES = {"model": ("rwkv", "gpt"), "dtype": ("auto", "float32", "bfloat16"),
           "wkv_impl": ("auto", *WKV_IMPLS)}


class ConfigError(ValueError):
    """A bad command line or config value; the message says which and what is allowed."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite; nothing was saved at that step."""


# ----------------------------------------------------------------------------- configuration


def _parse_value(name: str, kind: type, text: str | None):
    """One ``--name=text`` value as the field's type; a bare ``--name`` means True for a bool.

    Args:
        name: the field.  kind: its type (bool, int, float or str).  text: the value or None.
    Returns:
        The value, of type ``kind``; ``ConfigError`` if ``text`` is not one.
    """
    if kind is bool:
        table = {None: True, "true": True, "1": True, "yes": True,
                 "false": False, "0": False, "no": False}
        if text is None or text.lower() in table:
            return table[None if text is None else text.lower()]
        raise ConfigError(f"--{name} expects true or false, got {text!r}")
    if text is None:
        raise ConfigError(f"--{name} needs a value: --{name}=...")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"--{name} expects {kind.__name__}, got {text!r}") from None


def apply_overrides(cfg: TrainConfig, overrides: dict[str, str | None]) -> TrainConfig:
    """A copy of ``cfg`` with fields replaced from ``--key=value`` strings, checked by type.

    Args:
        cfg: the starting config.  overrides: {field name: text value, or None for a bare flag}.
    Returns:
        The new ``TrainConfig``; ``ConfigError`` naming close matches for an unknown key.
    """
    types = typing.get_type_hints(TrainConfig)
    values = {}
    for key, text in overrides.items():
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown option --{key}{hint} (see --help)")
        values[key] = _parse_value(key, types[key], text)
    return dataclasses.replace(cfg, **values)


def apply_preset(cfg: TrainConfig, name: str) -> TrainConfig:
    """``cfg`` with the named preset's values; ``ConfigError`` listing the presets if unknown."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(cfg, **PRESETS[name])


def parse_args(argv: list[str]) -> tuple[str | None, dict[str, str | None]]:
    """Split ``--preset=NAME --key=value ...`` into the preset name and the other overrides.

    Returns:
        (preset name or None, {key: value text, or None for a bare ``--key``}).
    """
    preset, overrides = None, {}
    for arg in argv:
        if not arg.startswith("--") or len(arg) < 3:
            raise ConfigError(f"arguments look like --key=value, got {arg!r} (see --help)")
        key, eq, value = arg[2:].partition("=")
        if key == "preset":
            preset = value
        else:
            overrides[key] = value if eq else None
    return preset, overrides


def config_from_args(argv: list[str], default_preset: str = "cpu") -> TrainConfig:
    """The run's config: the preset (``default_preset`` if none is named), then the command
    line's overrides.

    With ``--resume`` and an existing ``out_dir/ckpt.pt``, the saved run's config is the base
    instead, so ``--resume --out_dir=DIR`` continues that run; the preset (only if named) and
    the overrides given here still apply on top (e.g. ``--max_iters`` to train longer).
    """
    preset, overrides = parse_args(argv)
    cfg = apply_overrides(apply_preset(TrainConfig(), preset or default_preset), overrides)
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    if cfg.resume and ckpt_path.is_file():
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)["train_config"]
        cfg = TrainConfig(**saved)
        cfg = apply_overrides(apply_preset(cfg, preset) if preset else cfg, overrides)
    return cfg


def check_config(cfg: TrainConfig, world_size: int) -> None:
    """Raise ``ConfigError`` for values no run can use (choices, positive sizes, divisibility)."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"--{name} must be one of {allowed}, got {getattr(cfg, name)!r}")
    for name in ("n_layer", "n_embd", "ctx_len", "batch_size", "max_iters", "eval_interval",
                 "eval_iters"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.batch_size % world_size:
        raise ConfigError(f"--batch_size={cfg.batch_size} does not split evenly over "
                          f"{world_size} processes")
    if not cfg.lr > 0:
        raise ConfigError(f"--lr must be positive, got {cfg.lr}")


def usage() -> str:
    """The --help text: every field with its default, and the presets."""
    lines = [__doc__.strip(), "", "Options (TrainConfig; the defaults are the cpu preset):"]
    for f in dataclasses.fields(TrainConfig):
        lines.append(f"  --{f.name}={f.default}")
    lines.append("Presets: " + "; ".join(f"--preset={name} {values or '(the defaults)'}"
                                         for name, values in PRESETS.items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- processes


@dataclass
class Dist:
    """Where this process sits: rank ``rank`` of ``world_size`` (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1    # processes on this machine (they share its cores)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Join the process group when torchrun started this process, else run alone.

    torchrun's launch protocol sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE (and the
    rendezvous address); those are read here and nowhere else. gloo on the CPU, NCCL on GPUs,
    where each process takes the GPU of its local rank.

    Args:
        device: the config's device: "auto", "cpu", "cuda" or "cuda:N".
    Returns:
        ``Dist``.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(device=dev)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_world, dev)


def cpu_count() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def all_mean(values: Tensor, d: Dist) -> Tensor:
    """The mean of ``values`` over all processes (``values`` itself when alone)."""
    if d.world_size > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= d.world_size
    return values


def gather(obj, d: Dist) -> list:
    """``[obj of rank 0, obj of rank 1, ...]``; every process must call it."""
    if d.world_size == 1:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


class StopRequest:
    """Ctrl-C handling: the first SIGINT asks the loop to save and stop after the current step;
    another one, a few seconds later, raises ``KeyboardInterrupt`` at once (nothing more is
    saved). Repeats within those seconds are one request: a Ctrl-C in a terminal reaches a
    torchrun worker twice, once from the terminal and once forwarded by torchrun."""

    PATIENCE_S = 3.0

    def __init__(self, announce: bool = True):
        self.requested = False
        self.announce = announce        # print the notice (rank 0 only)
        self._first = 0.0
        self._previous = None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():   # signals need the main thread
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if time.monotonic() - self._first > self.PATIENCE_S:
                raise KeyboardInterrupt
            return
        self.requested, self._first = True, time.monotonic()
        if self.announce:
            print("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to quit "
                  "without saving)", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- building blocks


def build_model(cfg: TrainConfig, vocab_size: int):
    """The model ``cfg.model`` names, initialised from the global torch RNG.

    Args:
        cfg: sizes come from here.  vocab_size: V, from the tokenizer.
    Returns:
        (model, its config dataclass: ``RWKVConfig`` or ``GPTConfig``).
    """
    if cfg.model == "gpt":
        from rwkv_ref.gpt import GPT, GPTConfig

        mc = GPTConfig(vocab_size=vocab_size, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                       n_head=cfg.n_head, ctx_len=cfg.ctx_len, dim_ffn=cfg.dim_ffn,
                       dropout=cfg.dropout)
        return GPT(mc), mc
    from rwkv_ref.model import RWKV, RWKVConfig

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


# ----------------------------------------------------------------------------- one run


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
    torch.manual_seed(cfg.seed)                      # the same initial weights on every rank
    random.seed(cfg.seed)
    model, model_config = build_model(cfg, data.tokenizer.vocab_size)
    model.to(d.device)
    optimizer, scheduler = build_optimizer(model, cfg)
    run = Run(cfg, d, data, model, model, model_config, optimizer, scheduler,
              batch_generator(cfg.seed, d.rank), autocast_for(d.device, cfg.dtype))
    ckpt_path = run.out_dir / "ckpt.pt"
    if cfg.resume and ckpt_path.is_file():
        restore(run, ckpt_path)
    elif cfg.resume and d.is_main:
        print(f"--resume: no checkpoint at {ckpt_path}; starting from scratch")
    if d.world_size > 1:
        device_ids = [d.device.index] if d.device.type == "cuda" else None
        run.net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return run


# ----------------------------------------------------------------------------- checkpoints


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` into a temporary file in the same folder, then rename it over ``path``:
    a reader (or a crash) never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)                          # mkstemp makes it private (0600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def checkpoint_dict(run: Run) -> dict:
    """Everything ``--resume`` needs to continue bit for bit. Every rank must call it (the
    batch generators' states are gathered from all ranks)."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "batch": gather(run.batch_gen.get_state(), run.dist)}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "model": run.model.state_dict(),
        "model_type": run.cfg.model,
        "model_config": asdict(run.model_config),
        "tokenizer": run.data.tokenizer.to_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": rng,
        "step": run.step,
        "train_config": asdict(run.cfg),
        "history": run.history,
        "elapsed_s": elapsed(run),
    }


def save_checkpoint(run: Run) -> None:
    """Write ``out_dir/ckpt.pt`` atomically (rank 0; every rank must call this)."""
    ckpt = checkpoint_dict(run)
    if run.dist.is_main:
        atomic_save(ckpt, run.out_dir / "ckpt.pt")
    run.saved_step = run.step


def restore(run: Run, path: Path) -> None:
    """Load weights, optimizer, schedule, step, metrics and every RNG state from ``path``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt["tokenizer"] != run.data.tokenizer.to_dict():
        raise ConfigError(f"{path} was trained on a text with another alphabet than "
                          f"{run.data.path}; pass the same --data")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.step, run.saved_step, run.history = ckpt["step"], ckpt["step"], ckpt["history"]
    run.elapsed_before = ckpt["elapsed_s"]
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(ckpt["rng"]["python"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    batch_states = ckpt["rng"]["batch"]
    if len(batch_states) == run.dist.world_size:
        run.batch_gen.set_state(batch_states[run.dist.rank])
    else:  # a new stream, not the old one's start again
        run.batch_gen.manual_seed(run.cfg.seed + 1000 * run.step + run.dist.rank)
        if run.dist.is_main:
            print(f"--resume: the checkpoint was written by {len(batch_states)} processes, this "
                  f"run has {run.dist.world_size}: batches are reseeded (not bit for bit)")
    if run.dist.is_main:
        print(f"resumed from {path} at step {run.step}")


# ----------------------------------------------------------------------------- evaluation, files


def elapsed(run: Run) -> float:
    """Wall-clock seconds of the whole run so far, earlier sessions included."""
    return run.elapsed_before + time.time() - run.started


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
           "elapsed_s": round(elapsed(run), 2)}
    run.history.append(row)
    run.window = [0.0, 0]
    if run.dist.is_main:
        write_metrics(run.history, run.out_dir / "metrics.jsonl")
        tqdm.write(f"step {run.step}: train loss {row['train_loss']:.4f}, "
                   f"val loss {row['val_loss']:.4f}")
    return row


def write_metrics(history: list[dict], path: Path) -> None:
    """The history as JSON lines, replacing the file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    os.replace(tmp, path)


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


# ----------------------------------------------------------------------------- the loop


def sync_step(run: Run, loss: Tensor, norm: Tensor, stop: bool) -> tuple[float, float, bool]:
    """Agree across processes on the step's loss, gradient norm and whether to stop (one
    all-reduce, so that every rank stops at the same step).

    Returns:
        (mean loss, gradient norm, stop requested on any rank).
    """
    stats = torch.stack([loss.float(), norm.float(),
                         torch.tensor(float(stop), device=loss.device)])
    loss_mean, norm_mean, stop_any = all_mean(stats, run.dist).tolist()
    return loss_mean, norm_mean, stop_any > 0


def take_step(run: Run, stop: StopRequest) -> bool:
    """One optimizer step on a fresh batch; ``TrainingDiverged`` before updating anything if
    the loss or the gradient norm is not finite.

    Returns:
        True when some rank asked to stop (Ctrl-C).
    """
    tick = time.perf_counter()
    x, y = next_batch(run, run.data.train, run.batch_gen)
    loss, norm = forward_backward(run.net, x, y, run.cfg.grad_clip, run.autocast)
    loss, norm, stop_now = sync_step(run, loss, norm, stop.requested)
    if not (math.isfinite(loss) and math.isfinite(norm)):
        where = (f"the last good checkpoint ({run.out_dir / 'ckpt.pt'}, step {run.saved_step}) "
                 f"is untouched" if run.saved_step >= 0 else "no checkpoint was written")
        raise TrainingDiverged(f"step {run.step + 1}: loss {loss}, gradient norm {norm}: "
                               f"training stopped; {where}. Try a lower --lr.")
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step, run.last_loss = run.step + 1, loss
    run.window[0] += time.perf_counter() - tick
    run.window[1] += 1
    return stop_now


def train_loop(run: Run, stop: StopRequest) -> bool:
    """Steps until ``max_iters``, evaluating and checkpointing every ``eval_interval`` steps.

    Returns:
        True when stopped early by Ctrl-C (after saving a checkpoint).
    """
    cfg = run.cfg
    if run.step == 0:
        evaluate(run)                                # the loss of the untrained model
    bar = tqdm(total=cfg.max_iters, initial=run.step, disable=not run.dist.is_main,
               unit="step", dynamic_ncols=True, mininterval=0.5)   # tqdm's ETA: time left
    with bar:
        while run.step < cfg.max_iters:
            stop_now = take_step(run, stop)
            seconds, steps = run.window                 # training only, since the last eval
            bar.set_postfix(loss=f"{run.last_loss:.3f}",
                            tok_s=f"{steps * run.tokens_per_step / seconds:,.0f}", refresh=False)
            bar.update()
            if run.step % cfg.eval_interval == 0 or run.step == cfg.max_iters:
                evaluate(run)
                save_checkpoint(run)
            if stop_now:
                if run.saved_step != run.step:
                    save_checkpoint(run)
                return True
    return False


def finish(run: Run, interrupted: bool) -> None:
    """Rank 0: the loss curve, a sample (unless interrupted) and a summary line."""
    if not run.dist.is_main:
        return
    path = run.out_dir / "loss.png"
    plot_losses(run.history, path, f"{run.cfg.model}: {num_params(run.model) / 1e6:.2f}M "
                                   f"parameters, context {run.cfg.ctx_len}")
    if interrupted:
        print(f"stopped at step {run.step}; checkpoint {run.out_dir / 'ckpt.pt'} "
              f"(continue with --resume --out_dir={run.cfg.out_dir})")
        return
    if run.cfg.sample_tokens > 0:
        write_sample(run)
    last = run.history[-1]
    print(f"step {last['step']}: val loss {last['val_loss']:.4f}, train loss "
          f"{last['train_loss']:.4f}, {last['elapsed_s']:.0f} s; wrote {run.out_dir}")


def num_params(model: nn.Module) -> int:
    """The number of parameters."""
    return sum(p.numel() for p in model.parameters())


@dataclass
class TrainResult:
    history: list[dict]          # the metrics rows
    interrupted: bool            # stopped by Ctrl-C
    num_params: int
    out_dir: Path


def train(cfg: TrainConfig) -> TrainResult:
    """Train as ``cfg`` says, alone or as one process of a torchrun job.

    Raises:
        ConfigError for unusable settings; TrainingDiverged on a non-finite loss or gradient.
    """
    d = setup_distributed(cfg.device)
    threads = torch.get_num_threads()
    finished = False
    try:
        result = _train(cfg, d)
        finished = True
        return result
    finally:
        torch.set_num_threads(threads)          # as it was: train() may be one call of many
        if dist.is_initialized():
            close_distributed(finished)


def _train(cfg: TrainConfig, d: Dist) -> TrainResult:
    """``train`` once the processes are set up; the model dies with this frame."""
    check_config(cfg, d.world_size)
    torch.set_num_threads(cfg.num_threads or max(1, cpu_count() // d.local_world_size))
    run = make_run(cfg, d)
    if d.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        print(f"training {cfg.model}: {num_params(run.model):,} parameters, "
              f"{d.world_size} process(es) on {d.device}, {torch.get_num_threads()} "
              f"thread(s) each, {run.tokens_per_step:,} tokens per step", flush=True)
    with StopRequest(announce=d.is_main) as stop:
        interrupted = train_loop(run, stop)
    finish(run, interrupted)
    return TrainResult(run.history, interrupted, num_params(run.model), run.out_dir)


def close_distributed(finished: bool) -> None:
    """Tear the process group down in step on every rank.

    The DDP wrapper keeps a reference to the process group, and its reference cycles can keep
    it alive until the interpreter shuts down; gloo's worker threads dying then abort the
    process ("terminate called without an active exception"). So: collect the wrapper first,
    then (after a normal finish) wait for every rank, then destroy the group.
    """
    gc.collect()
    if finished:
        dist.barrier()                          # rank 0 may still be plotting and sampling
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (130 after Ctrl-C, as shells expect)."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(usage())
        return 0
    try:
        result = train(config_from_args(argv))
    except ConfigError as e:
        print(f"rwkv_ref.train: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"rwkv_ref.train: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rwkv_ref.train: interrupted; nothing saved since the last checkpoint",
              file=sys.stderr)
        return 130
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
