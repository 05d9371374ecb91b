# EXERCISE wkv_loops: eq. 14 by explicit loops over t and over the past tokens i < t
import torch


def wkv_loops(w, u, k, v):
    """WKV from the empty state. Args: w, u (C,); k, v (B, T, C). Returns: y (B, T, C)."""
    T = k.shape[1]
    y = torch.empty_like(v)
    ### BEGIN SOLUTION hint: start from the bonus term e^{u+k_t}, add e^{-(t-1-i)w+k_i} per i < t
    for t in range(T):
        num = torch.exp(u + k[:, t]) * v[:, t]             # (B, C): the current token
        den = torch.exp(u + k[:, t])
        for i in range(t):
            weight = torch.exp(-(t - 1 - i) * w + k[:, i])  # an older token, decayed
            num = num + weight * v[:, i]
            den = den + weight
        y[:, t] = num / den
    ### END SOLUTION
    return y
