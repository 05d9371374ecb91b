"""benchmarks/gpu_check.py (``make gpu-check``) where there is no GPU: one line and exit 0,
and every piece run on the CPU at tiny sizes (``--dry-run``) into a complete report."""
import json
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines() == [out.stdout.strip()]
    assert "no CUDA GPU" in out.stdout


def test_dry_run_runs_every_piece_on_the_cpu(tmp_path):
    assert gpu_check.main(["--dry-run", f"--out={tmp_path}"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["build"]["ok"] and report["tests"]["ok"]
    timed = [r for r in report["wkv forward+backward"] if "ms" in r]
    assert {r["dtype"] for r in timed} == {"torch.float32", "torch.bfloat16"}
    assert all(r["ms"] > 0 and r["GB/s"] > 0 for r in timed)
    assert report["rnn decode"]["tokens_per_s"] > 0
    assert report["gpu preset training"]["iterations"] == 3
    assert "## gpu preset training" in (tmp_path / "report.md").read_text()
