"""The baseline: a small causal transformer (GPT-2 style) with RWKV's calling convention.

Token and learned position embeddings → N pre-LN blocks → ``ln_f`` → ``head`` (no bias, no
tying, as in RWKV). Each block: ``x = x + attn(ln_1(x))``, then ``x = x + mlp(ln_2(x))``, with
causal multi-head attention through ``F.scaled_dot_product_attention(is_causal=True)`` and a
GELU MLP of width ``dim_ffn``.

    model = GPT(GPTConfig(vocab_size=65, n_layer=4, n_embd=128, n_head=4, ctx_len=128))
    logits, window = model(idx)     # idx (B, T) → logits (B, T, V); window: the tokens seen

It trains through the same loop as RWKV (``python -m rwkv_ref.train --model=gpt``). Unlike RWKV
it has no recurrent state: what it carries from call to call is the window of the last
``ctx_len`` tokens itself, and ``step`` (one more token) reruns the whole window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from rwkv_ref import sampling
from rwkv_ref.tokenizer import check_token_ids


@dataclass
class GPTConfig:
    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    ctx_len: int          # the longest input (learned positions exist for 0 .. ctx_len-1)
    dim_ffn: int = 0      # MLP width; 0 means 4 * n_embd
    dropout: float = 0.0

    def __post_init__(self):
        if self.dim_ffn == 0:
            self.dim_ffn = 4 * self.n_embd
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd = {self.n_embd} is not a multiple of "
                             f"n_head = {self.n_head}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, C) → (B, T, C): each position attends to itself and the positions before."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)                            # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in (q, k, v))                                   # 3 x (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)                           # (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.dim_ffn, bias=False)
        self.proj = nn.Linear(cfg.dim_ffn, cfg.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))                             # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn, self.mlp = CausalSelfAttention(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))                       # (B, T, C)
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.ctx_len, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: the projections into the residual stream are scaled down by sqrt(2 n_layer)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, state: Tensor | None = None):
        """GPT mode over a window. The GPT's "state" is the window of tokens it attends to.

        Args:
            idx: (B, T) int64 token ids, T <= ctx_len.
            state: None, or (B, T0) earlier token ids (as returned here) that idx continues.
        Returns:
            logits (B, T, V) for the tokens of idx, and the new window: the last ``ctx_len``
            tokens of state followed by idx, (B, <= ctx_len).
        """
        self.check_tokens(idx, "idx", "(B, T)")
        if state is not None:
            self.check_tokens(state, "state (the GPT's window of earlier tokens)", "(B, T)")
            if state.shape[0] != idx.shape[0]:
                raise ValueError(f"state has batch size {state.shape[0]} but idx has "
                                 f"{idx.shape[0]}")
        T = idx.shape[1]
        if T > self.cfg.ctx_len:
            raise ValueError(f"GPT: input of {T} tokens, but ctx_len is {self.cfg.ctx_len}")
        window = idx if state is None else torch.cat([state, idx], dim=1)[:, -self.cfg.ctx_len:]
        pos = torch.arange(window.shape[1], device=idx.device)           # (T',)
        x = self.drop(self.wte(window) + self.wpe(pos))                  # (B, T', C)
        for block in self.blocks:
            x = block(x)                                                 # (B, T', C)
        return self.head(self.ln_f(x[:, -T:])), window                   # (B, T, V)

    def step(self, token: Tensor, state: Tensor | None = None):
        """One token per row after ``state`` (a window from ``forward``): the whole window is
        run again, as a GPT without a KV cache does. Returns: logits (B, V), the new window."""
        logits, window = self(token[:, None], state)
        return logits[:, -1], window

    def check_tokens(self, idx: Tensor, name: str, shape: str) -> None:
        """``ValueError`` unless idx holds token ids of this model in the given shape."""
        check_token_ids(idx, self.cfg.vocab_size, name, shape)

    generate = sampling.generate       # rwkv_ref.sampling: the same sampling as RWKV's
    stream = sampling.stream
