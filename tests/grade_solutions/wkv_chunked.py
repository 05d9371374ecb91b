# EXERCISE wkv_chunked: GPT mode, chunk by chunk as a masked softmax, the state carried along
import torch

from rwkv_ref.wkv import WKVState


def wkv_chunked(w, u, k, v, state, chunk):
    """Args: w, u (C,); k, v (B, T, C); state a WKVState; chunk L. Returns: y (B, T, C), state."""
    ys = []
    for start in range(0, k.shape[1], chunk):
        kc, vc = k[:, start:start + chunk], v[:, start:start + chunk]   # (B, L, C)
        ### BEGIN SOLUTION hint: score i < t by k_i - (t-1-i)w, t by u+k_t, the state by p - t w
        L = kc.shape[1]
        pos = torch.arange(L, dtype=k.dtype)
        gap = pos[:, None] - pos[None, :]                                # (L, L): t - i
        score = kc[:, None] - (gap - 1)[None, :, :, None] * w            # (B, L, L, C)
        score = torch.where((gap == 0)[None, :, :, None], (u + kc)[:, None], score)
        score = score.masked_fill((gap < 0)[None, :, :, None], float("-inf"))
        past = state.p[:, None] - pos[None, :, None] * w                 # (B, L, C)
        top = torch.maximum(score.amax(dim=2), past)                     # (B, L, C)
        weight, carry = torch.exp(score - top[:, :, None]), torch.exp(past - top)
        num = (weight * vc[:, None]).sum(dim=2) + carry * state.a[:, None]
        den = weight.sum(dim=2) + carry * state.b[:, None]
        ys.append(num / den)
        aged = torch.cat([kc - (L - 1 - pos)[None, :, None] * w,         # (B, L + 1, C)
                          (state.p - L * w)[:, None]], dim=1)
        top = aged.amax(dim=1)                                           # (B, C)
        e = torch.exp(aged - top[:, None])
        state = WKVState((e[:, :L] * vc).sum(dim=1) + e[:, L] * state.a,
                         e[:, :L].sum(dim=1) + e[:, L] * state.b, top)
        ### END SOLUTION
    return torch.cat(ys, dim=1), state
