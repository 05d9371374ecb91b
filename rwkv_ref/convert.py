"""Weights and states from elsewhere: official RWKV-4 checkpoints and transformers' RWKV.

Official (BlinkDL) checkpoints use exactly our parameter names, so loading is by name: the
config is read off the shapes, and anything that is not an RWKV-4 state dict is refused with
the offending keys named. transformers' ``RwkvForCausalLM`` uses other names (``hf_name``
maps ours to theirs) and the same stored ``time_decay`` (its kernel, like the official one,
uses ``-exp(time_decay)``; we use the positive rate ``exp(time_decay)``: the same decay).

States, for comparisons across implementations (batch is the leading dim in ours):

- official ``rwkv`` package: a flat list, per layer ``[att_x, a, b, p, ffn_x]``, each (C,),
  one sequence only;
- transformers: five tensors (B, C, n_layer): ``[ffn_x, att_x, a, b, p]``.
"""
from __future__ import annotations

import contextlib
import re

import torch
from torch import Tensor

from rwkv_ref.files import load_torch, save_torch
from rwkv_ref.model import RWKV, RWKVConfig
from rwkv_ref.state import LayerState, RWKVState

# Name fragments that only later RWKV versions have (5: ln_x, gate; 6: time_maa, time_faaaa;
# 7: w0/a0/v0/g1, k_k, r_k, x_r ...): their presence names the version we refuse.
LATER_VERSION_KEYS = re.compile(
    r"att\.(time_faaaa|ln_x|gate|time_maa|time_decay_w|w[012]|a[012]|v[012]|g[12]|k_k|k_a|r_k"
    r"|x_[rwkvag])|ffn\.(time_maa|x_k)")


# ----------------------------------------------------------------------------- official


def meta_model(config: RWKVConfig) -> RWKV:
    """An RWKV with parameters on the meta device: shapes and names, no memory, no init."""
    with torch.device("meta"):
        return RWKV(config)


def load_state_dict_file(path) -> dict:
    """An official .pth read safely (``weights_only=True``) onto the CPU; ``FileProblem``
    (one line) for a missing, truncated or foreign file."""
    return load_torch(path, "checkpoint")


def infer_config(state_dict: dict, **overrides) -> RWKVConfig:
    """The ``RWKVConfig`` of an official RWKV-4 state dict, read off its shapes.

    Args:
        state_dict: {official name: tensor}.  overrides: other ``RWKVConfig`` fields
            (``ctx_len``, ``wkv_impl``).
    Returns:
        ``RWKVConfig`` with vocab_size, n_layer, n_embd, dim_att, dim_ffn from the shapes.
    """
    later = sorted(k for k in state_dict if LATER_VERSION_KEYS.search(k))
    if later:
        raise ValueError(f"not an RWKV-4 checkpoint: keys {later[:6]} belong to RWKV-5/6/7; "
                         "rwkv_ref implements RWKV-4 only")
    needed = ["emb.weight", "blocks.0.att.key.weight", "blocks.0.ffn.key.weight"]
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise ValueError(f"not an RWKV-4 checkpoint: missing keys {missing}")
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    vocab_size, n_embd = state_dict["emb.weight"].shape
    sizes = dict(vocab_size=vocab_size, n_layer=max(layers) + 1, n_embd=n_embd,
                 dim_att=state_dict["blocks.0.att.key.weight"].shape[0],
                 dim_ffn=state_dict["blocks.0.ffn.key.weight"].shape[0])
    return RWKVConfig(**{**sizes, **overrides})


def check_state_dict(state_dict: dict, config: RWKVConfig) -> None:
    """Raise ``ValueError`` naming every missing, unexpected or misshapen key."""
    expected = {k: v.shape for k, v in meta_model(config).state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"state dict does not fit RWKV-4 {config}: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    wrong = [f"{k}: {tuple(state_dict[k].shape)} (expected {tuple(s)})"
             for k, s in expected.items() if state_dict[k].shape != s]
    if wrong:
        raise ValueError(f"state dict has tensors of the wrong shape: {wrong}")


def from_blinkdl(path_or_state_dict, dtype: torch.dtype = torch.float32,
                 **config_overrides) -> RWKV:
    """Load an official RWKV-4 checkpoint (any size; fp32/fp16/bf16 storage) by name.

    Args:
        path_or_state_dict: a .pth path or the loaded state dict.
        dtype: dtype of the model's parameters (storage is converted).
        config_overrides: ``RWKVConfig`` fields not in the shapes (``ctx_len``, ``wkv_impl``).
    Returns:
        An ``RWKV`` on the CPU.
    """
    sd = path_or_state_dict
    given = isinstance(sd, dict)                   # then copy: the caller keeps its tensors
    if not given:
        sd = load_state_dict_file(sd)
    if "model" in sd and isinstance(sd["model"], dict):
        raise ValueError("this is an rwkv_ref training checkpoint ('model', 'model_config' ...), "
                         "not an official state dict: use rwkv_ref.checkpoint.load_checkpoint")
    non_tensors = sorted(k for k, v in sd.items() if not isinstance(v, Tensor))
    if non_tensors:
        raise ValueError(f"not a state dict: entries {non_tensors[:6]} are not tensors")
    return model_from_state_dict(sd, infer_config(sd, **config_overrides), dtype, copy=given)


def model_from_state_dict(state_dict: dict, config: RWKVConfig,
                          dtype: torch.dtype = torch.float32, copy: bool = True) -> RWKV:
    """An ``RWKV`` of ``config`` holding ``state_dict`` (checked first; converted to ``dtype``).

    The model is built on the meta device and takes the tensors over (copies if ``copy``, else
    shares storage where the dtype already fits): no initialisation runs.
    """
    check_state_dict(state_dict, config)
    model = meta_model(config)
    model.load_state_dict({k: v.to(dtype, copy=copy).contiguous() for k, v in state_dict.items()},
                          strict=True, assign=True)
    return model


def save_blinkdl(model: RWKV, path, dtype: torch.dtype | None = None) -> None:
    """Write ``model``'s weights as an official RWKV-4 .pth (a flat {name: tensor} dict).

    Args:
        model: an ``RWKV``.  path: file to write (the official loader wants a .pth suffix).
        dtype: storage dtype (None keeps the parameters' dtype).
    """
    # row-major (.contiguous()), as the official loader expects, whatever the layout in memory
    sd = {k: v.detach().to("cpu", dtype or v.dtype).contiguous()
          for k, v in model.state_dict().items()}
    save_torch(sd, path)


# ----------------------------------------------------------------------------- transformers


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("converting to or from transformers' RwkvForCausalLM needs the "
                          "transformers package: pip install transformers") from e
    return transformers


def hf_name(name: str) -> str:
    """transformers' name of one of our (official) parameter names.

    E.g. ``blocks.3.att.time_mix_k`` → ``rwkv.blocks.3.attention.time_mix_key``.
    """
    if name == "head.weight":
        return name
    if name == "emb.weight":
        return "rwkv.embeddings.weight"
    name = name.replace(".ln0.", ".pre_ln.").replace(".att.", ".attention.")
    name = name.replace(".ffn.", ".feed_forward.")
    for short, long in (("_k", "_key"), ("_v", "_value"), ("_r", "_receptance")):
        name = re.sub(rf"time_mix{short}$", f"time_mix{long}", name)
    return "rwkv." + name


def _undo_hf_rescale(sd: dict, hf_model, n_layer: int) -> dict:
    """transformers divides att.output and ffn.value by 2^(i // rescale_every) in place for
    inference; multiply back to the trained weights."""
    every = hf_model.config.rescale_every
    if not getattr(hf_model.rwkv, "layers_are_rescaled", False) or every <= 0:
        return sd
    for i in range(n_layer):
        for name in (f"blocks.{i}.att.output.weight", f"blocks.{i}.ffn.value.weight"):
            sd[name] = sd[name] * 2 ** (i // every)
    return sd


def from_hf(hf_model, **config_overrides) -> RWKV:
    """Our ``RWKV`` with the weights of a transformers ``RwkvForCausalLM``.

    Args:
        hf_model: ``transformers.RwkvForCausalLM`` (any rescale_every; rescaled weights are
            restored).  config_overrides: ``ctx_len``, ``wkv_impl``.
    Returns:
        An ``RWKV`` on the CPU in the dtype of the transformers weights.
    """
    _import_transformers()
    c = hf_model.config
    config = RWKVConfig(vocab_size=c.vocab_size, n_layer=c.num_hidden_layers,
                        n_embd=c.hidden_size, dim_att=c.attention_hidden_size,
                        dim_ffn=c.intermediate_size,
                        **{"ctx_len": c.context_length, **config_overrides})
    theirs = {k: v.detach().cpu() for k, v in hf_model.state_dict().items()}
    ours = {name: hf_name(name) for name in meta_model(config).state_dict()}
    missing = sorted(h for h in ours.values() if h not in theirs)
    unexpected = sorted(set(theirs) - set(ours.values()))
    if missing or unexpected:
        raise ValueError(f"transformers model does not fit RWKV-4 {config}: missing keys "
                         f"{missing}, unexpected keys {unexpected}")
    sd = _undo_hf_rescale({name: theirs[h] for name, h in ours.items()}, hf_model,
                          config.n_layer)
    return model_from_state_dict(sd, config, dtype=sd["emb.weight"].dtype, copy=True)


def to_hf(model: RWKV, rescale_every: int = 0):
    """A transformers ``RwkvForCausalLM`` (eval mode) with ``model``'s weights.

    Args:
        model: an ``RWKV`` with ``dim_att == n_embd`` (transformers keeps its WKV state at
            the hidden size).  rescale_every: transformers' fp16 trick; 0 (off) computes
            exactly what we compute.
    Returns:
        ``transformers.RwkvForCausalLM`` on the CPU.
    """
    transformers = _import_transformers()
    c = model.config
    if c.dim_att != c.n_embd:
        raise ValueError(f"transformers' RWKV needs dim_att == n_embd, got {c.dim_att} and "
                         f"{c.n_embd}")
    hf_config = transformers.RwkvConfig(
        vocab_size=c.vocab_size, context_length=c.ctx_len, hidden_size=c.n_embd,
        num_hidden_layers=c.n_layer, attention_hidden_size=c.dim_att,
        intermediate_size=c.dim_ffn, rescale_every=rescale_every, tie_word_embeddings=False)
    # Skip transformers' own initialisation: it is overwritten anyway, it is slow for big
    # vocabularies, and it divides by n_layer - 1 (fails for one layer).
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        hf_model = transformers.RwkvForCausalLM(hf_config)
    sd = {hf_name(k): v.detach().cpu() for k, v in model.state_dict().items()}
    hf_model.load_state_dict(sd, strict=True)
    return hf_model.to(model.emb.weight.dtype).eval()


# ----------------------------------------------------------------------------- states


def state_to_blinkdl(state: RWKVState) -> list[Tensor]:
    """Our state (batch 1) as the official package's flat list ``[att_x, a, b, p, ffn_x] * L``."""
    if state.batch_size != 1:
        raise ValueError(f"the official package runs one sequence: batch size 1, got "
                         f"{state.batch_size}")
    return [t[0].clone() for layer in state.layers for t in layer.tensors()]


def state_from_blinkdl(flat: list[Tensor]) -> RWKVState:
    """The official package's state list as our ``RWKVState`` of batch size 1."""
    if len(flat) % 5:
        raise ValueError(f"an RWKV-4 official state has 5 tensors per layer, got {len(flat)}")
    layers = [LayerState.from_tensors(*(t.unsqueeze(0).clone() for t in flat[i:i + 5]))
              for i in range(0, len(flat), 5)]
    return RWKVState(tuple(layers))


def state_to_hf(state: RWKVState) -> list[Tensor]:
    """Our state as transformers' five (B, C, L) tensors ``[ffn_x, att_x, a, b, p]``."""
    def gather(pick):
        return torch.stack([pick(layer) for layer in state.layers], dim=-1).contiguous()

    return [gather(lambda s: s.ffn_x), gather(lambda s: s.att_x), gather(lambda s: s.wkv.a),
            gather(lambda s: s.wkv.b), gather(lambda s: s.wkv.p)]


def state_from_hf(hf_state: list[Tensor]) -> RWKVState:
    """transformers' five (B, C, L) state tensors as our ``RWKVState``."""
    ffn_x, att_x, a, b, p = hf_state
    layers = [LayerState.from_tensors(att_x[..., i], a[..., i], b[..., i], p[..., i],
                                      ffn_x[..., i]) for i in range(ffn_x.shape[-1])]
    return RWKVState(tuple(layer.map(lambda t: t.clone()) for layer in layers))
