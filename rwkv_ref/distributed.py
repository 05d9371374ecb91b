"""Processes and signals: one process or a torchrun job, its memory allocator, and Ctrl-C that
saves before stopping.

torchrun's launch protocol sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; they are
read here and nowhere else. gloo on the CPU, NCCL on GPUs.
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor


# How long a collective waits for a rank that stopped answering (torch's default: 30 min).
# gloo notices a crashed peer at once (its socket closes); this bounds the other cases, and
# must exceed the longest stretch one rank works alone (rank 0's sample at the end).
TIMEOUT_S = 300


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
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    return Dist(rank, world, local_world, dev)


def cpu_count() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep the memory a training step frees, for the next step to reuse.

    By default glibc hands the top of its heap back to the kernel whenever more than its trim
    threshold lies free there, which is what happens at the end of every training step, when
    the step's activations are freed at once; the next step then takes every page back with a
    page fault. For RWKV at the ``cpu`` preset's size (4 x 128, 4,096 tokens a step) that is
    4,000 to 25,000 minor faults per step, about 28 ms of a 210 ms step at context 64 on 2
    cores (``benchmarks/bench_train.py`` prints them); the GPT baseline, by the luck of its
    allocation order, takes none. With a trim threshold of 1 GiB the heap stays at its peak
    and a step takes a few faults (book/design.md, "Memory between training steps"). Setting
    any threshold turns glibc's adaptive ones off, so the mmap threshold (below which a block
    comes from the heap) is set too, to glibc's largest, 32 MiB; left at its 128 KiB start,
    every block above it would get a mapping of its own and fault anew each time.

    It changes this process for good (glibc cannot go back to its adaptive thresholds) and
    nothing else: no result, only where freed memory waits. It does nothing off glibc, or when
    the environment already sets a ``MALLOC_*_`` threshold (those settings win).

    Returns:
        Whether the thresholds were set.
    """
    if not sys.platform.startswith("linux") or any(k in os.environ for k in _MALLOC_ENV):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
                and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))


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
