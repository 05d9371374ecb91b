"""The elementwise pieces of RWKV's mixing blocks: the token-shift mix and the squared ReLU.

    mix(x, x_prev, mu)         = mu·x + (1-mu)·x_prev        (a lerp from x_prev towards x)
    mixes(x, x_prev, *mus)     = [mix(x, x_prev, mu) for mu in mus]
    relu_square(x)             = relu(x)²

These lines are the model's definition (``rwkv_ref.model`` calls them). In eager training on
the CPU, ``mixes`` and ``relu_square`` run instead as one compiled pass each, forward and
backward (the ``ops`` kernel, ``kernels/ops_cpu.cpp``): as separate PyTorch ops the three mixes
of a TimeMixing block cost about 20 ops in the backward and the squared ReLU six on the widest
tensor of the model (``benchmarks/bench_train.py`` times RWKV's training step with the fused
ops and without them). The results equal the lines below up to float32 rounding;
like every kernel, ``ops`` checks itself against them on first use (``rwkv_ref.kernel``) and is
skipped when it cannot be built. Under ``torch.compile``, autocast, on the GPU, in bf16, or
without a gradient to take, the lines below run as written (the compiler fuses them itself).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from rwkv_ref import kernel

# False: always the PyTorch lines (to compare, or to step through them; RWKV_REF_OPS_KERNEL=0
# in the environment).
OPS_KERNEL = os.environ.get("RWKV_REF_OPS_KERNEL", "1") != "0"


def mix(x: Tensor, x_prev: Tensor, mu: Tensor) -> Tensor:
    """Token-shift interpolation ``μ·x + (1-μ)·x_prev`` (a lerp from x_prev towards x).

    Args:
        x, x_prev: (..., C).  mu: C values in any shape, e.g. the stored (1, 1, C).
    Returns:
        (..., C).
    """
    return torch.lerp(x_prev, x, mu.reshape(-1))


def mixes(x: Tensor, x_prev: Tensor, *mus: Tensor) -> list[Tensor]:
    """``[mix(x, x_prev, mu) for mu in mus]`` (two or three mus), fused in eager CPU training.

    Args:
        x, x_prev: (..., C).  mus: C values each.
    Returns:
        one (..., C) tensor per mu.
    """
    if len(mus) in (2, 3) and _applies(x, x_prev, *mus):
        return list(_mixes(x, x_prev, torch.stack([m.reshape(-1) for m in mus])))
    return [mix(x, x_prev, mu) for mu in mus]


def relu_square(x: Tensor) -> Tensor:
    """``relu(x)²``, the channel mix's activation, fused in eager CPU training. Any shape."""
    if _applies(x):
        return _relu_square(x)
    return torch.relu(x).square()


def _applies(*tensors: Tensor) -> bool:
    """Whether the fused ops stand in: eager mode, autograd recording, no autocast, every
    tensor contiguous on the CPU in float32 (or float64), and the kernel built and checked.
    Cheap checks first: inference and compiled code never build the kernel."""
    first = tensors[0]
    return (OPS_KERNEL and torch.is_grad_enabled()
            and any(t.requires_grad for t in tensors)
            and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu")
            and all(t.device.type == "cpu" and t.dtype == first.dtype and t.is_contiguous()
                    for t in tensors)
            and first.dtype in (torch.float32, torch.float64) and first.numel() > 0
            and kernel.unavailable_reason("ops") is None)


# ----------------------------------------------------------------------------- the torch ops


@torch.library.custom_op("rwkv_ref::mixes", mutates_args=())
def _mixes(x: Tensor, x_prev: Tensor, mu: Tensor) -> list[Tensor]:
    """[lerp(x_prev, x, mu[m]) for m] by the ops extension; mu (M, C), M = 2 or 3."""
    return kernel.extension("ops").mixes(x, x_prev, mu)


@_mixes.register_fake
def _(x, x_prev, mu):
    return [torch.empty_like(x) for _ in range(mu.shape[0])]


@torch.library.custom_op("rwkv_ref::mixes_backward", mutates_args=())
def _mixes_backward(x: Tensor, x_prev: Tensor, mu: Tensor,
                    grads: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """gx, gx_prev, gmu (M, C) given the gradients of the M outputs."""
    return tuple(kernel.extension("ops").mixes_backward(x, x_prev, mu, grads))


@_mixes_backward.register_fake
def _(x, x_prev, mu, grads):
    return torch.empty_like(x), torch.empty_like(x), torch.empty_like(mu)


def _mixes_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _mixes_grad(ctx, grads):
    x, x_prev, mu = ctx.saved_tensors
    grads = [torch.zeros_like(x) if g is None else g.contiguous() for g in grads]
    return _mixes_backward(x, x_prev, mu, grads)


_mixes.register_autograd(_mixes_grad, setup_context=_mixes_setup)


@torch.library.custom_op("rwkv_ref::relu_square", mutates_args=())
def _relu_square(x: Tensor) -> Tensor:
    """relu(x)² by the ops extension."""
    return kernel.extension("ops").relu_square(x)


@_relu_square.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("rwkv_ref::relu_square_backward", mutates_args=())
def _relu_square_backward(x: Tensor, grad: Tensor) -> Tensor:
    """2·grad·relu(x)."""
    return kernel.extension("ops").relu_square_backward(x, grad)


@_relu_square_backward.register_fake
def _(x, grad):
    return torch.empty_like(x)


def _relu_square_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _relu_square_grad(ctx, grad):
    (x,) = ctx.saved_tensors
    return _relu_square_backward(x, grad.contiguous())


_relu_square.register_autograd(_relu_square_grad, setup_context=_relu_square_setup)


# ----------------------------------------------------------------------------- self-check


def _self_check(device) -> str | None:
    """The fused ops against the PyTorch lines above, in float64 on a small random input
    (2 and 3 mixes, C = 70: two SIMD blocks and a tail, and signs of both kinds): outputs and
    the gradients of a random loss w.r.t. every input. Run once by ``rwkv_ref.kernel``.

    Returns:
        None if all agree to 1e-10, else what differed.
    """
    g = torch.Generator().manual_seed(0)                  # never the global RNG
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    x, x_prev = rand(3, 5, 70).requires_grad_(), rand(3, 5, 70).requires_grad_()
    for m in (2, 3):
        mus = [torch.rand(1, 1, 70, generator=g, dtype=torch.float64).requires_grad_()
               for _ in range(m)]
        weights = [rand(3, 5, 70) for _ in range(m)]
        fused = _mixes(x, x_prev, torch.stack([mu.reshape(-1) for mu in mus]))
        plain = [mix(x, x_prev, mu) for mu in mus]
        if (problem := _compare(f"mixes ({m})", fused, plain, weights, [x, x_prev, *mus])):
            return problem
    weight = rand(3, 5, 70)
    return _compare("relu_square", [_relu_square(x)], [torch.relu(x).square()], [weight], [x])


def _compare(what: str, fused: list[Tensor], plain: list[Tensor], weights: list[Tensor],
             inputs: list[Tensor]) -> str | None:
    """What differs between the fused and the plain outputs, or the gradients of
    ``sum(out * weight)`` through them w.r.t. ``inputs``; None if nothing does."""
    grads = [torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), inputs)
             for outs in (fused, plain)]
    pairs = [(f"output {i}", a, b) for i, (a, b) in enumerate(zip(fused, plain))]
    pairs += [(f"gradient w.r.t. input {i}", a, b) for i, (a, b) in enumerate(zip(*grads))]
    for name, a, b in pairs:
        err = (a - b).abs().max().item()
        if not err <= 1e-10:                                       # NaN fails too
            return f"{what}, {name}: max error {err:.3g} > 1e-10"
    return None


kernel.register_check("ops", _self_check)
