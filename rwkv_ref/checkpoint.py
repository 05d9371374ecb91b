"""The training checkpoint: its format, its atomic writer and its readers.

``out_dir/ckpt.pt`` is one ``torch.save``d dict. What a reader of the model needs:

=================  ==========================================================================
``model``          the state dict (official RWKV-4 names for RWKV)
``model_type``     "rwkv" or "gpt"
``model_config``   the fields of ``RWKVConfig`` or ``GPTConfig``
``tokenizer``      ``CharTokenizer.to_dict()``
=================  ==========================================================================

and what ``--resume`` needs to continue bit for bit: ``optimizer``, ``scheduler``, ``rng``
(torch, python, every rank's batch generator), ``step``, ``train_config``, ``history`` and
``elapsed_s``. Files are written through ``rwkv_ref.files.atomic_write``, so a crash never
leaves a half-written checkpoint, and read with one clear error for a missing, truncated or
foreign file.
"""
from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

import torch

from rwkv_ref.config import ConfigError
from rwkv_ref.convert import from_blinkdl, model_from_state_dict
from rwkv_ref.distributed import gather
from rwkv_ref.files import FileProblem, load_torch, save_torch
from rwkv_ref.gpt import GPT, GPTConfig
from rwkv_ref.model import RWKVConfig
from rwkv_ref.tokenizer import NeoXTokenizer, tokenizer_from_dict

CHECKPOINT_KEYS = ("model", "model_config", "tokenizer")
RESUME_KEYS = (*CHECKPOINT_KEYS, "optimizer", "scheduler", "rng", "step", "train_config",
               "history", "elapsed_s")


def read_checkpoint(path, keys=CHECKPOINT_KEYS) -> dict:
    """The checkpoint dict at ``path``; ``FileProblem`` (one line) if it is missing, truncated,
    not a torch file, or lacks one of ``keys``."""
    ckpt = load_torch(path, "checkpoint")
    if not isinstance(ckpt, dict):
        raise FileProblem(f"checkpoint {path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise FileProblem(f"checkpoint {path} lacks keys {missing} (it has "
                          f"{sorted(map(str, ckpt))[:10]}); is it a training checkpoint?")
    return ckpt


# ----------------------------------------------------------------------------- training


def checkpoint_dict(run) -> dict:
    """Everything ``--resume`` needs to continue bit for bit. Every rank must call it (the
    batch generators' states are gathered from all ranks)."""
    rng = {"torch": gather(torch.get_rng_state(), run.dist), "python": random.getstate(),
           "batch": gather(run.batch_gen.get_state(), run.dist)}     # one state per rank
    if run.dist.device.type == "cuda":
        rng["cuda"] = gather(torch.cuda.get_rng_state(run.dist.device), run.dist)
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
        "elapsed_s": run.elapsed(),
    }


def save_checkpoint(run) -> None:
    """Write ``out_dir/ckpt.pt`` atomically (rank 0; every rank must call this)."""
    ckpt = checkpoint_dict(run)
    if run.dist.is_main:
        save_torch(ckpt, run.ckpt_path)
    run.saved_step = run.step


def restore(run, path: Path) -> None:
    """Load weights, optimizer, schedule, step, metrics and every RNG state from ``path``."""
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path}; train without --resume first, "
                          f"or pass the --out_dir of the run to continue")
    ckpt = read_checkpoint(path, RESUME_KEYS)
    if ckpt["tokenizer"] != run.data.tokenizer.to_dict():
        raise ConfigError(f"{path} was trained on a text with another alphabet than "
                          f"{run.data.path}; pass the same --data")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.step, run.saved_step, run.history = ckpt["step"], ckpt["step"], ckpt["history"]
    run.elapsed_before = ckpt["elapsed_s"]
    random.setstate(ckpt["rng"]["python"])
    rng, rank = ckpt["rng"], run.dist.rank
    if isinstance(rng["torch"], torch.Tensor):       # written before the states were per rank
        rng = {**rng, "torch": [rng["torch"]] * len(rng["batch"]), "cuda": []}
    if len(rng["batch"]) == run.dist.world_size:
        torch.set_rng_state(rng["torch"][rank])
        if rng.get("cuda") and run.dist.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"][rank], run.dist.device)
        run.batch_gen.set_state(rng["batch"][rank])
    else:  # new streams, not the old ones' start again
        torch.manual_seed(run.cfg.seed + 1000 * run.step + rank + 500)
        run.batch_gen.manual_seed(run.cfg.seed + 1000 * run.step + rank)
        if run.dist.is_main:
            print(f"--resume: the checkpoint was written by {len(rng['batch'])} processes, this "
                  f"run has {run.dist.world_size}: batches are reseeded (not bit for bit)")
    if run.dist.is_main:
        print(f"resumed from {path} at step {run.step}")


# ----------------------------------------------------------------------------- readers


def load_checkpoint(path, tokenizer_path=None, device="cpu", **config_overrides):
    """A model and its tokenizer from a training checkpoint (RWKV or GPT) or an official
    RWKV-4 .pth (which needs ``tokenizer_path``, GPT-NeoX's ``20B_tokenizer.json``).

    Args:
        path: the file.  tokenizer_path: a 20B_tokenizer.json (used instead of the stored one).
        device: where the model goes.  config_overrides: e.g. ``wkv_impl`` (RWKV only).
    Returns:
        (model in eval mode, tokenizer).
    Raises:
        FileProblem or ValueError: one line saying what is wrong with the file.
    """
    ckpt = load_torch(path, "checkpoint")
    if isinstance(ckpt, dict) and "emb.weight" in ckpt:          # official layout
        if tokenizer_path is None:
            raise ValueError(f"{path} is an official RWKV-4 checkpoint, which has no tokenizer "
                             "inside: pass --tokenizer path/to/20B_tokenizer.json")
        model = from_blinkdl(ckpt, **config_overrides)
    else:
        model = _model_from_checkpoint(read_checkpoint(path), path, config_overrides)
    tokenizer = (NeoXTokenizer(tokenizer_path) if tokenizer_path is not None
                 else tokenizer_from_dict(ckpt["tokenizer"]))
    vocab_size = model.config.vocab_size if hasattr(model, "config") else model.cfg.vocab_size
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{vocab_size}")
    return model.to(device).eval(), tokenizer


def _model_from_checkpoint(ckpt: dict, path, overrides: dict):
    """The RWKV or GPT a training checkpoint holds, with its weights."""
    kind = ckpt.get("model_type", "rwkv")
    config_class = {"rwkv": RWKVConfig, "gpt": GPTConfig}.get(kind)
    if config_class is None:
        raise ValueError(f"checkpoint {path} holds an unknown model type {kind!r}")
    unknown = sorted(set(ckpt["model_config"]) - set(config_class.__dataclass_fields__))
    if unknown:
        raise ValueError(f"checkpoint {path}: model_config has unknown fields {unknown}")
    config = config_class(**{**ckpt["model_config"], **overrides})
    # a model trained under torch.compile saves its parameters under "_orig_mod."
    sd = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    if kind == "gpt":
        model = GPT(config)
        model.load_state_dict(sd)
        return model
    return model_from_state_dict(sd, config, copy=False)
