"""The WKV operator of RWKV-4 in five variants behind one signature.

Per channel c (every operation is elementwise across C), with the positive decay rate
``w = exp(time_decay)`` (the per-step decay is ``exp(-w)``) and the bonus ``u = time_first``
for the current token (paper eq. 14)::

    wkv_t = ( sum_{i<t} e^{-(t-1-i)w + k_i} v_i + e^{u+k_t} v_t )
          / ( sum_{i<t} e^{-(t-1-i)w + k_i}     + e^{u+k_t}     )

Every function here takes the POSITIVE rate ``w``. (The official CUDA kernel is handed
``-exp(time_decay)`` instead; ``rwkv_ref`` never uses that convention.)

The state before token t holds the past sums ``num = a * e^p`` and ``den = b * e^p``, where
``p`` is the largest exponent among their terms (the "running maximum"). Every variant returns
this canonical ``p``, so states from different variants can be compared and handed over.

    y, state = wkv(w, u, k, v, state=None, impl="auto")

=============  ==========================================================================
``naive``      eq. 14 as written, explicit exponentials; overflows once k or u+k > ~88
``logspace``   the official kernel's algorithm: one scan with a running maximum
``recurrent``  RNN mode: ``wkv_step`` applied one token at a time
``parallel``   GPT mode: a per-channel masked softmax over time, chunk by chunk
``scan``       a log-depth parallel prefix scan over the state monoid (``rwkv_ref.scan``)
``cpp``        the compiled scan of ``kernels/`` on the CPU (hand-written backward)
``cuda``       the same scan body compiled for the GPU
=============  ==========================================================================
"""
from __future__ import annotations

import warnings
from functools import partial

import torch
from torch import Tensor

from rwkv_ref import kernel
from rwkv_ref.scan import wkv_scan
from rwkv_ref.state import EMPTY_P, WKVState, compute_dtype  # noqa: F401 (re-exported)
from rwkv_ref.state import merge as _merge

WKV_IMPLS = ("naive", "logspace", "recurrent", "parallel", "scan", "cpp", "cuda")

# ----------------------------------------------------------------------------- checks


def check_inputs(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKVState | None) -> None:
    """Raise ``ValueError`` naming the problem if the inputs do not fit one WKV call.

    Args:
        w, u: (C,) decay rate (positive) and bonus.
        k, v: (B, T, C) keys and values.
        state: None or a ``WKVState`` of three (B, C) tensors.
    """
    named = {"w": w, "u": u, "k": k, "v": v}
    for name, x in named.items():
        if not isinstance(x, Tensor):
            raise ValueError(f"wkv: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"wkv: {name} must have a floating dtype, got {x.dtype}")
    if k.dim() != 3:
        raise ValueError(f"wkv: k must have shape (B, T, C), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"wkv: v has shape {tuple(v.shape)} but k has {tuple(k.shape)}")
    B, T, C = k.shape
    if T == 0 or B == 0 or C == 0:
        raise ValueError(f"wkv: empty input, k has shape {tuple(k.shape)}")
    for name in ("w", "u"):
        if named[name].shape != (C,):
            raise ValueError(f"wkv: {name} must have shape (C,) = ({C},), "
                             f"got {tuple(named[name].shape)}")
    devices = {x.device for x in named.values()}
    if len(devices) > 1:
        raise ValueError(f"wkv: inputs are on different devices: {sorted(map(str, devices))}")
    # Reading w's values would break a torch.compile graph: checked in eager mode only.
    if not torch.compiler.is_compiling() and not bool(torch.all(w > 0)):
        raise ValueError("wkv: w must be positive (w = exp(time_decay), the decay RATE); "
                         "got a value <= 0. Did you pass the official kernel's -exp(time_decay)?")
    if state is not None:
        if not isinstance(state, tuple) or len(state) != 3:
            raise ValueError("wkv: state must be a WKVState(a, b, p)")
        for name, s in zip(WKVState._fields, state):
            if not isinstance(s, Tensor) or s.shape != (B, C):
                shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
                raise ValueError(f"wkv: state.{name} must have shape (B, C) = ({B}, {C}), "
                                 f"got {shape}")
            if not s.is_floating_point():
                raise ValueError(f"wkv: state.{name} must have a floating dtype, got {s.dtype}")
            if s.device != k.device:
                raise ValueError(f"wkv: state.{name} is on {s.device} but k is on {k.device}")


# ----------------------------------------------------------------------------- naive


def wkv_naive(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKVState):
    """Eq. 14 with explicit exponentials: exact in exact arithmetic, overflows in floats.

    ``e^{k}`` overflows float32 once k > ~88 (and float64 once k > ~709): the result is then
    inf or nan. This is on purpose; ``logspace`` shows the fix.

    Args:
        w, u: (C,) positive decay rate and bonus.  k, v: (B, T, C).  state: ``WKVState``.
    Returns:
        y: (B, T, C) and the state after the last token.
    """
    B, T, C = k.shape
    t = torch.arange(T, device=k.device, dtype=k.dtype)
    dist = (t[:, None] - 1 - t[None, :]).clamp(min=0)         # (T, T): t-1-i, 0 if i >= t
    decay = torch.exp(-dist[None] * w[:, None, None])         # (C, T, T): e^{-(t-1-i)w}
    decay = decay.tril(-1)                                    # only i < t is the past
    ek = torch.exp(k)                                         # (B, T, C)
    num_in, den_in = state.a * torch.exp(state.p), state.b * torch.exp(state.p)  # (B, C)
    carry = torch.exp(-t[:, None] * w)                        # (T, C): e^{-t w} on the state
    past_num = torch.einsum("cti,bic->btc", decay, ek * v) + carry * num_in[:, None]
    past_den = torch.einsum("cti,bic->btc", decay, ek) + carry * den_in[:, None]
    bonus = torch.exp(u + k)                                  # (B, T, C): e^{u+k_t}
    y = (past_num + bonus * v) / (past_den + bonus)
    # state after the last token: the past sums one step later, in the canonical (a, b, p)
    last = T * torch.ones((), device=k.device, dtype=k.dtype)
    num = past_num[:, -1] * torch.exp(-w) + ek[:, -1] * v[:, -1]   # (B, C)
    den = past_den[:, -1] * torch.exp(-w) + ek[:, -1]
    p = _final_exponent(w, k, state.p, last)
    return y, WKVState(num * torch.exp(-p), den * torch.exp(-p), p)


def _final_exponent(w: Tensor, k: Tensor, p_in: Tensor, length: Tensor) -> Tensor:
    """The largest exponent in the state after k: max(p_in - T w, max_i k_i - (T-1-i) w).

    Args: w (C,), k (B, T, C), p_in (B, C), length T as a tensor.  Returns: (B, C).
    """
    T = k.shape[1]
    age = torch.arange(T - 1, -1, -1, device=k.device, dtype=k.dtype)   # (T,): T-1-i
    newest = (k - age[:, None] * w).amax(dim=1)                           # (B, C)
    return torch.maximum(p_in - length * w, newest)


# ----------------------------------------------------------------------------- logspace


def wkv_logspace(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKVState):
    """The official kernel's algorithm in PyTorch: one scan over T with a running maximum.

    Names follow the kernel: ``aa, bb, pp`` is the state, ``ww`` an exponent, ``e1, e2`` the
    two rescaling factors. Every exponential has argument <= 0, so nothing overflows.

    Args:
        w, u: (C,) positive decay rate and bonus.  k, v: (B, T, C).  state: ``WKVState``.
    Returns:
        y: (B, T, C) and the state after the last token.
    """
    aa, bb, pp = state
    ys = []
    for t in range(k.shape[1]):
        kk, vv = k[:, t], v[:, t]                   # (B, C)
        # output: the past (aa, bb at exponent pp) plus the current token at exponent u + k
        ww = u + kk
        p = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        ys.append((e1 * aa + e2 * vv) / (e1 * bb + e2))
        # update: decay the past by e^{-w}, add the current token at exponent k
        ww = pp - w
        p = torch.maximum(ww, kk)
        e1, e2 = torch.exp(ww - p), torch.exp(kk - p)
        aa, bb, pp = e1 * aa + e2 * vv, e1 * bb + e2, p
    return torch.stack(ys, dim=1), WKVState(aa, bb, pp)


# ----------------------------------------------------------------------------- recurrent


def wkv_step(w: Tensor, u: Tensor, k_t: Tensor, v_t: Tensor, state: WKVState):
    """One token of RNN mode: read the output, then write the token into the state.

    ``wkv_t = (num + e^{u+k_t} v_t) / (den + e^{u+k_t})`` and then
    ``num <- e^{-w} num + e^{k_t} v_t`` (likewise ``den`` with 1 for v), kept as (a, b, p).

    Args:
        w, u: (C,) positive decay rate and bonus.  k_t, v_t: (B, C) this token.
        state: ``WKVState`` before this token.
    Returns:
        y_t: (B, C) and the state after this token (the input state is not modified).
    """
    one = torch.ones_like(v_t)
    now = WKVState(v_t, one, u + k_t)                   # the current token, with its bonus
    read = _merge(state, now)
    y_t = read.a / read.b
    written = _merge(state.decay(w), WKVState(v_t, one, k_t))
    return y_t, written


def wkv_recurrent(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKVState):
    """RNN mode over a whole sequence: ``wkv_step`` for t = 0 .. T-1.

    Args/Returns: as ``wkv_logspace``.
    """
    ys = []
    for t in range(k.shape[1]):
        y_t, state = wkv_step(w, u, k[:, t], v[:, t], state)
        ys.append(y_t)
    return torch.stack(ys, dim=1), state


# ----------------------------------------------------------------------------- parallel


def wkv_parallel(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKVState, chunk: int = 32):
    """GPT mode: every output of a chunk at once, as a per-channel masked softmax.

    Within a chunk of length L, output t attends to token i < t with score
    ``k_i - (t-1-i) w``, to itself with ``u + k_t``, and to the carried state (the whole past
    before the chunk, weight ``b`` and value ``a / b``) with score ``p - t w``. Offsets are
    relative to the chunk start, so nothing grows with the absolute position.
    Work is O(B C T L), memory O(B C L^2) beyond the output.

    Args:
        w, u: (C,) positive decay rate and bonus.  k, v: (B, T, C).  state: ``WKVState``.
        chunk: L, the number of tokens computed at once.
    Returns:
        y: (B, T, C) and the state after the last token.
    """
    ys = []
    for start in range(0, k.shape[1], chunk):
        y, state = _parallel_chunk(w, u, k[:, start:start + chunk], v[:, start:start + chunk],
                                   state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


def _parallel_chunk(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKVState):
    """One chunk of ``wkv_parallel``: k, v (B, L, C) → y (B, L, C) and the next state."""
    L = k.shape[1]
    k, v = k.transpose(1, 2), v.transpose(1, 2)                   # (B, C, L): per channel
    t = torch.arange(L, device=k.device, dtype=k.dtype)
    dist = (t[:, None] - 1 - t[None, :])                          # (L, L): t-1-i
    scores = k[:, :, None, :] - dist * w[:, None, None]           # (B, C, L, L)
    diag = torch.eye(L, dtype=torch.bool, device=k.device)
    scores = torch.where(diag, (u[:, None] + k)[..., None, :], scores)
    scores = scores.masked_fill(dist < -1, float("-inf"))         # the future is masked
    carried = state.p[..., None] - t * w[:, None]                 # (B, C, L): p - t w
    m = torch.maximum(scores.amax(-1), carried)                   # (B, C, L)
    e = torch.exp(scores - m[..., None])                          # (B, C, L, L)
    ec = torch.exp(carried - m)                                   # (B, C, L)
    num = (e @ v[..., None]).squeeze(-1) + ec * state.a[..., None]
    den = e.sum(-1) + ec * state.b[..., None]
    y = (num / den).transpose(1, 2)                               # (B, L, C)
    # the state after the chunk: every token aged to the chunk's end, and the old state
    age = (L - 1 - t)                                             # (L,)
    last = (k - age * w[:, None])                                 # (B, C, L)
    p = torch.maximum(last.amax(-1), state.p - L * w)             # (B, C)
    el, es = torch.exp(last - p[..., None]), torch.exp(state.p - L * w - p)
    new = WKVState((el * v).sum(-1) + es * state.a, el.sum(-1) + es * state.b, p)
    return y, new


# ----------------------------------------------------------------------------- dispatch

_PURE = {
    "naive": wkv_naive,
    "logspace": wkv_logspace,
    "recurrent": wkv_recurrent,
    "parallel": wkv_parallel,
    "scan": wkv_scan,
}
_warned: set[str] = set()


def _auto_impl(device: torch.device) -> str:
    """The compiled kernel for the device if it builds and passes its self-check, else
    ``parallel`` with one warning (a failed self-check has given its own)."""
    name = "cuda" if device.type == "cuda" else "cpp"
    problem = kernel.unavailable_reason(name)
    if problem is None and device.type == "cuda":
        problem = kernel.unavailable_reason(name, device)     # each GPU checks itself
    if problem is None:
        return name
    if name not in _warned:
        _warned.add(name)
        if kernel.FAILED_CHECK not in problem:
            warnings.warn(f"rwkv_ref: the {name} WKV kernel is unavailable, using the pure "
                          f"PyTorch 'parallel' variant instead (slower). Reason: {problem}",
                          stacklevel=3)
    return "parallel"


# ----------------------------------------------------------------------------- self-check


def _self_check(name: str, device: torch.device, tol: float = 1e-3) -> str | None:
    """Kernel ``name`` on ``device`` against ``wkv_logspace`` in float64 on a small random
    input: y, the outgoing state, and the gradients of a random loss on both w.r.t. w, u, k,
    v and the incoming state. Run once per device by ``rwkv_ref.kernel`` before first use.

    Returns:
        None if every tensor agrees to ``tol`` relative to max(1, its largest value), else
        which one differed and by how much.
    """
    g = torch.Generator().manual_seed(0)                  # never the global RNG
    B, T, C = 2, 12, 35              # on the CPU: one SIMD block of 32 channels, 3 single ones

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    w = (4 * torch.rand(C, generator=g, dtype=torch.float64) - 3).exp()
    inputs = [w, randn(C), 2 * randn(B, T, C), randn(B, T, C),        # w, u, k, v
              randn(B, C), randn(B, C).abs() + 0.5, randn(B, C)]       # an arbitrary state
    weights = [randn(B, T, C)] + [randn(B, C) for _ in range(3)]       # the loss on y, a, b, p

    def run(fn, dtype, dev):
        leaves = [x.to(dev, dtype).requires_grad_() for x in inputs]
        y, state = fn(*leaves[:4], WKVState(*leaves[4:]))
        loss = sum((t * c.to(dev, dtype)).sum() for t, c in zip((y, *state), weights))
        return [y, *state, *torch.autograd.grad(loss, leaves)]

    want = run(wkv_logspace, torch.float64, "cpu")
    got = run(lambda *xs: kernel.wkv_kernel(name, *xs), torch.float32, device)
    names = ["y", "state.a", "state.b", "state.p"] + [f"grad {n}" for n in "wukvabp"]
    for what, x, ref in zip(names, got, want):
        err = (x.detach().double().cpu() - ref).abs().max().item()
        scale = max(1.0, ref.abs().max().item())
        if not err <= tol * scale:                            # NaN fails too
            return f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"
    return None


for _name in ("cpp", "cuda"):
    kernel.register_check(_name, partial(_self_check, _name))


def wkv(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKVState | None = None,
        impl: str = "auto"):
    """The WKV operator (paper eq. 14), continuing from ``state``.

    Args:
        w: (C,) POSITIVE decay rate, ``exp(time_decay)``; the per-step decay is ``exp(-w)``.
        u: (C,) bonus for the current token, ``time_first``.
        k, v: (B, T, C) keys and values.
        state: the ``WKVState`` before the first token, or None for the empty state.
        impl: one of ``WKV_IMPLS`` or ``"auto"`` (the compiled kernel for the device if it
            builds and passes its self-check, else ``parallel``).
    Returns:
        y: (B, T, C) in the dtype of ``k``; state: ``WKVState`` after the last token, in
        float32 (float64 for float64 inputs), whatever the autocast state: every variant
        sums in that dtype. The given state is never modified.
    """
    if impl != "auto" and impl not in WKV_IMPLS:
        raise ValueError(f"wkv: unknown impl {impl!r}; choose one of {WKV_IMPLS} or 'auto'")
    check_inputs(w, u, k, v, state)
    dtype = compute_dtype(k.dtype)
    B, _, C = k.shape
    if state is None:
        state = WKVState.empty(B, C, dtype=dtype, device=k.device)
    state = state.to(dtype)
    if impl == "auto":
        impl = _auto_impl(k.device)
    if impl in ("cpp", "cuda"):
        y, state = kernel.wkv_kernel(impl, w, u, k, v, state)
    else:
        # Autocast would run naive's and parallel's products in bf16: the sums stay in dtype.
        with torch.autocast(k.device.type, enabled=False):
            y, state = _PURE[impl](w.to(dtype), u.to(dtype), k.to(dtype), v.to(dtype), state)
    return y.to(k.dtype), state
