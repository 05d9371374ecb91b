"""``make bench``: every benchmark in one run, each printing its figures beside its reference.

Usage: ``python -m benchmarks.run [wkv] [scan] [decode] [train]`` (default: all). Figures and plots
also go to ``out/bench/``. Nothing here asserts anything about time.
"""
import importlib
import sys
import time

import torch

BENCHMARKS = {
    "wkv": "benchmarks.bench_wkv",        # WKV variants vs transformers' CPU path; time vs T
    "scan": "benchmarks.bench_scan",      # the parallel-scan WKV: work, depth, time vs T
    "decode": "benchmarks.bench_decode",  # RNN-mode decoding vs the official rwkv package
    "train": "benchmarks.bench_train",    # training throughput vs the GPT baseline
}


def main(names: list[str]) -> None:
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in names or list(BENCHMARKS):
        print(f"\n=== {name} " + "=" * (70 - len(name)))
        start = time.perf_counter()
        importlib.import_module(BENCHMARKS[name]).main()
        print(f"({name}: {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
