"""``make bench``: every benchmark in one run, each printing its figures beside its reference.

Usage: ``python -m benchmarks.run [wkv] [scan] [decode] [train] [selfcheck]`` (default: all). Figures and plots
also go to ``out/bench/``. Nothing here asserts anything about time.
"""
import importlib
import sys
import time

import torch

from rwkv_ref.config import ConfigError, run_command

BENCHMARKS = {
    "wkv": "benchmarks.bench_wkv",        # WKV variants vs transformers' CPU path; time vs T
    "scan": "benchmarks.bench_scan",      # the parallel-scan WKV: work, depth, time vs T
    "decode": "benchmarks.bench_decode",  # RNN-mode decoding vs the official rwkv package
    "train": "benchmarks.bench_train",    # training throughput vs the GPT baseline
    "selfcheck": "benchmarks.bench_selfcheck",  # what the kernels' first-use checks cost
}


def main(names: list[str]) -> int:
    """Run the named benchmarks (all if none); ``ConfigError`` for an unknown name."""
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)} "
                          f"(python -m benchmarks.run [NAME ...] [--debug])")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in names or list(BENCHMARKS):
        print(f"\n=== {name} " + "=" * (70 - len(name)))
        start = time.perf_counter()
        importlib.import_module(BENCHMARKS[name]).main()
        print(f"({name}: {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_command("benchmarks.run", main, sys.argv[1:]))
