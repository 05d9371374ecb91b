"""Two processes under torchrun (gloo, 127.0.0.1) take the same steps as one process that is
fed the union of their batches: DDP averages the gradients of equal halves of a batch."""
import dataclasses
import os
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from rwkv_ref.data import get_batch, load_data
from rwkv_ref.config import TrainConfig
from rwkv_ref.recipe import build_model, build_optimizer, forward_backward
from rwkv_ref.run import batch_generator

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_reference(cfg: TrainConfig, world_size: int):
    """One process, each step fed the concatenation of every rank's batch.

    Returns:
        (initial state dict, final state dict, the loss of every step).
    """
    data = load_data(cfg.data)
    torch.manual_seed(cfg.seed)
    model, _ = build_model(cfg, data.tokenizer.vocab_size)
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    optimizer, scheduler = build_optimizer(model, cfg)
    generators = [batch_generator(cfg.seed, rank) for rank in range(world_size)]
    losses = []
    for _ in range(cfg.max_iters):
        pairs = [get_batch(data.train, cfg.batch_size // world_size, cfg.ctx_len, g)
                 for g in generators]
        x, y = (torch.cat(part) for part in zip(*pairs))            # (B, T): all ranks
        loss, _ = forward_backward(model, x, y, cfg.grad_clip, nullcontext)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return initial, model.state_dict(), losses


def test_two_processes_equal_one_with_the_union_batch(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question:\n" * 40, encoding="utf-8")
    cfg = dataclasses.replace(
        TrainConfig(), n_layer=2, n_embd=32, ctx_len=16, batch_size=8, max_iters=4, lr=5e-3,
        warmup_iters=2, eval_interval=1, eval_iters=1, data=str(text), wkv_impl="parallel",
        out_dir=str(tmp_path / "ddp"), sample_tokens=0, weight_decay=0.1)
    args = [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items()]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    done = subprocess.run([*launcher, "-m", "rwkv_ref.train", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 process(es)" in done.stdout
    assert done.stdout.count("training rwkv") == 1                 # only rank 0 prints

    ckpt = torch.load(tmp_path / "ddp" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert len(ckpt["rng"]["batch"]) == 2                          # both ranks' generators
    assert not torch.equal(*ckpt["rng"]["batch"])                  # each its own stream
    assert not torch.equal(*ckpt["rng"]["torch"])                  # dropout: each its own
    initial, expected, losses = single_process_reference(cfg, world_size=2)
    assert ckpt["step"] == cfg.max_iters
    for name, value in expected.items():
        torch.testing.assert_close(ckpt["model"][name], value, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    moved = [name for name, value in expected.items()
             if (value - initial[name]).abs().max() > 1e-3]
    assert len(moved) == len(expected)                             # every weight was trained
    ddp_losses = [row["loss"] for row in ckpt["history"][1:]]     # the mean over the ranks
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(losses), rtol=1e-5,
                               atol=1e-6)


FAILING_RANK = """
import sys
import time
from rwkv_ref import train

original = train.take_step


def take_step(run, stop):
    if run.dist.rank == 1 and run.step == 2:
        raise RuntimeError("planted failure on rank 1 at step 2")
    return original(run, stop)


train.take_step = take_step
sys.exit(train.main(sys.argv[1:]))
"""


def failing_job(tmp_path) -> list[str]:
    """The command line of a 2-rank job whose rank 1 raises at step 2 (of 1000)."""
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question:\n" * 40, encoding="utf-8")
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK)
    return [str(script), f"--data={text}", "--n_layer=1", "--n_embd=16", "--ctx_len=8",
            "--batch_size=4", "--max_iters=1000", "--eval_interval=1000", "--eval_iters=1",
            "--sample_tokens=0", "--wkv_impl=parallel", f"--out_dir={tmp_path / 'out'}",
            "--num_threads=1"]


def test_a_failing_rank_ends_a_torchrun_job_promptly_with_its_message(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    start = time.monotonic()
    done = subprocess.run([*launcher, *failing_job(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=180)
    took = time.monotonic() - start
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "rank 1 of 2 failed: RuntimeError: planted failure on rank 1 at step 2" in output
    assert took < 60, f"the job took {took:.0f} s to end:\n{output}"


def test_a_failing_rank_brings_its_peer_down_without_a_launcher(tmp_path):
    """No torchrun agent to kill the survivors: rank 0, waiting in an all-reduce, must end on
    its own, with an error, soon after rank 1 dies."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    args = [sys.executable, *failing_job(tmp_path)]
    procs = [subprocess.Popen(args, cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        err1 = procs[1].communicate(timeout=150)[1]
        died = time.monotonic()
        err0 = procs[0].communicate(timeout=150)[1]
        lag = time.monotonic() - died
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode != 0 and "rank 1 of 2 failed" in err1 and "planted" in err1
    assert procs[0].returncode != 0 and "rank 0 of 2 failed" in err0, err0
    assert lag < 30, f"rank 0 took {lag:.0f} s more to end"
