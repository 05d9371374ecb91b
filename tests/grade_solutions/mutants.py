"""The planted bugs of EXERCISES.md, each an edit of one correct solution in this folder.

MUTANTS[id] = (exercise, [(old, new), ...]): the mutant is the solution with each ``old``
replaced by its ``new`` (every ``old`` must occur in it).
"""

_STABLE_READ_WRITE = """\
    top = torch.maximum(p, u + k_t)                         # read: state vs bonus-ed token
    old, new = torch.exp(p - top), torch.exp(u + k_t - top)
    y_t = (old * a + new * v_t) / (old * b + new)
"""
_STABLE_WRITE = """\
    top = torch.maximum(p - w, k_t)                         # write: decayed state vs token
    old, new = torch.exp(p - w - top), torch.exp(k_t - top)
    a, b, p = old * a + new * v_t, old * b + new, top
"""
_PLAIN_EXPONENTIALS = """\
    num, den = a * torch.exp(p), b * torch.exp(p)           # plain exponentials
    y_t = (num + torch.exp(u + k_t) * v_t) / (den + torch.exp(u + k_t))
    num = torch.exp(-w) * num + torch.exp(k_t) * v_t
    den = torch.exp(-w) * den + torch.exp(k_t)
    p = torch.maximum(p - w, k_t)                           # the canonical p, computed apart
    a, b = num * torch.exp(-p), den * torch.exp(-p)
"""
_DECAY_AFTER_ADDING = """\
    top = torch.maximum(p, k_t)                             # add the token, then decay
    old, new = torch.exp(p - top), torch.exp(k_t - top)
    a, b, p = old * a + new * v_t, old * b + new, top - w
"""
_READ_THEN_WRITE = """\
    read = merge(state, WKVState(v_t, ones, u + k_t))
    written = merge(WKVState(state.a, state.b, state.p - w), WKVState(v_t, ones, k_t))
"""
_WRITE_THEN_READ = """\
    written = merge(WKVState(state.a, state.b, state.p - w), WKVState(v_t, ones, k_t))
    read = merge(written, WKVState(v_t, ones, u + k_t))
"""
_RENORMALISE = "        probs = probs / probs.sum(dim=-1, keepdim=True)\n"

MUTANTS = {
    "wkv_loops-sign_of_w": ("wkv_loops", [("exp(-(t - 1 - i) * w", "exp((t - 1 - i) * w")]),
    "wkv_loops-no_bonus": ("wkv_loops", [("exp(u + k[:, t])", "exp(k[:, t])")]),
    "wkv_loops-decay_from_t": ("wkv_loops", [("-(t - 1 - i) * w", "-(t - i) * w")]),
    "stable_step-no_rebasing": ("stable_step", [(_STABLE_READ_WRITE + _STABLE_WRITE,
                                                 _PLAIN_EXPONENTIALS)]),
    "stable_step-decay_after_adding": ("stable_step", [(_STABLE_WRITE, _DECAY_AFTER_ADDING)]),
    "merge-smaller_exponent": ("merge", [("torch.maximum(x.p, y.p)", "torch.minimum(x.p, y.p)")]),
    "wkv_step-read_after_write": ("wkv_step", [(_READ_THEN_WRITE, _WRITE_THEN_READ)]),
    "wkv_chunked-restart_each_chunk": ("wkv_chunked", [(
        "        L = kc.shape[1]\n",
        "        L = kc.shape[1]\n"
        "        state = WKVState.empty(k.shape[0], k.shape[2], dtype=k.dtype)\n")]),
    "wkv_backward-gu_without_bonus": ("wkv_backward", [("        gu += own.sum(dim=0)\n", "")]),
    "channel_mixing-relu": ("channel_mixing", [("ffn.key.weight.T) ** 2", "ffn.key.weight.T)")]),
    "time_mixing-no_sigmoid": ("time_mixing", [("(torch.sigmoid(r) * y)", "(r * y)")]),
    "block_forward-shift_ignores_state": ("block_forward", [
        ("state.att_x[:, None]", "torch.zeros_like(xa[:, :1])"),
        ("state.ffn_x[:, None]", "torch.zeros_like(xf[:, :1])")]),
    "rwkv_forward-no_ln0": ("rwkv_forward", [("model.blocks[0].ln0(model.emb(idx))",
                                               "model.emb(idx)")]),
    "sampling_probs-drops_boundary_token": ("sampling_probs", [(
        "ranked.cumsum(dim=-1) - ranked < top_p",
        "(ranked.cumsum(dim=-1) < top_p) | (torch.arange(ranked.shape[-1]) == 0)")]),
    "sampling_probs-temperature_after_top_p": ("sampling_probs", [
        ("scaled = logits.float() / temperature", "scaled = logits.float()"),
        (_RENORMALISE, _RENORMALISE
         + "    probs = torch.softmax(torch.log(probs) / temperature, dim=-1)\n")]),
}
