# EXERCISE stable_step: one token with a running maximum: the stable read and the stable write
import torch


def stable_step(w, u, k_t, v_t, a, b, p):
    """One token. Args: w, u (C,); k_t, v_t, a, b, p (B, C). Returns: y_t, a, b, p (B, C)."""
    ### BEGIN SOLUTION hint: before adding two scaled terms, rescale both by e^{-(larger exponent)}
    top = torch.maximum(p, u + k_t)                         # read: state vs bonus-ed token
    old, new = torch.exp(p - top), torch.exp(u + k_t - top)
    y_t = (old * a + new * v_t) / (old * b + new)
    top = torch.maximum(p - w, k_t)                         # write: decayed state vs token
    old, new = torch.exp(p - w - top), torch.exp(k_t - top)
    a, b, p = old * a + new * v_t, old * b + new, top
    ### END SOLUTION
    return y_t, a, b, p
