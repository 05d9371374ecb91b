"""``make gpu-check``: everything a GPU can tell us that this project's CPU machines cannot.

    python -m benchmarks.gpu_check              # on a machine with a CUDA GPU (~5-10 min)
    python -m benchmarks.gpu_check --dry-run    # every piece on the CPU at tiny sizes
    python -m benchmarks.gpu_check --out=DIR    # the report elsewhere than out/gpu-check/

With the torch already installed (nothing is downloaded; no network is needed):

1. builds the CUDA WKV kernel (its self-check against ``wkv_logspace`` included);
2. runs the CUDA tests of tests/test_kernel.py (outputs, states and every gradient against
   ``wkv_logspace``, float32 and float64);
3. times WKV forward + backward at B=8, T=1024, C=768 in float32 and bf16, beside a peer's
   CUDA kernel when one is importable (transformers' RWKV kernel, flash-linear-attention's
   rwkv4), and states the GB/s achieved against a device-to-device copy measured alike;
4. decodes the 169M shape (random weights, ``rwkv_ref.testing``) in RNN mode: tokens/s;
5. trains 300 iterations of the ``gpu`` preset through ``rwkv_ref.train.train``;

and writes one report, ``out/gpu-check/report.md`` and ``report.json``. Without a GPU (and
without ``--dry-run``) it prints one line saying so and exits 0.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import rwkv_ref
from rwkv_ref import kernel

ROOT = Path(__file__).resolve().parent.parent
FULL = dict(wkv_shape=(8, 1024, 768), decode_layers=12, decode_embd=768, vocab=50277,
            decode_tokens=64, train_iters=300)
DRY = dict(wkv_shape=(2, 64, 64), decode_layers=2, decode_embd=32, vocab=97,
           decode_tokens=4, train_iters=3)


def seconds(fn, device: torch.device, repeats: int = 5) -> float:
    """The fastest of ``repeats`` runs of fn() (after one warm-up), synchronising the GPU."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / seconds(lambda: dst.copy_(src), device) / 1e9


def build_kernel(impl: str) -> dict:
    """Build (or load) kernel ``impl`` and run its self-check: seconds and the verdict."""
    start = time.perf_counter()
    reason = kernel.unavailable_reason(impl)
    return {"kernel": impl, "ok": reason is None, "reason": reason,
            "seconds": round(time.perf_counter() - start, 1)}


def run_cuda_tests(dry_run: bool) -> dict:
    """tests/test_kernel.py's CUDA tests in a subprocess: passed or not, and the output tail."""
    select = "channels_are_independent" if dry_run else "cuda"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_kernel.py"), "-k", select]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return {"command": " ".join(cmd[2:]), "ok": out.returncode == 0,
            "tail": (out.stdout + out.stderr).strip()[-1500:]}


def wkv_inputs(shape, device, dtype):
    """w, u, k, v for the timing (B, T, C) = shape, requiring gradients, and y's gradient."""
    B, T, C = shape
    g = torch.Generator().manual_seed(0)
    w = torch.rand(C, generator=g).mul(4).sub(3).exp()
    u, k, v, gy = (torch.randn(*s, generator=g) for s in ((C,), shape, shape, shape))
    leaves = [x.to(device, dtype).requires_grad_() for x in (w, u, k, v)]
    return leaves, gy.to(device, dtype)


def time_wkv(shape, device: torch.device, bandwidth: float) -> list[dict]:
    """Forward + backward ms of ours and each importable peer, float32 and bf16, with GB/s."""
    impl = "cuda" if device.type == "cuda" else "cpp"
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        leaves, gy = wkv_inputs(shape, device, dtype)
        runners = {f"rwkv_ref {impl}": lambda: rwkv_ref.wkv(*leaves, impl=impl)[0]}
        runners.update(peers(leaves, device))
        for name, forward in runners.items():
            if isinstance(forward, str):               # a peer that is not available
                rows.append({"variant": name, "dtype": str(dtype), "note": forward})
                continue
            ms = 1e3 * seconds(lambda: torch.autograd.backward(forward(), gy), device)
            moved = 7 * gy.numel() * gy.element_size()   # k, v, y, gy, gk, gv + y again
            rows.append({"variant": name, "dtype": str(dtype), "ms": round(ms, 3),
                         "GB/s": round(moved / ms / 1e6, 1),
                         "of copy bandwidth": round(moved / ms / 1e6 / bandwidth, 3)})
    return rows


def peers(leaves, device: torch.device) -> dict:
    """{name: forward() -> y} for the peers' CUDA kernels that import, else {name: why not}."""
    if device.type != "cuda":
        return {"peers": "no GPU: peers' CUDA kernels not run"}
    w, u, k, v = leaves
    found = {}
    try:
        from transformers.models.rwkv import modeling_rwkv as hf

        hf.load_wkv_cuda_kernel(k.shape[1])
        # transformers takes time_decay and applies -exp itself: hand it log(w)
        found["transformers RWKV CUDA"] = lambda: hf.RwkvLinearAttention.apply(
            w.log(), u, k, v, None, False)[0]
    except Exception as error:  # noqa: BLE001 - a peer that does not load is reported
        found["transformers RWKV CUDA"] = f"not available: {type(error).__name__}: {error}"[:200]
    try:
        from fla.ops.rwkv4 import fused_recurrent_rwkv4

        found["fla rwkv4"] = lambda: fused_recurrent_rwkv4(w.log(), u, k, v)[0]
    except Exception as error:  # noqa: BLE001
        found["fla rwkv4"] = f"not available: {type(error).__name__}: {error}"[:200]
    return found


def decode(cfg: dict, device: torch.device) -> dict:
    """RNN-mode tokens/s of the 169M shape (random weights), batch 1, after one warm-up."""
    from rwkv_ref.model import RWKVConfig
    from rwkv_ref.testing import random_model

    config = RWKVConfig(vocab_size=cfg["vocab"], n_layer=cfg["decode_layers"],
                        n_embd=cfg["decode_embd"])
    model = random_model(config).to(device).eval()
    token, state = torch.zeros(1, dtype=torch.long, device=device), None
    with torch.no_grad():
        model.step(token)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(cfg["decode_tokens"]):
            logits, state = model.step(token, state)
            token = logits.argmax(-1)
        sync()
    rate = cfg["decode_tokens"] / (time.perf_counter() - start)
    return {"shape": f"{config.n_layer} x {config.n_embd}, vocab {config.vocab_size}",
            "tokens_per_s": round(rate, 1)}


def local_text(out_dir: Path) -> str:
    """A text to train on without network: tiny-shakespeare if a copy is here, else the
    repository's own sources (said so in the report)."""
    from rwkv_ref import data

    for path in (data.CACHE_PATH, data.SHARED_COPY):
        if path.is_file():
            return str(path)
    text = "\n".join(p.read_text() for p in sorted(ROOT.glob("rwkv_ref/*.py")))
    path = out_dir / "local_text.txt"
    path.write_text(text)
    return str(path)


def train_preset(cfg: dict, device: torch.device, out_dir: Path) -> dict:
    """``cfg["train_iters"]`` iterations of the gpu preset (dry run: a tiny model on the
    CPU) through rwkv_ref.train.train: tokens/s and the last losses."""
    from rwkv_ref.config import TrainConfig, apply_preset
    from rwkv_ref.train import train

    tc = apply_preset(TrainConfig(), "gpu")
    tc = dataclasses.replace(tc, max_iters=cfg["train_iters"], eval_interval=cfg["train_iters"],
                             eval_iters=10, out_dir=str(out_dir / "train"), sample_tokens=0,
                             data=local_text(out_dir), warmup_iters=min(200, cfg["train_iters"]))
    if device.type != "cuda":
        tc = dataclasses.replace(tc, n_layer=2, n_embd=32, ctx_len=32, batch_size=4,
                                 device="cpu", dtype="float32", eval_iters=2)
    start = time.perf_counter()
    result = train(tc)
    last = result.history[-1]
    return {"iterations": tc.max_iters, "data": tc.data, "seconds": round(
        time.perf_counter() - start, 1), **{k: last[k] for k in last if k != "step"}}


def write_report(report: dict, out_dir: Path) -> None:
    """report.json and a markdown rendering of it, side by side."""
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    lines = [f"# gpu-check ({report['device']})", ""]
    for section, value in report.items():
        lines.append(f"## {section}")
        rows = value if isinstance(value, list) else [value]
        for row in rows:
            lines.append("- " + (", ".join(f"{k}: {v}" for k, v in row.items())
                                 if isinstance(row, dict) else str(row)))
        lines.append("")
    (out_dir / "report.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Run every check (``--dry-run``: on the CPU at tiny sizes); 0 unless a check failed."""
    argv = sys.argv[1:] if argv is None else argv
    dry_run = "--dry-run" in argv
    if not dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); "
              "nothing to check here.")
        return 0
    device = torch.device("cpu" if dry_run else "cuda")
    cfg = DRY if dry_run else FULL
    outs = [a.removeprefix("--out=") for a in argv if a.startswith("--out=")]
    out_dir = Path(outs[-1]) if outs else ROOT / "out" / (
        "gpu-check-dry-run" if dry_run else "gpu-check")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "CPU (dry run)" if dry_run else torch.cuda.get_device_name(device)
    report: dict = {"device": name, "torch": torch.__version__}
    report["build"] = build_kernel("cpp" if dry_run else "cuda")
    report["tests"] = run_cuda_tests(dry_run)
    bandwidth = copy_bandwidth(device, 1 << (22 if dry_run else 28))
    report["copy bandwidth GB/s"] = round(bandwidth, 1)
    report["wkv forward+backward"] = time_wkv(cfg["wkv_shape"], device, bandwidth)
    report["rnn decode"] = decode(cfg, device)
    report["gpu preset training"] = train_preset(cfg, device, out_dir)
    write_report(report, out_dir)
    print(f"gpu-check: report in {out_dir / 'report.md'}")
    return 0 if report["build"]["ok"] and report["tests"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
