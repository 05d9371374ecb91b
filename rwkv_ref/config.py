"""The knobs of a training run: ``TrainConfig``, its presets and the ``--key=value`` command line.

Every size and knob of a run is a field of ``TrainConfig``; a preset is a named set of
overrides; the command line overrides fields by name, checked against their types.
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from rwkv_ref.data import DataError
from rwkv_ref.files import FileProblem, load_torch
from rwkv_ref.wkv import WKV_IMPLS

CHECKPOINT_NAME = "ckpt.pt"     # out_dir/ckpt.pt: what --resume continues from
USAGE = """Train RWKV (or the GPT baseline) on tiny-shakespeare, on one process or many.

    python -m rwkv_ref.train                              # the cpu preset: ~10 min on 2 cores
    python -m rwkv_ref.train --preset=gpu                 # 6 x 384, ctx 256, bf16, compiled
    python -m rwkv_ref.train --preset=official            # cpu + the official code's extras
    python -m rwkv_ref.train --n_layer=2 --lr=1e-3        # any TrainConfig field, type-checked
    python -m rwkv_ref.train --model=gpt                  # the transformer baseline, same loop
    python -m rwkv_ref.train --resume --out_dir=out/cpu   # continue from out/cpu/ckpt.pt
    torchrun --nproc_per_node=2 -m rwkv_ref.train         # DistributedDataParallel

Every size and knob is a field of ``TrainConfig``; a preset is a named set of overrides.
Writes to ``out_dir``: ``ckpt.pt`` (at every evaluation, at the end and on Ctrl-C),
``metrics.jsonl``, ``loss.png`` and ``sample.txt``. Bad input (options, data, checkpoint,
device) ends in one line on stderr and exit status 2; ``--debug`` shows the traceback.

Under torchrun every process (rank) draws its own batches, ``batch_size / world_size`` windows
from a generator seeded with ``seed + rank``; DDP averages the gradients, so a step sees
``batch_size`` windows in all. Only rank 0 prints, draws the progress bar and writes files.
"""


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
    # the official RWKV-4 recipe's extras (rwkv_ref.recipe; all on in the official preset)
    layerwise_lr: bool = False   # RWKV: time_decay at 2 x lr, time_first at 3 x lr
    l2wrap: bool = False         # add L2Wrap's gradient, pulling the largest logit toward 0
    emb_init: str = "paper"      # RWKV's embedding: "paper" U(+-1e-4), "lr" U(+-lr) as v4neo
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
    compile: bool = False        # torch.compile the model for training (evaluation runs eager)
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
                eval_iters=100, device="cuda", dtype="bfloat16", compile=True, out_dir="out/gpu"),
    # the cpu preset with the official training code's extras (see rwkv_ref.recipe)
    "official": dict(layerwise_lr=True, l2wrap=True, emb_init="lr", out_dir="out/official"),
    # make compare: the cpu preset's RWKV, then a GPT of as many parameters, on as many tokens
    "compare": dict(out_dir="out/compare"),
}

CHOICES = {"model": ("rwkv", "gpt"), "dtype": ("auto", "float32", "bfloat16"),
           "emb_init": ("paper", "lr"),
           "wkv_impl": ("auto", *WKV_IMPLS)}


class ConfigError(ValueError):
    """A bad command line or config value; the message says which and what is allowed."""


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
    ckpt_path = Path(cfg.out_dir) / CHECKPOINT_NAME
    if cfg.resume and ckpt_path.is_file():
        saved = load_torch(ckpt_path).get("train_config")
        if not isinstance(saved, dict):
            raise ConfigError(f"--resume: {ckpt_path} is not a training checkpoint (it has no "
                              f"train_config); pass another --out_dir")
        cfg = TrainConfig(**saved)
        cfg = apply_overrides(apply_preset(cfg, preset) if preset else cfg, overrides)
    return cfg


def check_device(device: str) -> None:
    """``ConfigError`` for a device this machine does not have (before anything touches it)."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device={device}: CUDA is not available on this machine "
                              f"(torch {torch.__version__}); use --device=cpu or --preset=cpu")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"--device={device}: this machine has "
                              f"{torch.cuda.device_count()} GPU(s); use cuda:0 ...")
    elif device not in ("auto", "cpu"):
        try:
            torch.device(device)
        except RuntimeError:
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") \
                from None


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
    lines = [USAGE.strip(), "", "Options (TrainConfig; the defaults are the cpu preset):"]
    for f in dataclasses.fields(TrainConfig):
        lines.append(f"  --{f.name}={f.default}")
    lines.append("Presets: " + "; ".join(f"--preset={name} {values or '(the defaults)'}"
                                         for name, values in PRESETS.items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command lines

EXPECTED_ERRORS = (ConfigError, FileProblem, DataError)   # bad input, not bugs: one line each


def run_command(prog: str, body, argv: list[str], status: dict | None = None) -> int:
    """Run a command line's ``body(argv)`` so that bad input ends in ONE line on stderr.

    ``--debug`` (anywhere in ``argv``) is taken out and lets the traceback through instead.

    Args:
        prog: the name the line starts with.  body: returns the exit status.
        argv: the arguments.  status: {exception class: exit status} handled like the
            ``EXPECTED_ERRORS`` (those exit with 2); Ctrl-C exits with 130.
    Returns:
        The exit status.
    """
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    handled = {**{e: 2 for e in EXPECTED_ERRORS}, **(status or {})}
    try:
        return body(argv)
    except tuple(handled) as e:
        if debug:
            raise
        code = next(c for kind, c in handled.items() if isinstance(e, kind))
        print(f"{prog}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
              f" (--debug shows the traceback)", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing saved since the last checkpoint", file=sys.stderr)
        return 130
