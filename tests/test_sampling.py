"""rwkv_ref.sampling.next_token_probs against the definitions it implements.

Nucleus (top-p) sampling keeps the smallest set of most likely tokens whose probability
reaches p (Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration"): the token
that crosses p is in the set. The temperature divides the logits before anything is cut, so
it changes which tokens make up the nucleus. Top-k keeps the k largest logits.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from rwkv_ref.sampling import next_token_probs


def probs_of(*p):
    """Logits (1, V) whose softmax is the given probabilities."""
    return torch.tensor([p], dtype=torch.float64).log()


@pytest.mark.parametrize("top_p, expected", [
    (0.6, [0.5 / 0.8, 0.3 / 0.8, 0.0]),     # 0.5 < 0.6: the crossing token (0.3) is kept
    (0.5, [1.0, 0.0, 0.0]),                 # 0.5 reaches 0.5: the first token alone
    (0.81, [0.5, 0.3, 0.2]),                # 0.8 < 0.81: all three
    (0.01, [1.0, 0.0, 0.0]),                # the most likely token always stays
])
def test_nucleus_keeps_the_token_that_crosses_top_p(top_p, expected):
    probs = next_token_probs(probs_of(0.5, 0.3, 0.2), top_p=top_p)
    torch.testing.assert_close(probs.double(), torch.tensor([expected], dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)


def test_temperature_is_applied_before_the_nucleus_is_cut():
    """At T = 1 the 0.5-nucleus of (0.5, 0.3, 0.2) is the first token alone; at T = 2 the
    probabilities are proportional to their square roots, (0.424, 0.328, 0.268), and the
    0.5-nucleus is the first two."""
    roots = np.sqrt([0.5, 0.3, 0.2])
    expected = [roots[0] / roots[:2].sum(), roots[1] / roots[:2].sum(), 0.0]
    probs = next_token_probs(probs_of(0.5, 0.3, 0.2), temperature=2.0, top_p=0.5)
    torch.testing.assert_close(probs.double(), torch.tensor([expected], dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)


logit_rows = hnp.arrays(np.int8, st.integers(2, 12), elements=st.integers(-40, 40),
                        fill=st.nothing()).map(lambda a: torch.tensor(a[None] / 8.0))


@given(logits=logit_rows, top_p=st.integers(1, 99).map(lambda x: x / 100),
       temperature=st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0]))
def test_nucleus_is_the_smallest_set_reaching_top_p(logits, top_p, temperature):
    probs = next_token_probs(logits, temperature=temperature, top_p=top_p)[0].double()
    full = torch.softmax(logits[0].double() / temperature, dim=-1)     # the tempered law
    kept = probs > 0
    mass = full[kept].sum()
    assert mass >= top_p - 1e-6                                         # it reaches top_p
    if (~kept).any():                                                   # the most likely
        assert full[kept].min() >= full[~kept].max() - 1e-6
    # smallest: without its least likely member the set falls short of top_p
    assert mass - full[kept].min() < top_p + 1e-6
    torch.testing.assert_close(probs[kept], full[kept] / mass, rtol=1e-5, atol=1e-6)


@given(logits=logit_rows, k=st.integers(1, 12),
       temperature=st.sampled_from([0.25, 1.0, 4.0]))
def test_top_k_keeps_the_k_most_likely_renormalised(logits, k, temperature):
    V = logits.shape[-1]
    probs = next_token_probs(logits, temperature=temperature, top_k=k)[0].double()
    full = torch.softmax(logits[0].double() / temperature, dim=-1)
    kept = probs > 0
    assert int(kept.sum()) >= min(k, V)          # ties at the k-th value may keep more
    threshold = full.sort(descending=True).values[min(k, V) - 1]
    assert bool((full[kept] >= threshold - 1e-9).all())
    torch.testing.assert_close(probs[kept], full[kept] / full[kept].sum(), rtol=1e-5,
                               atol=1e-6)
