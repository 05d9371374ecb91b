# EXERCISE channel_mixing: ffn from its parameters
import torch


def channel_mixing(ffn, x, x_prev):
    """Args: ffn a ChannelMixing; x, x_prev (B, T, C). Returns: out (B, T, C)."""
    ### BEGIN SOLUTION hint: a squared-ReLU MLP on the k-mix, gated by sigmoid of the r-mix
    mk, mr = ffn.time_mix_k.reshape(-1), ffn.time_mix_r.reshape(-1)
    hidden = torch.relu((x * mk + x_prev * (1 - mk)) @ ffn.key.weight.T) ** 2    # (B, T, F)
    gate = torch.sigmoid((x * mr + x_prev * (1 - mr)) @ ffn.receptance.weight.T)
    return gate * (hidden @ ffn.value.weight.T)
    ### END SOLUTION
