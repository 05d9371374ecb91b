# EXERCISE block_forward: one block in GPT mode, continuing from its state
import torch

from rwkv_ref.state import LayerState


def block_forward(block, x, state):
    """Args: block a Block; x (B, T, C); state a LayerState. Returns: x (B, T, C), state."""
    ### BEGIN SOLUTION hint: the token before x[:, 0] is the carried att_x (att), ffn_x (ffn)
    if block.layer_id == 0:
        x = block.ln0(x)
    xa = block.ln1(x)
    before = torch.cat([state.att_x[:, None], xa[:, :-1]], dim=1)
    out, wkv_state = block.att(xa, before, state.wkv, "logspace")
    x = x + out
    xf = block.ln2(x)
    before = torch.cat([state.ffn_x[:, None], xf[:, :-1]], dim=1)
    x = x + block.ffn(xf, before)
    return x, LayerState(xa[:, -1], wkv_state, xf[:, -1])
    ### END SOLUTION
