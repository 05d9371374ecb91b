"""Text generation in RNN mode: the prompt through GPT mode once, then one ``step`` per token.

    python -m rwkv_ref.generate --checkpoint out/cpu/ckpt.pt --prompt "ROMEO:" --max_new_tokens 500

Each new token costs the same time and memory however long the text already is: the whole
past lives in the fixed-size state.
"""
from __future__ import annotations

import argparse
import sys

import torch

from rwkv_ref.checkpoint import load_checkpoint
from rwkv_ref.config import check_device, run_command

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
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return p.parse_args(argv)


def generate_text(args: argparse.Namespace) -> int:
    """Load the checkpoint and stream the continuation of the prompt to stdout."""
    overrides = {} if args.wkv_impl is None else {"wkv_impl": args.wkv_impl}
    model, tokenizer = load_checkpoint(args.checkpoint, args.tokenizer, args.device, **overrides)
    prompt = tokenizer.encode(args.prompt)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
    tokens = model.stream(prompt, args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, generator=generator,
                          greedy=args.greedy)          # checks its arguments now
    sys.stdout.write(args.prompt)
    printer = TextPrinter(tokenizer)
    for token in tokens:
        printer(token)
    sys.stdout.write("\n")
    return 0


def main(argv=None) -> int:
    """The command line; bad input (a missing, truncated or foreign checkpoint, a prompt the
    tokenizer cannot encode, bad sampling settings) ends in one line on stderr and exit 2;
    ``--debug`` shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command("rwkv_ref.generate", lambda rest: _run(parse_args(rest)), argv,
                       status={ValueError: 2, FileNotFoundError: 2, ImportError: 2})


def _run(args: argparse.Namespace) -> int:
    check_device(args.device)          # one line, not torch's assertion deep in .to()
    return generate_text(args)


if __name__ == "__main__":
    sys.exit(main())
