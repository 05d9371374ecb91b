"""A wheel built from the repository carries the kernel sources, and both compiled kernels run
from an install outside the checkout (as after ``pip install rwkv_ref`` or ``pip install
git+...``)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from rwkv_ref import kernel

REPO = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F
    import rwkv_ref
    from rwkv_ref import kernel
    target = sys.argv[1]
    assert rwkv_ref.__file__.startswith(target), rwkv_ref.__file__
    assert str(kernel.KERNELS_DIR).startswith(target), kernel.KERNELS_DIR
    for name in ("cpp", "rnn"):
        assert kernel.unavailable_reason(name) is None, kernel.unavailable_reason(name)
    g = torch.Generator().manual_seed(0)
    w, u = torch.rand(40, generator=g) + 0.1, torch.randn(40, generator=g)
    k, v = torch.randn(2, 9, 40, generator=g), torch.randn(2, 9, 40, generator=g)
    y, _ = rwkv_ref.wkv(w, u, k, v, impl="cpp")
    torch.testing.assert_close(y, rwkv_ref.wkv(w, u, k, v, impl="logspace")[0])
    x, W = torch.randn(3, 40, generator=g), torch.randn(24, 40, generator=g)
    torch.testing.assert_close(kernel.matvec(x, W), F.linear(x, W), rtol=1e-5, atol=1e-5)
    print("kernels ran from", kernel.KERNELS_DIR)
""")


def run(*args, **kwargs):
    done = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{args[:4]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_a_wheel_install_runs_both_kernels(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--wheel-dir", str(wheels), str(REPO))
    (wheel,) = wheels.glob("rwkv_ref-*.whl")
    run(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
        str(wheel))
    shipped = {p.name for p in (target / "rwkv_ref" / "kernels").iterdir()}
    sources = {f for files in kernel._SOURCES.values() for f in files}   # every kernel's
    assert sources <= shipped, sources - shipped
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1"}
    done = run(sys.executable, "-c", CHECK, str(target), cwd=tmp_path, env=env)
    assert "kernels ran from" in done.stdout
