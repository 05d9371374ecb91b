"""Random models for tests, benchmarks and chapters: every weight random, in the official layout.

The initialisation zeros five matrices per block, which hides bugs (a block is then the identity
on its residual); these weights exercise every product, gate and exponent.
"""
from __future__ import annotations

import math
import re

import torch

from rwkv_ref.convert import meta_model, model_from_state_dict
from rwkv_ref.model import RWKV, RWKVConfig


def random_state_dict(config: RWKVConfig, seed: int = 0, key_scale: float = 2.0) -> dict:
    """Random weights in the official layout: for parity tests and benchmarks.

    Unlike the initialisation (which zeros five matrices per block) every tensor is random:
    matrices N(0, 1/in) (att.key times ``key_scale``, so exponents spread), decays
    time_decay ~ U(-6, 1.5), bonuses N(0, 1), mixes U(0, 1), LayerNorms 1 + N(0, 0.2).

    Returns:
        {official name: float32 tensor} on the CPU.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in meta_model(config).state_dict().items():
        shape = p.shape
        if name.endswith("time_decay"):
            t = torch.rand(shape, generator=g) * 7.5 - 6.0
        elif name.endswith("time_first"):
            t = torch.randn(shape, generator=g)
        elif ".time_mix_" in name:
            t = torch.rand(shape, generator=g)
        elif re.search(r"ln(0|1|2|_out)\.weight$", name):
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.2 * torch.randn(shape, generator=g)
        elif name == "emb.weight":
            t = torch.randn(shape, generator=g)
        else:                                              # a (out, in) matrix
            scale = key_scale if name.endswith("att.key.weight") else 1.0
            t = torch.randn(shape, generator=g) * scale / math.sqrt(shape[1])
        out[name] = t
    return out


def random_model(config: RWKVConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> RWKV:
    """An ``RWKV`` with ``random_state_dict`` weights."""
    return model_from_state_dict(random_state_dict(config, seed), config, dtype, copy=False)
