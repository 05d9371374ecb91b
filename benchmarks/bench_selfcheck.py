"""What the kernels' self-checks cost: the first use of a compiled kernel in a process runs it
on a small random input against its reference (rwkv_ref.kernel). Goal: well under a second.

The build (or the load of a cached build) is timed apart from the check itself, so the figure
is the check's own cost: each check is run ``REPEATS`` times with the verdict forgotten in
between, and the fastest and slowest runs are printed beside the goal.
"""
import time

from rwkv_ref import kernel

GOAL_S = 1.0
REPEATS = 5


def time_check(name: str) -> list[float] | None:
    """Seconds of ``REPEATS`` fresh self-checks of kernel ``name`` on the CPU, or None when
    the kernel cannot be built here."""
    if kernel.unavailable_reason(name) is not None:          # builds (or loads) it once
        return None
    seconds = []
    for _ in range(REPEATS):
        kernel._verdicts.pop((name, "cpu"), None)             # forget: the next call re-checks
        start = time.perf_counter()
        assert kernel.unavailable_reason(name) is None, f"the {name} kernel failed its check"
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    print(f"{'kernel':8s} {'fastest':>9s} {'slowest':>9s}   goal")
    for name in ("cpp", "rnn"):
        seconds = time_check(name)
        if seconds is None:
            print(f"{name:8s} not available here: {kernel.unavailable_reason(name)}")
            continue
        print(f"{name:8s} {min(seconds) * 1e3:7.1f} ms {max(seconds) * 1e3:7.1f} ms   "
              f"< {GOAL_S * 1e3:.0f} ms ({GOAL_S / max(seconds):.0f}x under it)")


if __name__ == "__main__":
    main()
