"""A wheel built from the repository carries the kernel sources, and every CPU kernel runs from
an install outside the checkout (as after ``pip install rwkv_ref`` or ``pip install git+...``).

Two ways: sharing the checkout's extension cache, where the install must reuse the checkout's
builds (a build compiles copies of the sources kept in its cache folder, so it does not depend
on where rwkv_ref is installed); and, with ``--run-slow``, from an empty cache, where the
install compiles every kernel from its own files.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rwkv_ref import kernel

REPO = Path(__file__).resolve().parents[1]
CPU_KERNELS = ("cpp", "rnn", "ops")

CHECK = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F
    import rwkv_ref
    from rwkv_ref import kernel, ops
    target = sys.argv[1]
    assert rwkv_ref.__file__.startswith(target), rwkv_ref.__file__
    assert str(kernel.KERNELS_DIR).startswith(target), kernel.KERNELS_DIR
    for name in ("cpp", "rnn", "ops"):    # each built (or loaded) and its self-check passed
        assert kernel.unavailable_reason(name) is None, kernel.unavailable_reason(name)
    g = torch.Generator().manual_seed(0)
    w, u = torch.rand(40, generator=g) + 0.1, torch.randn(40, generator=g)
    k, v = torch.randn(2, 9, 40, generator=g), torch.randn(2, 9, 40, generator=g)
    y, _ = rwkv_ref.wkv(w, u, k, v, impl="cpp")
    torch.testing.assert_close(y, rwkv_ref.wkv(w, u, k, v, impl="logspace")[0])
    x, W = torch.randn(3, 40, generator=g), torch.randn(24, 40, generator=g)
    torch.testing.assert_close(kernel.matvec(x, W), F.linear(x, W), rtol=1e-5, atol=1e-5)
    h = torch.randn(2, 9, 40, generator=g, requires_grad=True)
    torch.testing.assert_close(ops.relu_square(h), torch.relu(h).square())
    print("kernels ran from", kernel.KERNELS_DIR)
""")


def run(*args, **kwargs):
    done = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{args[:4]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def install_wheel(tmp_path: Path) -> Path:
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--wheel-dir", str(wheels), str(REPO))
    (wheel,) = wheels.glob("rwkv_ref-*.whl")
    run(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
        str(wheel))
    shipped = {p.name for p in (target / "rwkv_ref" / "kernels").iterdir()}
    sources = {f for files in kernel._SOURCES.values() for f in files}   # every kernel's
    assert sources <= shipped, sources - shipped
    return target


def run_check(target: Path, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1", **env}
    done = run(sys.executable, "-c", CHECK, str(target), cwd=tmp_path, env=env)
    assert "kernels ran from" in done.stdout
    return done


def build_files(name: str) -> dict[str, int]:
    """The build folder's compiled files (objects and the library), with their mtimes."""
    folder = kernel.build_directory(kernel._build_name(name))
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()
            if p.suffix in (".o", ".so")}


def test_a_wheel_install_shares_the_checkouts_kernel_builds(tmp_path):
    for name in CPU_KERNELS:           # built (or loaded) from the checkout, in this process
        assert kernel.unavailable_reason(name) is None, kernel.unavailable_reason(name)
    before = {name: build_files(name) for name in CPU_KERNELS}
    assert all(any(f.endswith(".so") for f in files) for files in before.values()), before
    done = run_check(install_wheel(tmp_path), tmp_path)
    assert "compiling" not in done.stderr, done.stderr
    assert {name: build_files(name) for name in CPU_KERNELS} == before   # nothing recompiled


@pytest.mark.slow
def test_a_wheel_install_builds_every_kernel_from_its_own_files(tmp_path):
    done = run_check(install_wheel(tmp_path), tmp_path,
                     TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))
    for name in CPU_KERNELS:
        assert f"compiling the {name} kernel" in done.stderr, done.stderr
