"""Text generation in RNN mode: the prompt through GPT mode once, then one ``step`` per token.

    python -m rwkv_ref.generate --checkpoint out/cpu/ckpt.pt --prompt "ROMEO:" --max_new_tokens 500

Each new token costs the same time and memory however long the text already is: the whole
past lives in the fixed-size state.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import Tensor

from rwkv_ref.convert import from_blinkdl, load_state_dict_file, model_from_state_dict
from rwkv_ref.model import RWKV, RWKVConfig
from rwkv_ref.tokenizer import NeoXTokenizer, tokenizer_from_dict

# ----------------------------------------------------------------------------- sampling


def check_sampling(temperature: float, top_k: int | None, top_p: float | None,
                   greedy: bool) -> None:
    """Raise ``ValueError`` naming the first sampling argument out of its range."""
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (or pass greedy=True), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p}")


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                greedy: bool = False) -> Tensor:
    """One token per row from next-token logits.

    Greedy takes the argmax. Otherwise the logits are divided by the temperature, cut to the
    ``top_k`` largest, then to the smallest set whose probability reaches ``top_p`` (nucleus),
    and a token is drawn from what is left.

    Args:
        logits: (B, V).  generator: a ``torch.Generator`` on the logits' device, or None.
    Returns:
        (B,) int64 token ids.
    """
    logits = logits.float()
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        values, indices = logits.topk(top_k, dim=-1)                      # (B, k)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    probs = torch.softmax(logits, dim=-1)                                 # (B, V)
    if top_p is not None and top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p     # mass of the more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)   # the first token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- generation


def _prompt_tensor(model: RWKV, prompt_ids) -> tuple[Tensor, bool]:
    """The prompt as a (B, T) tensor on the model's device, and whether it was one sequence."""
    if isinstance(prompt_ids, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in prompt_ids):
            raise ValueError("prompt_ids: a list prompt must hold ints")
        prompt_ids = torch.tensor(prompt_ids, dtype=torch.long)
    if not isinstance(prompt_ids, Tensor):
        raise ValueError(f"prompt_ids must be a list of ints or a tensor, got "
                         f"{type(prompt_ids).__name__}")
    if prompt_ids.numel() == 0:
        raise ValueError("prompt_ids is empty: generation needs at least one token")
    if prompt_ids.dim() not in (1, 2):
        raise ValueError(f"prompt_ids must have shape (T,) or (B, T), got "
                         f"{tuple(prompt_ids.shape)}")
    one = prompt_ids.dim() == 1
    idx = prompt_ids.unsqueeze(0) if one else prompt_ids
    idx = idx.to(model.emb.weight.device)
    model.check_tokens(idx, "prompt_ids", "(B, T)")
    return idx, one


def stream(model: RWKV, prompt_ids, max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None, greedy: bool = False):
    """An iterator over sampled tokens, computed as they are taken (arguments are checked now).

    Args:
        model: an ``RWKV``.  prompt_ids: list of ints, (T,) or (B, T) integer tensor.
        max_new_tokens: how many tokens to yield.  Sampling arguments: see ``sample_next``.
    Returns:
        An iterator yielding an int per token for a single prompt, a (B,) tensor for a batch.
    """
    idx, one = _prompt_tensor(model, prompt_ids)
    check_sampling(temperature, top_k, top_p, greedy)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                    greedy=greedy)
    return _stream(model, idx, one, max_new_tokens, sampling)


@torch.no_grad()
def _stream(model: RWKV, idx: Tensor, one: bool, max_new_tokens: int, sampling: dict):
    """The loop of ``stream``: GPT mode over the prompt, then one ``step`` per new token."""
    if max_new_tokens == 0:
        return
    logits, state = model(idx)                      # (B, T, V): the whole prompt at once
    logits = logits[:, -1]                          # (B, V)
    for i in range(max_new_tokens):
        token = sample_next(logits, **sampling)     # (B,)
        yield int(token[0]) if one else token
        if i + 1 < max_new_tokens:
            logits, state = model.step(token, state)


def generate(model: RWKV, prompt_ids, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, greedy: bool = False,
             callback=None) -> Tensor:
    """The prompt followed by ``max_new_tokens`` sampled tokens.

    Args:
        as ``stream``; callback: called with each new token (int, or (B,) tensor) as it comes.
    Returns:
        (T + max_new_tokens,) or (B, T + max_new_tokens) int64 tensor, like the prompt.
    """
    idx, one = _prompt_tensor(model, prompt_ids)
    new = []
    for token in stream(model, idx, max_new_tokens, temperature, top_k, top_p, generator,
                        greedy):
        new.append(torch.as_tensor(token, device=idx.device).reshape(-1))   # (B,)
        if callback is not None:
            callback(int(token) if one else token)
    out = torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx
    return out[0] if one else out


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_KEYS = ("model", "model_config", "tokenizer")


def load_checkpoint(path, tokenizer_path=None, device="cpu", **config_overrides):
    """A model and its tokenizer from a training checkpoint or an official RWKV-4 .pth.

    A training checkpoint is a dict with ``"model"`` (state dict in official names),
    ``"model_config"`` (``RWKVConfig`` fields) and ``"tokenizer"`` (``CharTokenizer.to_dict()``).
    An official .pth needs ``tokenizer_path`` (GPT-NeoX's ``20B_tokenizer.json``).

    Args:
        path: the file.  tokenizer_path: a 20B_tokenizer.json (used instead of the stored one).
        device: where the model goes.  config_overrides: e.g. ``wkv_impl``.
    Returns:
        (model in eval mode, tokenizer).
    """
    ckpt = load_state_dict_file(path)
    if "emb.weight" in ckpt:                                    # official layout
        if tokenizer_path is None:
            raise ValueError(f"{path} is an official RWKV-4 checkpoint, which has no tokenizer "
                             "inside: pass --tokenizer path/to/20B_tokenizer.json")
        model = from_blinkdl(ckpt, **config_overrides)
    else:
        if ckpt.get("model_type", "rwkv") != "rwkv":
            raise ValueError(f"checkpoint {path} holds a {ckpt['model_type']!r} model; "
                             "rwkv_ref.generate samples from RWKV checkpoints only")
        missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
        if missing:
            raise ValueError(f"checkpoint {path} lacks keys {missing} (has {sorted(ckpt)[:10]})")
        fields = set(RWKVConfig.__dataclass_fields__)
        unknown = sorted(set(ckpt["model_config"]) - fields)
        if unknown:
            raise ValueError(f"checkpoint {path}: model_config has unknown fields {unknown}")
        config = RWKVConfig(**{**ckpt["model_config"], **config_overrides})
        # a model trained under torch.compile saves its parameters under "_orig_mod."
        sd = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
        model = model_from_state_dict(sd, config, copy=False)
    if tokenizer_path is not None:
        tokenizer = NeoXTokenizer(tokenizer_path)
    else:
        tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}")
    return model.to(device).eval(), tokenizer


# ----------------------------------------------------------------------------- command line


class TextPrinter:
    """Print decoded text as tokens arrive, holding back a split multi-byte character."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.ids, self.printed = [], 0

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):                 # U+FFFD: an incomplete byte sequence
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rwkv_ref.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint or official .pth")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--tokenizer", default=None, help="20B_tokenizer.json (official models)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--wkv_impl", default=None, help="WKV variant of GPT mode (prompt)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    overrides = {} if args.wkv_impl is None else {"wkv_impl": args.wkv_impl}
    try:
        model, tokenizer = load_checkpoint(args.checkpoint, args.tokenizer, args.device,
                                           **overrides)
        prompt = tokenizer.encode(args.prompt)
        generator = None
        if args.seed is not None:
            generator = torch.Generator(device=args.device).manual_seed(args.seed)
        tokens = model.stream(prompt, args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, generator=generator,
                              greedy=args.greedy)
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")
    sys.stdout.write(args.prompt)
    printer = TextPrinter(tokenizer)
    for token in tokens:
        printer(token)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
