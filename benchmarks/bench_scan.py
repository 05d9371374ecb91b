"""The parallel-scan WKV against T: its work and depth, and its time beside the other variants.

    python -m benchmarks.bench_scan

The scan does about T log2 T merges in ceil(log2 T) + 2 rounds; the sequential scans
(``logspace``, ``recurrent``, the compiled ``cpp``) do 2 T merges in T rounds. On a CPU with
two cores depth buys little and work costs a lot, so this prints what the scan costs here and
what it would save on a machine with T-fold parallelism (a GPU). Times are the fastest of a
few runs of forward + backward, float32, B=1, C=64 (logspace and recurrent up to
T = 1024: a Python step per token). Plot: out/bench/scan_vs_T.png. Nothing is
asserted about time.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.bench_wkv import fastest, make_inputs
from rwkv_ref.scan import scan_cost, wkv_scan
from rwkv_ref.wkv import WKVState, wkv

OUT = Path(__file__).resolve().parent.parent / "out" / "bench"
B, C = 1, 64
T_SWEEP = (64, 128, 256, 512, 1024, 2048, 4096)
VARIANTS = ("scan", "logspace", "recurrent", "parallel", "cpp")
BUDGET_S = 1.0                     # per point and variant: one run if a run takes longer
# logspace and recurrent take a Python step per token (~2 ms forward + backward each here):
# beyond this T they only repeat the same straight line and would take most of the minute
PYTHON_LOOP_MAX_T = 1024


def fwd_bwd(impl: str, w, u, k, v, gy) -> None:
    """One forward + backward for the upstream gradient gy on y (float32 inputs)."""
    leaves = [x.detach().requires_grad_() for x in (w, u, k, v)]
    if impl == "scan":   # called directly: the inputs are already float32 and checked here
        y, _ = wkv_scan(*leaves, WKVState.empty(k.shape[0], k.shape[2]))
    else:
        y, _ = wkv(*leaves, impl=impl)
    torch.autograd.grad(y, leaves, gy)


def sweep(lengths=T_SWEEP, variants=VARIANTS) -> dict[str, dict[int, float]]:
    """Best forward + backward seconds for every variant and T; prints one row per T."""
    times: dict[str, dict[int, float]] = {name: {} for name in variants}
    print(f"forward + backward, B={B} C={C} float32, {torch.get_num_threads()} threads; "
          f"work = merges of (B, C) slices, depth = rounds of merges")
    print(f"{'T':>6}{'scan work':>11}{'depth':>7}{'seq. work':>11}{'depth':>7}"
          + "".join(f"{name + ' ms':>14}" for name in variants))
    for T in lengths:
        w, u, k, v, gy = make_inputs(B, T, C)
        for name in variants:
            if name in ("logspace", "recurrent") and T > PYTHON_LOOP_MAX_T:
                continue
            times[name][T] = fastest(lambda: fwd_bwd(name, w, u, k, v, gy), 3, BUDGET_S).best
        work, depth = scan_cost(T)
        cells = [f"{1e3 * times[name][T]:.2f}" if T in times[name] else "-" for name in variants]
        print(f"{T:>6}{work:>11,d}{depth:>7}{2 * T:>11,d}{T:>7}"
              + "".join(f"{cell:>14}" for cell in cells))
    return times


def plot(times: dict[str, dict[int, float]], path: Path) -> None:
    """Time against T (left) and the scan's work and depth beside the sequential scan's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, marker in zip(times, "osv^D"):
        ts = sorted(times[name])
        left.loglog(ts, [1e3 * times[name][T] for T in ts], marker=marker, label=name)
    left.set(xlabel="sequence length T", ylabel="forward + backward (ms)",
             title=f"WKV on the CPU, B={B}, C={C}, float32")
    left.legend()
    ts = sorted(next(iter(times.values())))
    right.loglog(ts, [scan_cost(T)[0] for T in ts], "o-", label="scan work (~T log2 T)")
    right.loglog(ts, [scan_cost(T)[1] for T in ts], "o--", label="scan depth (log2 T + 2)")
    right.loglog(ts, [2 * T for T in ts], "s-", label="sequential work (2T)")
    right.loglog(ts, ts, "s--", label="sequential depth (T)")
    right.set(xlabel="sequence length T", ylabel="merges / rounds", title="work and depth")
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def main() -> None:
    start = time.perf_counter()
    w, u, k, v, gy = make_inputs(B, 8, C)
    for name in VARIANTS:            # first calls: the compiled kernel loads, caches warm up
        fwd_bwd(name, w, u, k, v, gy)
    print(f"warm-up (loads the cpp kernel): {time.perf_counter() - start:.1f} s")
    times = sweep()
    plot(times, OUT / "scan_vs_T.png")
    T = PYTHON_LOOP_MAX_T
    print(f"at T={T}: scan {times['scan'][T] / times['logspace'][T]:.2f}x the time of logspace "
          f"with {scan_cost(T)[0] / (2 * T):.1f}x its work and 1/{T // scan_cost(T)[1]} of its "
          f"depth; {times['scan'][T] / times['cpp'][T]:.0f}x the time of the compiled kernel "
          f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
