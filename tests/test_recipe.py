"""rwkv_ref.recipe.forward_backward: gradient clipping by the global norm.

Clipping by global norm (Pascanu et al. 2013) rescales all gradients together by
min(1, c / ||g||), where ||g|| is the norm of all gradients concatenated: the direction is
kept, the norm becomes at most c, and the norm before clipping is returned.
"""
import pytest
import torch

from rwkv_ref import RWKVConfig
from rwkv_ref.recipe import autocast_for, forward_backward
from rwkv_ref.testing import random_model


def _grads(grad_clip):
    model = random_model(RWKVConfig(vocab_size=11, n_layer=2, n_embd=8, wkv_impl="parallel"),
                         seed=3)
    g = torch.Generator().manual_seed(4)
    x, y = (torch.randint(0, 11, (2, 6), generator=g) for _ in range(2))
    loss, norm = forward_backward(model, x, y, grad_clip, autocast_for(torch.device("cpu"),
                                                                       "float32"))
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return loss, norm, grads


@pytest.mark.parametrize("clip", [0.05, 0.3])
def test_clipping_rescales_all_gradients_to_the_global_norm(clip):
    loss0, norm0, raw = _grads(0.0)                     # 0: no clipping
    torch.testing.assert_close(norm0, raw.norm())
    assert raw.norm() > clip                            # the case where clipping acts
    loss, norm, clipped = _grads(clip)
    assert torch.equal(loss, loss0)
    torch.testing.assert_close(norm, raw.norm())        # reported: the norm BEFORE clipping
    torch.testing.assert_close(clipped.norm(), torch.tensor(clip), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(clipped, raw * (clip / raw.norm()), rtol=1e-5, atol=1e-8)


def test_clipping_leaves_small_gradients_alone():
    _, _, raw = _grads(0.0)
    _, _, same = _grads(float(raw.norm()) * 2)
    torch.testing.assert_close(same, raw)
