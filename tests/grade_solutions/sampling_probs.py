# EXERCISE sampling_probs: the distribution a sampler draws from
import torch


def sampling_probs(logits, temperature, top_k, top_p):
    """Args: logits (B, V); temperature > 0; top_k int or None; top_p in (0, 1] or None.

    Returns: probs (B, V), each row summing to 1.
    """
    ### BEGIN SOLUTION hint: temperature, top_k, then keep while the mass BEFORE a token < top_p
    scaled = logits.float() / temperature
    if top_k is not None:
        kth = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]   # (B, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p is not None and top_p < 1:
        ranked, order = probs.sort(dim=-1, descending=True)
        keep_ranked = ranked.cumsum(dim=-1) - ranked < top_p
        keep = torch.zeros_like(keep_ranked).scatter(-1, order, keep_ranked)
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs
    ### END SOLUTION
