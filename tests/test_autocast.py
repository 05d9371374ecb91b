"""WKV under autocast: every variant sums in float32 whatever the autocast state (bf16
autocast once ran naive's and parallel's products in bf16, a 2e-3 relative error), and a
bf16-autocast training step of a tiny RWKV works on the CPU and stays near float32's."""
import contextlib

import pytest
import torch

import rwkv_ref
from rwkv_ref import RWKVConfig
from rwkv_ref.recipe import forward_backward
from rwkv_ref.testing import random_model

from test_kernel import make_inputs, require_kernel

IMPLS = ["naive", "logspace", "recurrent", "parallel", "cpp"]


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
def test_every_variant_ignores_autocast(impl):
    """Outputs, state and gradients under bf16 autocast equal those outside it (float32)."""
    if impl == "cpp":
        require_kernel("cpp")
    w, u, k, v, state = make_inputs(2, 40, 24, 2.0, 7, torch.float32, "previous")

    def run(autocast):
        leaves = [x.clone().requires_grad_() for x in (w, u, k, v)]
        with autocast:
            y, out = rwkv_ref.wkv(*leaves, state, impl=impl)
        (y.square().sum() + out.a.sum()).backward()      # outside, as recipe.forward_backward
        return [y, *out, *(x.grad for x in leaves)]

    want = run(contextlib.nullcontext())
    got = run(bf16_autocast())
    for name, a, b in zip(["y", "a", "b", "p", "gw", "gu", "gk", "gv"], got, want):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("impl", ["parallel", "cpp"])
def test_a_bf16_autocast_training_step_works_and_is_near_float32(impl):
    if impl == "cpp":
        require_kernel("cpp")
    cfg = RWKVConfig(vocab_size=13, n_layer=2, n_embd=32, wkv_impl=impl)
    model = random_model(cfg, seed=2)
    g = torch.Generator().manual_seed(3)
    x, y = (torch.randint(0, 13, (3, 17), generator=g) for _ in range(2))

    def step(autocast):
        model.zero_grad(set_to_none=True)
        loss, _ = forward_backward(model, x, y, 0.0, autocast)
        return loss, torch.cat([p.grad.flatten() for p in model.parameters()])

    loss32, grad32 = step(contextlib.nullcontext)
    loss16, grad16 = step(bf16_autocast)
    assert torch.isfinite(grad16).all()
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=0)      # bf16: ~3 digits
    cosine = torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)
    assert cosine > 0.99, f"gradient direction under autocast: cosine {cosine:.4f}"
