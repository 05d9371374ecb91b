"""The compiled kernels of ``kernels/``, built on first use.

The WKV kernel: two builds of one scan body (``kernels/wkv_scan.h``), ``cpp`` for the CPU and
``cuda`` for the GPU, each with a hand-derived backward (the derivation is in the header),
called through autograd. Both take the POSITIVE decay rate ``w = exp(time_decay)``; the
official RWKV-4 kernel is handed ``-exp(time_decay)`` instead.

The ``rnn`` kernel (``kernels/rnn_cpu.cpp``), for RNN-mode inference on the CPU, where 80-90%
of a token's time is matrix-vector products (``benchmarks/bench_decode.py``): ``matvec``,
``x @ w.T`` for a few rows of x with float32 or bfloat16 weights, reading each weight once
(what ``rwkv_ref.model.Linear`` calls there), and ``block_step``, ``Block.step`` fused into
one call. No autograd.

The ``ops`` kernel (``kernels/ops_cpu.cpp``): the token-shift mixes and the squared ReLU of the
mixing blocks, each one pass forward and one backward, for eager training on the CPU; its torch
ops, autograd and self-check are in ``rwkv_ref/ops.py``.

Each is a PyTorch custom operator (``torch.library``: ``rwkv_ref::wkv_forward``,
``wkv_backward``, ``rnn_linear``, ``rnn_block_step``) with a fake implementation for
``torch.compile`` and, for WKV, autograd through the backward op: a compiled training step runs
through the kernel in one graph.

Nothing is compiled when ``rwkv_ref`` is imported: the first ``unavailable_reason(name)`` or
``wkv_kernel(name, ...)`` builds the extension with ``torch.utils.cpp_extension.load`` into
torch's extension cache (``TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``). The
extension's name carries a hash of the sources and flags, so an edited kernel is rebuilt and
never confused with an old build; it compiles copies of the sources kept in its build folder,
so every install of one version (a checkout, a wheel) shares one build. A failed build is
remembered and explained, not raised. The first use on a device then checks the kernel against
its reference (``register_check``); a kernel that fails is disabled for the process with one
warning.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

from rwkv_ref.state import WKVState, compute_dtype



def _kernels_dir() -> Path:
    """Where the kernel sources are: inside the installed package (a wheel ships kernels/ as
    rwkv_ref/kernels/), else kernels/ at the top of the source checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "kernels"
    return installed if (installed / "wkv_scan.h").is_file() else here.parent / "kernels"


KERNELS_DIR = _kernels_dir()
_SOURCES = {
    "cpp": ("torch_op.h", "wkv_scan.h", "wkv_bind.h", "wkv_cpu.cpp"),
    "cuda": ("torch_op.h", "wkv_scan.h", "wkv_bind.h", "wkv_cuda.cu", "wkv_cuda_bind.cpp"),
    "rnn": ("torch_op.h", "wkv_scan.h", "rnn_cpu.cpp"),
    "ops": ("torch_op.h", "ops_cpu.cpp"),
}
# No -march=native: the build cache may be shared by machines with different CPUs (a home
# directory on a cluster), and a binary for the newest CPU dies of SIGILL on an older one.
# wkv_cpu.cpp and rnn_cpu.cpp compile their hot loops for several instruction sets instead and
# the loader picks one. -fno-trapping-math lets GCC turn the scan's selects into vector blends
# (without it nothing vectorises); -fopenmp makes at::parallel_for use threads (without it,
# one thread).
# Tuples: torch's loader appends to the lists it is given, which would change the hash below.
_OPENMP = ("-fopenmp",) if sys.platform.startswith("linux") else ()
_CFLAGS = ("-O3", "-fno-trapping-math", *_OPENMP)
_LDFLAGS = _OPENMP
_CUDA_FLAGS = ("-O3",)

_modules: dict[str, object] = {}   # name -> its operators (torch.ops.<build name>)
_reasons: dict[str, str] = {}      # name -> why it cannot be used (remembered)


def _build_name(name: str) -> str:
    """``rwkv_ref_<name>_<hash>``: the hash covers the sources, the flags and torch."""
    digest = hashlib.sha256()
    for file in _SOURCES[name]:
        digest.update((KERNELS_DIR / file).read_bytes())
    digest.update(repr((_CFLAGS, _LDFLAGS, _CUDA_FLAGS, torch.__version__)).encode())
    return f"rwkv_ref_{name}_{digest.hexdigest()[:12]}"


def _missing_tool(name: str) -> str | None:
    """Why the toolchain for ``name`` is incomplete (what to install), or None."""
    from torch.utils import cpp_extension

    if name == "cuda":
        if torch.version.cuda is None:
            return ("CUDA is not available: this PyTorch build has no CUDA support "
                    "(torch.version.cuda is None); install a CUDA build of torch")
        if not torch.cuda.is_available():
            return ("CUDA is not available: torch.cuda.is_available() is False "
                    "(no GPU or no driver visible)")
        if cpp_extension.CUDA_HOME is None or not shutil.which(
                os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
            return (f"nvcc not found: install the CUDA toolkit matching torch.version.cuda "
                    f"({torch.version.cuda}) and set CUDA_HOME")
    missing = [f for f in _SOURCES[name] if not (KERNELS_DIR / f).is_file()]
    if missing:
        return (f"the kernel sources are missing ({', '.join(missing)} in {KERNELS_DIR}); "
                f"reinstall rwkv_ref (a wheel carries them in rwkv_ref/kernels/)")
    compiler = os.environ.get("CXX", "c++")   # what torch compiles with
    if shutil.which(compiler.split()[0] if compiler.strip() else "c++") is None:
        return (f"no C++ compiler found (looked for {compiler!r}): install g++ "
                f"(Debian/Ubuntu: apt install g++; Fedora: dnf install gcc-c++; "
                f"macOS: xcode-select --install), or set CXX")
    if not cpp_extension.is_ninja_available():
        return "ninja not found: pip install ninja (torch builds extensions with it)"
    return None


def _build(name: str):
    """Compile (or load from the cache) the extension for ``name`` and load its operators;
    raises on failure. The extension is a plain shared library that registers its functions
    with torch's dispatcher (``TORCH_LIBRARY``, see kernels/torch_op.h), so its operators are
    ``torch.ops.<build name>.<function>``."""
    from torch.utils import cpp_extension

    build_name, cuda = _build_name(name), name == "cuda"
    if not _is_built(build_name):       # a wait of half a minute deserves a word
        print(f"rwkv_ref: compiling the {name} kernel (once per version of its sources; "
              "about 30 s)", file=sys.stderr, flush=True)
    folder = _stage_sources(name, build_name)
    sources = [str(folder / f) for f in _SOURCES[name] if not f.endswith(".h")]
    cpp_extension.load(
        name=build_name, sources=sources, extra_cflags=["-O3"] if cuda else list(_CFLAGS),
        extra_ldflags=[] if cuda else list(_LDFLAGS), extra_cuda_cflags=list(_CUDA_FLAGS),
        extra_include_paths=[str(folder)], with_cuda=cuda, is_python_module=False,
        verbose=False)
    return _Operators(getattr(torch.ops, build_name))


class _Operators:
    """The operators of one built kernel (``torch.ops.<build name>``) as attributes of an
    object of our own: a test may wrap or replace one here without changing torch.ops, which
    torch.compile reads."""

    def __init__(self, namespace):
        self._namespace = namespace

    def __getattr__(self, function: str):
        operator = getattr(self._namespace, function)
        setattr(self, function, operator)
        return operator

    def __repr__(self) -> str:
        return f"<operators of {self._namespace.name}>"


def _stage_sources(name: str, build_name: str) -> Path:
    """Copy the kernel's sources into ``src/`` of its build folder, and compile those.

    The build then names the same files wherever rwkv_ref is installed (a checkout, a wheel in
    a virtualenv, site-packages): installs that share the extension cache share the build,
    instead of each rewriting its build.ninja with their own paths and recompiling. The folder's
    name carries the sources' hash, so a file already there is these bytes: it is kept (a fresh
    copy would be newer than the objects, and ninja would rebuild); a missing one is written
    atomically (processes may build at once).
    """
    folder = build_directory(build_name) / "src"
    folder.mkdir(exist_ok=True)
    for file in _SOURCES[name]:
        target = folder / file
        if not target.is_file():
            temporary = folder / f".{file}.{os.getpid()}.tmp"
            shutil.copyfile(KERNELS_DIR / file, temporary)
            os.replace(temporary, target)
    return folder


def build_directory(build_name: str) -> Path:
    """The folder of torch's extension cache that holds the build ``build_name`` (created if
    missing; a private helper of torch's, so that the cache's layout is torch's own)."""
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory(build_name, verbose=False))


def _is_built(build_name: str) -> bool:
    """Whether torch's extension cache already holds a build of that name (best effort)."""
    try:
        folder = build_directory(build_name)
    except Exception:  # noqa: BLE001 - a private helper of torch's; assume not built
        return False
    return (folder / f"{build_name}.so").exists()


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """None if kernel ``name`` ("cpp", "cuda", "rnn" or "ops") can be used now on ``device``,
    else why.

    The first call for a name builds (or loads) the extension; the first call for a name and
    a device (None: the CPU, or the current GPU for "cuda") then runs the kernel's self-check
    (``register_check``) there. Both results are remembered for the rest of the process; a
    failed self-check disables the kernel with one warning. Never raises.
    """
    if name not in _SOURCES:
        return f"unknown kernel {name!r}; use one of {', '.join(map(repr, _SOURCES))}"
    reason = _build_reason(name)
    if reason is not None:
        return reason
    return _verdict(name, _device_of(name, device))


def _build_reason(name: str) -> str | None:
    """Build (or load) the extension once; None on success, else why it failed."""
    if name in _modules or name in _reasons:
        return _reasons.get(name)
    try:
        reason = _missing_tool(name)
        if reason is None:
            _modules[name] = _build(name)
    except Exception as error:  # noqa: BLE001 - a failed build is explained, not raised
        # torch's message ends with the compiler's output: keep its tail, where the error is
        tail = str(error).strip()[-3000:]
        reason = f"building the {name} kernel failed ({type(error).__name__}): {tail}"
    if reason is not None:
        _reasons[name] = reason
    return reason


# torch.compile runs the function while tracing and keeps its answer as a constant, instead
# of tracing into the build and the self-check (which would break the graph). This is what
# torch.compiler.assume_constant_result(unavailable_reason) does, by setting this one
# attribute; but it imports all of torch._dynamo to do it, 1.2 s, half of `import rwkv_ref`
# and of every notebook's and command's start. tests/test_compile.py compiles with
# fullgraph=True in a fresh process and fails if torch ever stops reading the attribute.
unavailable_reason._dynamo_marked_constant = True


def missing_tool(name: str) -> str | None:
    """Why kernel ``name`` cannot even be built here (no compiler, no GPU...), else None: the
    one reason a test may skip a kernel; any other failure is a bug."""
    return _missing_tool(name) if name in _SOURCES else f"unknown kernel {name!r}"


def extension(name: str):
    """The operators of kernel ``name`` (``torch.ops.<build name>``); RuntimeError saying why
    if unavailable.

    They take contiguous tensors of one float dtype: ``forward(w, u, k, v, a, b, p)
    -> [y, a, b, p]`` and ``backward(w, u, k, v, y, gy, a, b, p, ga, gb, gp) -> [gw, gu, gk,
    gv, ga_in, gb_in, gp_in]`` (w, u: (C,); k, v, y, gy: (B, T, C); states: (B, C)).
    """
    reason = _build_reason(name) if name in _SOURCES else unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"rwkv_ref: the {name} kernel is unavailable: {reason}")
    return _modules[name]


# ----------------------------------------------------------------------------- self-checks
# The first use of a kernel on a device runs it on a small random input against its reference
# (registered by the module that owns the reference: rwkv_ref.wkv for "cpp"/"cuda",
# rwkv_ref.model for "rnn"). A mismatch disables the kernel for the process, with one warning,
# and the callers fall back to PyTorch ops. A compiler bug, an instruction set the loader
# picked wrongly or an untested GPU then costs speed, never wrong numbers.

FAILED_CHECK = "gave wrong results in its self-check"   # in the reason of a disabled kernel
REPORT = ("Please report it (this message, your CPU or GPU model, and the output of "
          "`python -m torch.utils.collect_env`) to the rwkv_ref issue tracker.")
_checks: dict[str, object] = {}                # name -> check(device) -> problem or None
_verdicts: dict[tuple[str, str], str | None] = {}   # (name, device) -> why disabled, or None


def register_check(name: str, check) -> None:
    """Make ``check(device) -> str | None`` the self-check of kernel ``name``: it runs the
    kernel on a small random input on ``device`` and returns None if it matches its
    reference, else what differed (e.g. "grad w: max error 0.3 > 1e-4")."""
    _checks[name] = check


def _device_of(name: str, device) -> torch.device:
    """The device the kernel runs on: ``device``, else the CPU (or the current GPU)."""
    if device is None:
        device = "cuda" if name == "cuda" else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _verdict(name: str, device: torch.device) -> str | None:
    """Run the registered self-check of ``name`` on ``device`` once; the remembered result."""
    key = (name, str(device))
    if key in _verdicts:
        return _verdicts[key]
    _verdicts[key] = None                    # the check itself calls the kernel
    check = _checks.get(name)
    try:
        problem = None if check is None else _run_check(check, device)
    except Exception as error:  # noqa: BLE001 - a kernel that crashes is one that fails
        problem = f"it raised {type(error).__name__}: {str(error).strip()[-500:]}"
    if problem is not None:
        disable(name, device, problem)
    return _verdicts[key]


def _run_check(check, device: torch.device) -> str | None:
    """``check(device)`` with gradients on, outside inference mode and autocast."""
    with torch.inference_mode(False), torch.enable_grad(), \
            torch.autocast(device.type, enabled=False):
        return check(device)


def disable(name: str, device: torch.device | str, problem: str) -> None:
    """Turn kernel ``name`` off on ``device`` for the process, with one warning saying why."""
    fallback = {"rnn": "RNN mode runs on PyTorch ops",
                "ops": "the mixing blocks run on PyTorch ops"}.get(
        name, "impl='auto' uses the pure PyTorch 'parallel' variant")
    reason = f"the {name} kernel {FAILED_CHECK} on {device} ({problem})"
    _verdicts[(name, str(torch.device(device)))] = reason
    warnings.warn(f"rwkv_ref: {reason}, so it is disabled for this process and {fallback} "
                  f"(slower, same results). {REPORT}", RuntimeWarning, stacklevel=4)


# ----------------------------------------------------------------------------- WKV as a torch op
# The kernels are PyTorch custom operators (torch.library): torch.compile sees one opaque op
# with a fake (meta) implementation giving the output shapes, and autograd calls the backward
# op, so a compiled training step runs through the kernel without a graph break.


@torch.library.custom_op("rwkv_ref::wkv_forward", mutates_args=())
def _wkv_forward(name: str, w: Tensor, u: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                 p: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y, a, b, p = WKV(w, u, k, v, a_in, b_in, p_in) by the extension ``name``."""
    y, a_out, b_out, p_out = extension(name).forward(w, u, k, v, a, b, p)
    return y, a_out, b_out, p_out


@_wkv_forward.register_fake
def _(name, w, u, k, v, a, b, p):
    return torch.empty_like(k), torch.empty_like(a), torch.empty_like(a), torch.empty_like(a)


@torch.library.custom_op("rwkv_ref::wkv_backward", mutates_args=())
def _wkv_backward(name: str, w: Tensor, u: Tensor, k: Tensor, v: Tensor, y: Tensor, gy: Tensor,
                  a: Tensor, b: Tensor, p: Tensor, ga: Tensor, gb: Tensor, gp: Tensor,
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """gw, gu, gk, gv, ga_in, gb_in, gp_in by the extension's hand-derived backward scan."""
    return tuple(extension(name).backward(w, u, k, v, y, gy, a, b, p, ga, gb, gp))


@_wkv_backward.register_fake
def _(name, w, u, k, v, y, gy, a, b, p, ga, gb, gp):
    return (torch.empty_like(w), torch.empty_like(u), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(a), torch.empty_like(a), torch.empty_like(a))


class _WKVFunction:
    """The autograd of ``rwkv_ref::wkv_forward``, in the two halves of a
    ``torch.autograd.Function`` (registered with ``torch.library.register_autograd``): what
    the forward saves, and the backward by the kernel's own scan (``rwkv_ref::wkv_backward``).
    """

    @staticmethod
    def setup_context(ctx, inputs, output):
        name, *tensors = inputs
        ctx.name = name
        ctx.save_for_backward(*tensors, output[0])   # states are recomputed, not saved

    @staticmethod
    def backward(ctx, gy, ga, gb, gp):
        w, u, k, v, a, b, p, y = ctx.saved_tensors
        grads = [torch.zeros_like(ref) if g is None else g.contiguous()
                 for g, ref in ((gy, y), (ga, a), (gb, a), (gp, a))]
        return (None, *_wkv_backward(ctx.name, w, u, k, v, y, *grads[:1], a, b, p, *grads[1:]))


_wkv_forward.register_autograd(_WKVFunction.backward,
                              setup_context=_WKVFunction.setup_context)


def wkv_kernel(name: str, w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKVState):
    """The WKV operator by the compiled kernel ``name`` ("cpp" or "cuda").

    Inputs are those of ``rwkv_ref.wkv`` after ``check_inputs``; computation is in float64
    for float64 ``k`` and in float32 otherwise (bf16 and fp16 are upcast).

    Args:
        w: (C,) POSITIVE decay rate ``exp(time_decay)``.  u: (C,) bonus.
        k, v: (B, T, C).  state: ``WKVState`` of three (B, C) tensors in the compute dtype.
    Returns:
        y: (B, T, C) and the ``WKVState`` after the last token, both in the compute dtype.
        Differentiable w.r.t. w, u, k, v and the three state tensors.
    Raises:
        RuntimeError: the kernel is unavailable or failed its self-check (the message says
        why and what to install).
    """
    reason = unavailable_reason(name, k.device)
    if reason is not None:
        raise RuntimeError(f"rwkv_ref: the {name} kernel is unavailable: {reason}")
    dtype = compute_dtype(k.dtype)
    args = [x.to(dtype).contiguous() for x in (w, u, k, v, *state)]
    y, a, b, p = _wkv_forward(name, *args)
    return y, WKVState(a, b, p)


# ----------------------------------------------------------------------------- RNN mode

RNN_MAX_BATCH = 16              # rows per call (kernels/rnn_cpu.cpp's kMaxBatch)
RNN_DTYPES = (torch.float32, torch.bfloat16)
# False: RNN mode runs on PyTorch ops only (to compare, or to step through Block.step).
RNN_KERNEL = os.environ.get("RWKV_REF_RNN_KERNEL", "1") != "0"


def rnn_applies(x: Tensor, w: Tensor) -> bool:
    """Whether the ``rnn`` kernel can take inputs x (B, C) with weights like w: B <= 16, both
    on the CPU, w float32 or bfloat16 and row-major, no gradient needed, and the kernel
    builds. Cheap checks first: a training step never builds the kernel. ``RNN_KERNEL = False``
    (or ``RWKV_REF_RNN_KERNEL=0`` in the environment) turns the kernel off."""
    return (RNN_KERNEL and x.dim() == 2 and x.shape[0] <= RNN_MAX_BATCH
            and x.device.type == "cpu" and w.device.type == "cpu"
            and w.dtype in RNN_DTYPES and w.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and unavailable_reason("rnn") is None)


@torch.library.custom_op("rwkv_ref::rnn_linear", mutates_args=())
def _rnn_linear(x: Tensor, w: Tensor) -> Tensor:
    """(B, N) float32 = x (B, K) float32 @ w (N, K).T by the rnn extension."""
    return extension("rnn").linear(x, w)


@_rnn_linear.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("rwkv_ref::rnn_block_step", mutates_args=())
def _rnn_block_step(x: Tensor, att_x: Tensor, a: Tensor, b: Tensor, p: Tensor, ffn_x: Tensor,
                    params: list[Tensor], matrices: list[Tensor], w: Tensor, u: Tensor,
                    eps: float) -> list[Tensor]:
    """One block of RNN mode by the rnn extension (see ``block_step``)."""
    return extension("rnn").block_step(x, att_x, a, b, p, ffn_x, params, matrices, w, u, eps)


@_rnn_block_step.register_fake
def _(x, att_x, a, b, p, ffn_x, params, matrices, w, u, eps):
    return [torch.empty_like(x), torch.empty_like(x), torch.empty_like(a),
            torch.empty_like(a), torch.empty_like(a), torch.empty_like(x)]


def matvec(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T`` by the compiled kernel, summed in float32; the result in x's dtype.

    Args:
        x: (B, K), B <= 16, any float dtype (converted to float32 for the sums).
        w: (N, K) float32 or bfloat16, contiguous.
    Returns:
        (B, N). Not differentiable: use ``F.linear`` where a gradient is needed.
    Raises:
        RuntimeError: the kernel is unavailable (the message says why), or bad shapes.
    """
    y = _rnn_linear(x.to(torch.float32).contiguous(), w)
    return y.to(x.dtype)


def block_step(x: Tensor, att_x: Tensor, a: Tensor, b: Tensor, p: Tensor, ffn_x: Tensor,
               params: list[Tensor], matrices: list[Tensor], w: Tensor, u: Tensor,
               eps: float) -> list[Tensor]:
    """One block of RNN mode (after ``ln0``) in one compiled call; see kernels/rnn_cpu.cpp.

    ``rwkv_ref.model.Block.step`` knows which of its tensors go where and calls this.

    Args:
        x, att_x, ffn_x: (B, C) float32; a, b, p: (B, A) float32 WKV state, B <= 16.
        params: the block's nine (C,) vectors (ln1 w/b, ln2 w/b, att mix k/v/r, ffn mix k/r);
        matrices: its seven weights (att r/k/v/o, ffn k/r/v), float32 or bf16, row-major.
        w: (A,) POSITIVE decay rate exp(time_decay), float32.  u: (A,) time_first.
        eps: the LayerNorms' epsilon.
    Returns:
        [x, att_x, a, b, p, ffn_x] after this token, float32.
    """
    return _rnn_block_step(x, att_x, a, b, p, ffn_x, params, matrices, w, u, eps)
