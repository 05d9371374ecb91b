"""Sampling: next-token distributions, and generation for any model with an RNN-style step.

    tokens = generate(model, prompt_ids, max_new_tokens, temperature=0.8, top_p=0.9)

A model is run once over the prompt in GPT mode, ``logits, state = model(idx)``, and then one
token at a time, ``logits, state = model.step(token, state)``. RWKV's state is its fixed-size
``RWKVState``; the GPT baseline's is the window of tokens it attends to. This module knows
neither model (both import it): ``RWKV.generate`` is this module's ``generate``.
"""
from __future__ import annotations

import torch
from torch import Tensor

# ----------------------------------------------------------------------------- sampling


def check_sampling(temperature: float, top_k: int | None, top_p: float | None,
                   greedy: bool) -> None:
    """Raise ``ValueError`` naming the first sampling argument out of its range."""
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (or pass greedy=True), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p}")


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                greedy: bool = False) -> Tensor:
    """One token per row from next-token logits.

    Greedy takes the argmax. Otherwise the logits are divided by the temperature, cut to the
    ``top_k`` largest, then to the smallest set whose probability reaches ``top_p`` (nucleus),
    and a token is drawn from what is left.

    Args:
        logits: (B, V).  generator: a ``torch.Generator`` on the logits' device, or None.
    Returns:
        (B,) int64 token ids.
    """
    if greedy:
        return logits.float().argmax(dim=-1)
    probs = next_token_probs(logits, temperature, top_k, top_p)              # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_token_probs(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None) -> Tensor:
    """The distribution ``sample_next`` draws from.

    The logits are divided by the temperature, cut to the ``top_k`` largest (None: all), then
    to the smallest most-likely set whose probability reaches ``top_p`` (None or 1: all; the
    token that crosses ``top_p`` is kept), and renormalised.

    Args:
        logits: (B, V).  temperature: > 0.  top_k: int >= 1 or None.  top_p: in (0, 1] or None.
    Returns:
        (B, V) float32 probabilities, each row summing to 1.
    """
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        values, indices = logits.topk(top_k, dim=-1)                      # (B, k)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    probs = torch.softmax(logits, dim=-1)                                 # (B, V)
    if top_p is not None and top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p     # mass of the more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)   # the first token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


# ----------------------------------------------------------------------------- generation


def _prompt_tensor(model, prompt_ids) -> tuple[Tensor, bool]:
    """The prompt as a (B, T) tensor on the model's device, and whether it was one sequence."""
    if isinstance(prompt_ids, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in prompt_ids):
            raise ValueError("prompt_ids: a list prompt must hold ints")
        prompt_ids = torch.tensor(prompt_ids, dtype=torch.long)
    if not isinstance(prompt_ids, Tensor):
        raise ValueError(f"prompt_ids must be a list of ints or a tensor, got "
                         f"{type(prompt_ids).__name__}")
    if prompt_ids.numel() == 0:
        raise ValueError("prompt_ids is empty: generation needs at least one token")
    if prompt_ids.dim() not in (1, 2):
        raise ValueError(f"prompt_ids must have shape (T,) or (B, T), got "
                         f"{tuple(prompt_ids.shape)}")
    one = prompt_ids.dim() == 1
    idx = prompt_ids.unsqueeze(0) if one else prompt_ids
    idx = idx.to(next(model.parameters()).device)
    model.check_tokens(idx, "prompt_ids", "(B, T)")
    return idx, one


def stream(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None, greedy: bool = False):
    """An iterator over sampled tokens, computed as they are taken (arguments are checked now).

    Args:
        model: an ``RWKV`` or a ``GPT`` (anything with ``model(idx)``,
            ``model.step(token, state)`` and ``model.check_tokens``).
        prompt_ids: list of ints, (T,) or (B, T) integer tensor.
        max_new_tokens: how many tokens to yield.  Sampling arguments: see ``sample_next``.
    Returns:
        An iterator yielding an int per token for a single prompt, a (B,) tensor for a batch.
    """
    idx, one = _prompt_tensor(model, prompt_ids)
    check_sampling(temperature, top_k, top_p, greedy)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                    greedy=greedy)
    return _stream(model, idx, one, max_new_tokens, sampling)


@torch.no_grad()
def _stream(model, idx: Tensor, one: bool, max_new_tokens: int, sampling: dict):
    """The loop of ``stream``: GPT mode over the prompt, then one ``step`` per new token."""
    if max_new_tokens == 0:
        return
    logits, state = model(idx)                      # (B, T, V): the whole prompt at once
    logits = logits[:, -1]                          # (B, V)
    for i in range(max_new_tokens):
        token = sample_next(logits, **sampling)     # (B,)
        yield int(token[0]) if one else token
        if i + 1 < max_new_tokens:
            logits, state = model.step(token, state)


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, greedy: bool = False,
             callback=None) -> Tensor:
    """The prompt followed by ``max_new_tokens`` sampled tokens.

    Args:
        as ``stream``; callback: called with each new token (int, or (B,) tensor) as it comes.
    Returns:
        (T + max_new_tokens,) or (B, T + max_new_tokens) int64 tensor, like the prompt.
    """
    idx, one = _prompt_tensor(model, prompt_ids)
    new = []
    for token in stream(model, idx, max_new_tokens, temperature, top_k, top_p, generator,
                        greedy):
        new.append(torch.as_tensor(token, device=idx.device).reshape(-1))   # (B,)
        if callback is not None:
            callback(int(token) if one else token)
    out = torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx
    return out[0] if one else out
