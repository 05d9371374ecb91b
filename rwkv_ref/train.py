"""The training loop: RWKV (or the GPT baseline) on tiny-shakespeare, one process or many.

The commands, options, outputs and the torchrun behaviour are described once, in
``rwkv_ref.config.USAGE`` (``python -m rwkv_ref.train --help``).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from rwkv_ref.checkpoint import save_checkpoint
from rwkv_ref.config import (CHECKPOINT_NAME, TrainConfig, check_config, check_device,
                             config_from_args, run_command, usage)
from rwkv_ref.distributed import (Dist, StopRequest, all_mean, close_distributed, cpu_count,
                                  keep_freed_memory, setup_distributed)
from rwkv_ref.files import remove_stale_temporaries
from rwkv_ref.recipe import forward_backward, num_params
from rwkv_ref.report import METRICS_NAME, evaluate, plot_losses, write_sample
from rwkv_ref.run import Run, make_run, next_batch


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite; nothing was saved at that step."""


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
    loss, norm = forward_backward(run.net, x, y, run.cfg.grad_clip, run.autocast, run.cfg.l2wrap)
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


def train_loop(run: Run, stop: StopRequest, losses: list[float]) -> bool:
    """Steps until ``max_iters``, evaluating and checkpointing every ``eval_interval`` steps.

    Args:
        losses: each step's training loss is appended here.
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
            losses.append(run.last_loss)
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


@dataclass
class TrainResult:
    """What ``train`` returns; the trained weights are in ``out_dir / "ckpt.pt"``."""

    history: list[dict]          # the metrics rows
    interrupted: bool            # stopped by Ctrl-C
    num_params: int
    out_dir: Path
    losses: list[float]          # the minibatch loss of every step this call took, in order


def train(cfg: TrainConfig) -> TrainResult:
    """Train as ``cfg`` says, alone or as one process of a torchrun job.

    Returns:
        A ``TrainResult``. Its ``losses`` are the training loss of each step, before that
        step's update (averaged over processes), from the checkpoint's step on after --resume.
    Raises:
        ConfigError for unusable settings; TrainingDiverged on a non-finite loss or gradient.
    """
    check_device(cfg.device)
    d = setup_distributed(cfg.device)
    threads = torch.get_num_threads()
    finished = False
    try:
        result = _train(cfg, d)
        finished = True
        return result
    except Exception as e:
        if d.world_size > 1:       # name the rank that failed, amid the others' errors
            print(f"rwkv_ref.train: rank {d.rank} of {d.world_size} failed: "
                  f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    finally:
        torch.set_num_threads(threads)          # as it was: train() may be one call of many
        if dist.is_initialized():
            close_distributed(finished)


def _train(cfg: TrainConfig, d: Dist) -> TrainResult:
    """``train`` once the processes are set up; the model dies with this frame."""
    check_config(cfg, d.world_size)
    torch.set_num_threads(cfg.num_threads or max(1, cpu_count() // d.local_world_size))
    keep_freed_memory()        # a step's freed activations wait for the next step
    if d.is_main:             # what a process killed mid-save left; no writer runs yet
        for name in (CHECKPOINT_NAME, METRICS_NAME):
            for stale in remove_stale_temporaries(Path(cfg.out_dir) / name):
                print(f"removed {stale}, a temporary file left by a run that was killed")
    run = make_run(cfg, d)
    if d.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        print(f"training {cfg.model}: {num_params(run.model):,} parameters, "
              f"{d.world_size} process(es) on {d.device}, {torch.get_num_threads()} "
              f"thread(s) each, {run.tokens_per_step:,} tokens per step", flush=True)
    losses: list[float] = []
    with StopRequest(announce=d.is_main) as stop:
        interrupted = train_loop(run, stop, losses)
    finish(run, interrupted)
    return TrainResult(run.history, interrupted, num_params(run.model), run.out_dir, losses)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status: 2 for bad input (one line on stderr;
    ``--debug`` shows the traceback), 1 when training diverged, 130 after Ctrl-C."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(usage())
        return 0

    def body(args: list[str]) -> int:
        return 130 if train(config_from_args(args)).interrupted else 0

    return run_command("rwkv_ref.train", body, argv, status={TrainingDiverged: 1})


if __name__ == "__main__":
    sys.exit(main())
