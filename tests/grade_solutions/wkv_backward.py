# EXERCISE wkv_backward: the gradients of WKV by hand, without autograd
import torch


def wkv_backward(w, u, k, v, gy):
    """Gradients of sum(y * gy) for y = WKV(w, u, k, v) from the empty state.

    Args: w, u (C,); k, v, gy (B, T, C). Returns: gw, gu (C,); gk, gv (B, T, C).
    """
    T = k.shape[1]
    gw, gu = torch.zeros_like(w), torch.zeros_like(u)
    gk, gv = torch.zeros_like(k), torch.zeros_like(v)
    ### BEGIN SOLUTION hint: moving one exponent moves y_s by weight/den * (v_i - y_s)
    for s in range(T):
        bonus = torch.exp(u + k[:, s])                                   # (B, C)
        past = [torch.exp(-(s - 1 - i) * w + k[:, i]) for i in range(s)]
        den = bonus + sum(past)
        y = (bonus * v[:, s] + sum(e * v[:, i] for i, e in enumerate(past))) / den
        g = gy[:, s] / den
        own = g * bonus * (v[:, s] - y)
        gu += own.sum(dim=0)
        gk[:, s] += own
        gv[:, s] += g * bonus
        for i, e in enumerate(past):
            term = g * e * (v[:, i] - y)
            gk[:, i] += term
            gv[:, i] += g * e
            gw -= (s - 1 - i) * term.sum(dim=0)
    ### END SOLUTION
    return gw, gu, gk, gv
