"""RWKV-4 (arXiv 2305.13048) in one file: the model in GPT mode and in RNN mode.

    embedding → ln0 → N × [ x += att(ln1(x)) ; x += ffn(ln2(x)) ] → ln_out → head

Glossary (paper symbol · checkpoint name · code name). The checkpoint names are the parameter
names, so an official state dict loads by name; ``blocks.i.`` is left out below.

================  ====================================  ===================================
paper             checkpoint (shape)                    code
================  ====================================  ===================================
embedding         ``emb.weight`` (V, C)                 ``model.emb``
LayerNorm         ``blocks.0.ln0``                      ``blocks[0].ln0``, after ``emb``
LayerNorms        ``ln1``, ``ln2``                      ``block.ln1``, ``block.ln2``
μ_r, μ_k, μ_v     ``att.time_mix_r/k/v`` (1, 1, C)      ``att.time_mix_r`` ...
w                 ``att.time_decay`` (A,), = ln w       ``w = exp(time_decay)``, POSITIVE
u                 ``att.time_first`` (A,)               ``u = time_first``
W_r, W_k, W_v     ``att.receptance/key/value.weight``   ``att.receptance`` ... (A, C)
W_o               ``att.output.weight`` (C, A)          ``att.output``
μ'_r, μ'_k        ``ffn.time_mix_r/k`` (1, 1, C)        ``ffn.time_mix_r``, ``ffn.time_mix_k``
W'_r, W'_k, W'_v  ``ffn.receptance/key/value.weight``   (C, C), (F, C), (C, F)
LayerNorm, head   ``ln_out``, ``head.weight`` (V, C)    ``model.ln_out``, ``model.head``
x_{t-1}           (state)                               ``state.layers[i].att_x``, ``.ffn_x``
a, b, p           (state)                               ``state.layers[i].wkv``
================  ====================================  ===================================

Sizes: B batch, T time, C ``n_embd``, A ``dim_att``, F ``dim_ffn``, V ``vocab_size``.

Token shift: ``x_prev[t] = x[t-1]`` (the LayerNorm-ed input of the previous token; zeros, or the
state, at t = 0), and ``mix(x, x_prev, μ) = μ·x + (1-μ)·x_prev``.

GPT mode ``model(idx, state)`` runs all T tokens at once (WKV by ``config.wkv_impl``); RNN mode
``model.step(token, state)`` runs one token with ``wkv_step``. Both return the state after the
last token and never modify the state they are given. RNN mode without autograd on the CPU
runs through a compiled kernel (``Linear``, ``Block.step``): the same results up to float32
rounding, twice as fast or more.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from rwkv_ref import kernel, sampling
from rwkv_ref.ops import mix, mixes, relu_square  # noqa: F401 (mix: part of the model's math)
from rwkv_ref.state import LayerState, RWKVState, WKVState, compute_dtype
from rwkv_ref.tokenizer import check_token_ids
from rwkv_ref.wkv import WKV_IMPLS, wkv, wkv_step


@dataclass
class RWKVConfig:
    """Every size and knob of the model. ``dim_att`` defaults to ``n_embd``, ``dim_ffn`` to 4x.

    ``ctx_len`` is the training context length (the model itself accepts any T);
    ``wkv_impl`` picks the WKV variant of GPT mode (one of ``rwkv_ref.WKV_IMPLS`` or "auto").
    """

    vocab_size: int
    n_layer: int
    n_embd: int
    dim_att: int | None = None
    dim_ffn: int | None = None
    ctx_len: int = 1024
    wkv_impl: str = "auto"

    def __post_init__(self):
        self.dim_att = self.n_embd if self.dim_att is None else self.dim_att
        self.dim_ffn = 4 * self.n_embd if self.dim_ffn is None else self.dim_ffn
        for name in ("vocab_size", "n_layer", "n_embd", "dim_att", "dim_ffn", "ctx_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RWKVConfig.{name} must be a positive int, got {value!r}")
        if self.wkv_impl != "auto" and self.wkv_impl not in WKV_IMPLS:
            raise ValueError(f"RWKVConfig.wkv_impl must be 'auto' or one of {WKV_IMPLS}, "
                             f"got {self.wkv_impl!r}")


# ----------------------------------------------------------------------------- pure math


def token_shift(x: Tensor, last: Tensor) -> Tensor:
    """The previous token's vector at every position: ``x_prev[t] = x[t-1]``, ``last`` at t = 0.

    Args:
        x: (B, T, C).  last: (B, C), the vector before x[:, 0] (zeros at the very start).
    Returns:
        (B, T, C).
    """
    return torch.cat([last.unsqueeze(1), x[:, :-1]], dim=1)


# ----------------------------------------------------------------------------- modules


class Linear(nn.Linear):
    """``nn.Linear`` without a bias, whose matrix-vector products take the fast road.

    Decoding one token reads every weight once (two flops per weight), so RNN mode is bound by
    memory bandwidth. For a few input rows, on the CPU, without autograd, ``forward`` calls the
    compiled ``rwkv_ref.kernel.matvec`` (``kernels/rnn_cpu.cpp``), which streams the weight
    once at close to the machine's read bandwidth; torch's general kernel reaches about half of
    it on these shapes, and much less for bf16 (``benchmarks/bench_decode.py``). The result is
    ``F.linear(x, weight)`` up to float32 rounding. Everything else (training, GPT mode,
    the GPU, or no C++ compiler) uses ``F.linear``.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if kernel.rnn_applies(x, self.weight):
            return kernel.matvec(x, self.weight)
        return F.linear(x, self.weight)


class TimeMixing(nn.Module):
    """``att``: ``out = W_o (σ(r) ⊙ wkv(w, u, k, v))`` with r, k, v from token-shifted inputs."""

    def __init__(self, config: RWKVConfig):
        super().__init__()
        C, A = config.n_embd, config.dim_att
        self.time_decay = nn.Parameter(torch.empty(A))     # ln w
        self.time_first = nn.Parameter(torch.empty(A))     # u
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = Linear(C, A)
        self.value = Linear(C, A)
        self.receptance = Linear(C, A)
        self.output = Linear(A, C)

    def _rkv(self, x: Tensor, x_prev: Tensor):
        """Receptance, key and value of x (..., C): three (..., A) tensors, k and v in the
        WKV dtype."""
        xr, xk, xv = mixes(x, x_prev, self.time_mix_r, self.time_mix_k, self.time_mix_v)
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        dtype = compute_dtype(x.dtype)
        return r, k.to(dtype), v.to(dtype)

    def _wu(self, dtype: torch.dtype):
        """``w = exp(time_decay)`` (positive rate) and ``u = time_first``, both (A,)."""
        return self.time_decay.to(dtype).exp(), self.time_first.to(dtype)

    def forward(self, x: Tensor, x_prev: Tensor, state: WKVState, impl: str):
        """GPT mode. Args: x, x_prev (B, T, C); state before x[:, 0]; impl the WKV variant.

        Returns:
            out (B, T, C) and the ``WKVState`` after the last token.
        """
        r, k, v = self._rkv(x, x_prev)                          # (B, T, A) each
        w, u = self._wu(k.dtype)
        y, state = wkv(w, u, k, v, state, impl=impl)            # (B, T, A)
        return self.output(torch.sigmoid(r) * y.to(x.dtype)), state

    def step(self, x: Tensor, x_prev: Tensor, state: WKVState):
        """RNN mode. Args: x, x_prev (B, C); state before this token.

        Returns:
            out (B, C) and the ``WKVState`` after this token.
        """
        r, k, v = self._rkv(x, x_prev)                          # (B, A) each
        w, u = self._wu(k.dtype)
        y, state = wkv_step(w, u, k, v, state)                  # (B, A)
        return self.output(torch.sigmoid(r) * y.to(x.dtype)), state


class ChannelMixing(nn.Module):
    """``ffn``: ``out = σ(W'_r x_r) ⊙ W'_v relu(W'_k x_k)²`` (squared-ReLU MLP with a gate)."""

    def __init__(self, config: RWKVConfig):
        super().__init__()
        C, F_ = config.n_embd, config.dim_ffn
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = Linear(C, F_)
        self.receptance = Linear(C, C)
        self.value = Linear(F_, C)

    def forward(self, x: Tensor, x_prev: Tensor) -> Tensor:
        """Both modes. Args: x, x_prev (..., C). Returns: (..., C)."""
        xk, xr = mixes(x, x_prev, self.time_mix_k, self.time_mix_r)
        k = relu_square(self.key(xk))                                         # (..., F)
        return torch.sigmoid(self.receptance(xr)) * self.value(k)             # (..., C)


class Block(nn.Module):
    """One layer: ``x += att(ln1(x))`` then ``x += ffn(ln2(x))`` (block 0 first applies ln0)."""

    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(config.n_embd)
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.att = TimeMixing(config)
        self.ffn = ChannelMixing(config)

    def forward(self, x: Tensor, state: LayerState, impl: str):
        """GPT mode. Args: x (B, T, C); this layer's state. Returns: x (B, T, C), new state."""
        if self.layer_id == 0:
            x = self.ln0(x)
        xa = self.ln1(x)                                                     # (B, T, C)
        out, wkv_state = self.att(xa, token_shift(xa, state.att_x), state.wkv, impl)
        x = x + out
        xf = self.ln2(x)                                                     # (B, T, C)
        x = x + self.ffn(xf, token_shift(xf, state.ffn_x))
        return x, LayerState(xa[:, -1], wkv_state, xf[:, -1])

    def step(self, x: Tensor, state: LayerState):
        """RNN mode. Args: x (B, C); this layer's state. Returns: x (B, C), new state.

        Inference on the CPU runs these lines as one compiled call instead
        (``_kernel_step``, held to this code by tests/test_rnn_kernel.py)."""
        if self.layer_id == 0:
            x = self.ln0(x)
        if self._kernel_applies(x):
            return self._kernel_step(x, state)
        xa = self.ln1(x)                                                     # (B, C)
        out, wkv_state = self.att.step(xa, state.att_x, state.wkv)
        x = x + out
        xf = self.ln2(x)                                                     # (B, C)
        x = x + self.ffn(xf, state.ffn_x)
        return x, LayerState(xa, wkv_state, xf)

    # ------------------------------------------------------------------------- the rnn kernel

    def _kernel_tensors(self) -> tuple[list[Tensor], list[Tensor]]:
        """The nine (C,) vectors and seven matrices, in ``kernel.block_step``'s order."""
        att, ffn = self.att, self.ffn
        params = [self.ln1.weight, self.ln1.bias, self.ln2.weight, self.ln2.bias,
                  att.time_mix_k, att.time_mix_v, att.time_mix_r, ffn.time_mix_k, ffn.time_mix_r]
        matrices = [att.receptance.weight, att.key.weight, att.value.weight, att.output.weight,
                    ffn.key.weight, ffn.receptance.weight, ffn.value.weight]
        return params, matrices

    def _kernel_applies(self, x: Tensor) -> bool:
        """Whether ``_kernel_step`` can stand in for the lines of ``step``: as
        ``kernel.rnn_applies``, and every parameter in one dtype, row-major."""
        params, matrices = self._kernel_tensors()
        dtype = matrices[0].dtype
        return (self.ln1.eps == self.ln2.eps
                and all(t.dtype == dtype and t.is_contiguous() for t in (*params, *matrices))
                and kernel.rnn_applies(x, matrices[0]))

    def _kernel_step(self, x: Tensor, state: LayerState):
        """``step`` after ``ln0`` by ``kernel.block_step``: x (B, C) and the new state, with
        x, att_x, ffn_x in x's dtype and the WKV state in float32, as ``step`` returns them."""
        params, matrices = self._kernel_tensors()
        f32 = [t.to(torch.float32).contiguous() for t in state.tensors()]
        x_out, att_x, a, b, p, ffn_x = kernel.block_step(
            x.to(torch.float32).contiguous(), *f32, [t.reshape(-1) for t in params], matrices,
            self.att.time_decay.float().exp(), self.att.time_first.float(), self.ln1.eps)
        dtype = x.dtype
        return x_out.to(dtype), LayerState.from_tensors(att_x.to(dtype), a, b, p, ffn_x.to(dtype))


# ----------------------------------------------------------------------------- init


def init_time_params(layer_id: int, n_layer: int, n_embd: int, dim_att: int) -> dict:
    """The official initial values of one block's decay, bonus and mixes (book/design.md,
    section "The initialisation").

    ``r01 = i/(L-1)`` (0 for one layer), ``r1a0 = 1 - i/L``, ``d[j] = j/C``;
    ``time_decay[j] = -5 + 8 (j/(A-1))^(0.7 + 1.3 r01)``, ``time_first[j] = ln 0.3 + 0.5((j+1)
    mod 3 - 1)``, mixes ``d^r1a0`` (v: ``+ 0.3 r01``; att r: ``d^(r1a0/2)``).

    Returns:
        {checkpoint name after ``blocks.i.``: tensor}, time_decay/time_first (A,), mixes (1, 1, C).
    """
    r01 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0
    r1a0 = 1.0 - layer_id / n_layer
    d = (torch.arange(n_embd, dtype=torch.float64) / n_embd).view(1, 1, n_embd)
    j = torch.arange(dim_att, dtype=torch.float64)
    decay = -5 + 8 * (j / max(dim_att - 1, 1)) ** (0.7 + 1.3 * r01)
    first = math.log(0.3) + 0.5 * ((j + 1) % 3 - 1)
    values = {
        "att.time_decay": decay, "att.time_first": first,
        "att.time_mix_k": d ** r1a0, "att.time_mix_v": d ** r1a0 + 0.3 * r01,
        "att.time_mix_r": d ** (0.5 * r1a0),
        "ffn.time_mix_k": d ** r1a0, "ffn.time_mix_r": d ** r1a0,
    }
    return {name: value.float() for name, value in values.items()}


# Matrices that start at zero, so that every block starts as the identity on the residual.
ZERO_INIT = ("att.key", "att.receptance", "att.output", "ffn.value", "ffn.receptance")


def matrix_gain(out_features: int, in_features: int) -> float:
    """The orthogonal-init gain of a (out, in) matrix: sqrt(out/in) if out > in, else 1."""
    return math.sqrt(out_features / in_features) if out_features > in_features else 1.0


# ----------------------------------------------------------------------------- the model


class RWKV(nn.Module):
    """RWKV-4: GPT mode ``model(idx, state)`` and RNN mode ``model.step(token, state)``.

        model = RWKV(RWKVConfig(vocab_size=65, n_layer=4, n_embd=256))
        logits, state = model(idx)                   # idx (B, T) -> logits (B, T, V)
        logits, state = model.step(idx[:, -1], state)   # token (B,) -> logits (B, V)
    """

    def __init__(self, config: RWKVConfig):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.n_embd)
        self.head = Linear(config.n_embd, config.vocab_size)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation (book/design.md, section "The initialisation"); uses
        the global torch RNG."""
        L = self.config.n_layer
        for name, module in self.named_modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear) and name != "head":
                if name.endswith(ZERO_INIT):
                    nn.init.zeros_(module.weight)
                else:
                    nn.init.orthogonal_(module.weight, gain=matrix_gain(*module.weight.shape))
        for i, block in enumerate(self.blocks):
            for name, value in init_time_params(i, L, self.config.n_embd,
                                                self.config.dim_att).items():
                block.get_parameter(name).copy_(value)
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        nn.init.orthogonal_(self.head.weight, gain=0.5 * matrix_gain(*self.head.weight.shape))

    def num_params(self, non_embedding: bool = False) -> int:
        """The number of parameters (without ``emb`` when ``non_embedding``)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.emb.weight.numel() if non_embedding else n

    def empty_state(self, batch: int) -> RWKVState:
        """The state before the first token, on the model's device and in its dtype."""
        c, p = self.config, self.emb.weight
        return RWKVState.empty(c.n_layer, c.n_embd, c.dim_att, batch, p.dtype, p.device)

    # ------------------------------------------------------------------------- the two modes

    def forward(self, idx: Tensor, state: RWKVState | None = None):
        """GPT mode: all tokens at once, continuing from ``state`` (None: the empty state).

        Args:
            idx: (B, T) integer token ids in [0, vocab_size).
            state: ``RWKVState`` of batch size B, or None.
        Returns:
            logits (B, T, V) and the ``RWKVState`` after the last token.
        """
        self.check_tokens(idx, "idx", "(B, T)")
        state = self._check_state(state, idx.shape[0])
        x = self.emb(idx)                                                   # (B, T, C)
        layers = []
        for block, layer_state in zip(self.blocks, state.layers):
            x, layer_state = block(x, layer_state, self.config.wkv_impl)
            layers.append(layer_state)
        logits = self.head(self.ln_out(x))                                  # (B, T, V)
        return logits, RWKVState(tuple(layers))

    def step(self, token: Tensor, state: RWKVState | None = None):
        """RNN mode: one token per row, continuing from ``state`` (None: the empty state).

        For inference wrap the loop in ``torch.no_grad()`` (``generate`` does), or every step
        stays in the autograd graph.

        Args:
            token: (B,) integer token ids.  state: ``RWKVState`` of batch size B, or None.
        Returns:
            logits (B, V) and the ``RWKVState`` after this token.
        """
        self.check_tokens(token, "token", "(B,)")
        state = self._check_state(state, token.shape[0])
        x = self.emb(token)                                                 # (B, C)
        layers = []
        for block, layer_state in zip(self.blocks, state.layers):
            x, layer_state = block.step(x, layer_state)
            layers.append(layer_state)
        logits = self.head(self.ln_out(x))                                  # (B, V)
        return logits, RWKVState(tuple(layers))

    # ------------------------------------------------------------------------- checks

    def check_tokens(self, idx: Tensor, name: str, shape: str) -> None:
        """``ValueError`` unless idx holds token ids of this model in the given shape (see
        ``rwkv_ref.tokenizer.check_token_ids``)."""
        check_token_ids(idx, self.config.vocab_size, name, shape)

    def _check_state(self, state: RWKVState | None, batch: int) -> RWKVState:
        """The empty state for None; else ``ValueError`` unless ``state`` fits this model."""
        if state is None:
            return self.empty_state(batch)
        if not isinstance(state, RWKVState):
            raise ValueError(f"state must be an RWKVState, got {type(state).__name__}")
        if state.n_layer != self.config.n_layer:
            raise ValueError(f"state has {state.n_layer} layers but the model has "
                             f"{self.config.n_layer}")
        C, A = self.config.n_embd, self.config.dim_att
        for i, layer in enumerate(state.layers):
            for part, t, width in (("att_x", layer.att_x, C), ("ffn_x", layer.ffn_x, C),
                                   ("wkv.a", layer.wkv.a, A), ("wkv.b", layer.wkv.b, A),
                                   ("wkv.p", layer.wkv.p, A)):
                if t.shape != (batch, width):
                    raise ValueError(f"state.layers[{i}].{part} has shape {tuple(t.shape)}, "
                                     f"expected (batch size, width) = ({batch}, {width})")
        return state

    # ------------------------------------------------------------------------- generation
    # rwkv_ref.sampling's functions take the model first, so they serve as methods as they are.

    generate = sampling.generate
    stream = sampling.stream


# ----------------------------------------------------------------------------- self-check


def _rnn_self_check(device) -> str | None:
    """The rnn kernel against the code it stands in for, on a small random block: ``matvec``
    against ``F.linear`` and ``Block._kernel_step`` against the Python lines of ``Block.step``,
    for float32 and bfloat16 weights. ``rwkv_ref.kernel`` runs it once before first use.

    Returns:
        None if all agree to 1e-4 relative to max(1, the largest value), else what differed.
    """
    g = torch.Generator().manual_seed(0)                  # never the global RNG
    B, C, A, F_ = 3, 40, 24, 72
    block = Block(RWKVConfig(vocab_size=2, n_layer=2, n_embd=C, dim_att=A, dim_ffn=F_), 1)
    with torch.no_grad():
        for name, p in block.named_parameters():
            z = torch.randn(p.shape, generator=g)
            p.copy_(z / math.sqrt(p.shape[1]) if p.dim() == 2 else
                    torch.rand(p.shape, generator=g) if "time_mix" in name else
                    1 + 0.2 * z if name.endswith("ln1.weight") or name.endswith("ln2.weight")
                    else z)
    x, att_x, ffn_x = (torch.randn(B, C, generator=g) for _ in range(3))
    wkv_state = WKVState(torch.randn(B, A, generator=g), torch.rand(B, A, generator=g) + 0.5,
                         torch.randn(B, A, generator=g))
    state = LayerState(att_x, wkv_state, ffn_x)
    for dtype in (torch.float32, torch.bfloat16):
        low = copy.deepcopy(block).to(dtype)
        exact = copy.deepcopy(low).float()       # the same (rounded) weights, in float32
        pairs = [("matvec", kernel.matvec(x, low.att.key.weight),
                  F.linear(x, exact.att.key.weight))]
        with torch.no_grad():
            got_x, got = low._kernel_step(x, state)
            kernel.RNN_KERNEL, was = False, kernel.RNN_KERNEL
            try:
                want_x, want = exact.step(x, state)
            finally:
                kernel.RNN_KERNEL = was
        pairs += [("block_step x", got_x, want_x)]
        pairs += [(f"block_step state {i}", a, b)
                  for i, (a, b) in enumerate(zip(got.tensors(), want.tensors()))]
        for what, a, b in pairs:
            err = (a - b).abs().max().item()
            scale = max(1.0, b.abs().max().item())
            if not err <= 1e-4 * scale:                       # NaN fails too
                return f"{what}, {dtype} weights: max error {err:.3g} > 1e-4 * {scale:.3g}"
    return None


kernel.register_check("rnn", _rnn_self_check)
