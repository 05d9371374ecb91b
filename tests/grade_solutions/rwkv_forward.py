# EXERCISE rwkv_forward: the whole model in GPT mode
from rwkv_ref.model import token_shift
from rwkv_ref.state import LayerState, RWKVState


def rwkv_forward(model, idx, state):
    """Args: model an RWKV; idx (B, T) token ids; state an RWKVState or None.

    Returns: logits (B, T, V) and the state after the last token.
    """
    ### BEGIN SOLUTION hint: emb, ln0, per block x += att(ln1 x), x += ffn(ln2 x), ln_out, head
    if state is None:
        state = model.empty_state(idx.shape[0])
    x = model.blocks[0].ln0(model.emb(idx))                            # (B, T, C)
    layers = []
    for block, layer in zip(model.blocks, state.layers):
        xa = block.ln1(x)
        out, wkv_state = block.att(xa, token_shift(xa, layer.att_x), layer.wkv,
                                   model.config.wkv_impl)
        x = x + out
        xf = block.ln2(x)
        x = x + block.ffn(xf, token_shift(xf, layer.ffn_x))
        layers.append(LayerState(xa[:, -1], wkv_state, xf[:, -1]))
    return model.head(model.ln_out(x)), RWKVState(tuple(layers))
    ### END SOLUTION
