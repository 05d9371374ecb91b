# EXERCISE time_mixing: att in GPT mode from its parameters
import torch

from rwkv_ref.wkv import wkv


def time_mixing(att, x, x_prev, state):
    """Args: att a TimeMixing; x, x_prev (B, T, C); state a WKVState. Returns: out, state."""
    ### BEGIN SOLUTION hint: mix by time_mix_*, WKV with w = exp(time_decay), W_o(sigmoid(r) * y)
    def shifted(mu):
        mu = mu.reshape(-1)
        return x * mu + x_prev * (1 - mu)

    r = shifted(att.time_mix_r) @ att.receptance.weight.T              # (B, T, A)
    k = shifted(att.time_mix_k) @ att.key.weight.T
    v = shifted(att.time_mix_v) @ att.value.weight.T
    y, state = wkv(att.time_decay.exp(), att.time_first, k, v, state, impl="logspace")
    return (torch.sigmoid(r) * y) @ att.output.weight.T, state
    ### END SOLUTION
