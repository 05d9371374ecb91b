"""RNN-mode decoding on the CPU: rwkv_ref (with its ``rnn`` kernel, and on PyTorch ops only)
against the official ``rwkv`` package and against two floors (the copy bandwidth over the
weight bytes read per token, and ``torch.sum`` reading the same weights); then the paper's
Figure 7 in miniature (constant cost per token for RWKV, growing cost for a GPT with a KV
cache).

    python -m benchmarks.bench_decode [--tokens 32] [--threads 1] [--positions 10000]

Prints figures side by side and asserts nothing about time. Random weights throughout (speed
does not depend on the values). The plot goes to out/bench/constant_cost.png.
"""
from __future__ import annotations

import argparse
import math
import mmap
import os
import statistics
import tempfile
import time
from pathlib import Path

# read by the official package when it is imported: TorchScript on, no CUDA kernel build
os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ.setdefault("RWKV_CUDA_ON", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rwkv_ref import RWKV, RWKVConfig, kernel  # noqa: E402
from rwkv_ref.convert import model_from_state_dict
from rwkv_ref.testing import random_state_dict  # noqa: E402

PILE_169M = RWKVConfig(vocab_size=50277, n_layer=12, n_embd=768, wkv_impl="parallel")
PROMPT = [510, 4370, 1204, 310]          # any four ids: the prompt goes through GPT mode once


# ----------------------------------------------------------------------------- measurements


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes moved per second by a large tensor copy (read + write, as STREAM counts Copy)."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)                                        # touch every page first
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() * 4 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bytes_per_token(model: RWKV) -> int:
    """Weight bytes read by one RNN-mode token: every parameter once, one row of ``emb``."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.emb.weight
    return total - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()


def rss_mib() -> float:
    """Resident memory of this process now (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


class OursDecoder:
    """rwkv_ref RNN mode, batch 1: the prompt in GPT mode once, then one ``step`` per token."""

    def __init__(self, model: RWKV):
        self.model = model
        with torch.inference_mode():
            logits, self.state = model(torch.tensor([PROMPT]))
        self.token = logits[:, -1].argmax(-1)                               # (1,)

    @torch.inference_mode()
    def __call__(self) -> None:
        logits, self.state = self.model.step(self.token, self.state)
        self.token = logits.argmax(-1)


class TorchOpsDecoder(OursDecoder):
    """The same, on PyTorch ops only (``kernel.RNN_KERNEL = False``): what the kernel buys."""

    def __call__(self) -> None:
        kernel.RNN_KERNEL = False
        try:
            super().__call__()
        finally:
            kernel.RNN_KERNEL = True


class ReadWeightsOnce:
    """Every weight a token reads, read once by ``torch.sum`` (all parameters but ``emb``): the
    speed of the memory system on these very tensors, a floor nearer the truth than a copy."""

    def __init__(self, model: RWKV):
        self.tensors = [p for name, p in model.named_parameters() if name != "emb.weight"]

    @torch.inference_mode()
    def __call__(self) -> None:
        for t in self.tensors:
            t.sum()


class OfficialDecoder:
    """The official package's RNN mode: one token per ``forward``, batch 1."""

    def __init__(self, official):
        self.official = official
        logits, self.state = official.forward(PROMPT, None)
        self.token = int(logits.argmax())

    def __call__(self) -> None:
        logits, self.state = self.official.forward([self.token], self.state)
        self.token = int(logits.argmax())


def per_token_times(decoders: dict, n_tokens: int, chunk: int = 8, warmup: int = 3) -> dict:
    """Seconds per token of each decoder, in interleaved chunks (a fair share of any noise)."""
    for decode in decoders.values():
        for _ in range(warmup):
            decode()
    times = {name: [] for name in decoders}
    for _ in range(max(1, n_tokens // chunk)):
        for name, decode in decoders.items():
            for _ in range(chunk):
                start = time.perf_counter()
                decode()
                times[name].append(time.perf_counter() - start)
    return times


class MatmulsOnly:
    """Only the matrix-vector products of one RNN-mode token (same weights, same ``Linear``
    modules, so the same kernel as ``step``): the part of the time that no fusion of the
    small element-wise ops can remove."""

    def __init__(self, model: RWKV):
        self.linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        self.inputs = [torch.randn(1, m.in_features, dtype=m.weight.dtype) for m in self.linears]

    @torch.inference_mode()
    def __call__(self) -> None:
        for x, linear in zip(self.inputs, self.linears):
            linear(x)


def load_official(path: str, strategy: str):
    """The official package's model, or the reason it cannot run (a string)."""
    try:
        from rwkv.model import RWKV as OfficialRWKV

        return OfficialRWKV(model=path, strategy=strategy, verbose=False)
    except Exception as error:  # noqa: BLE001 - reported in the table, not raised
        return f"{type(error).__name__}: {str(error)[:80]}"


# ----------------------------------------------------------------------------- decode speed


def decode_table(n_tokens: int, bandwidth: float) -> None:
    """Tokens/s of rwkv_ref and the official package on the same 169M-shaped weights."""
    sd = random_state_dict(PILE_169M, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rwkv4-169m-random.pth")
        torch.save(sd, path)
        print(f"\n169M shape (12 x 768, vocab 50277), random weights, batch 1: {n_tokens} tokens "
              "each after a 4-token prompt, interleaved in chunks of 8; tok/s = 1 / median "
              "time per token")
        print(f"{'weights':<9} {'rwkv_ref':>9} {'torch ops':>10} {'official':>9} {'ratio':>6} "
              f"{'floor':>7} {'of floor':>9} {'read-once':>10} {'of it':>6}   (tok/s)")
        shares = []                 # matmul time / step time, per dtype
        for dtype, strategy in ((torch.float32, "cpu fp32"), (torch.bfloat16, "cpu bf16")):
            ours = model_from_state_dict(sd, PILE_169M, dtype=dtype).eval()
            official = load_official(path, strategy)
            decoders = {"ours": OursDecoder(ours), "torch": TorchOpsDecoder(ours),
                        "matmuls": MatmulsOnly(ours), "read": ReadWeightsOnce(ours)}
            if not isinstance(official, str):
                decoders["official"] = OfficialDecoder(official)
            speed = {name: 1 / statistics.median(t)
                     for name, t in per_token_times(decoders, n_tokens).items()}
            floor = bandwidth / bytes_per_token(ours)
            name = str(dtype).removeprefix("torch.")
            theirs = speed.get("official")
            theirs_txt = f"{theirs:9.2f}" if theirs else f"{'(failed)':>9}"
            ratio = f"{speed['ours'] / theirs:6.2f}" if theirs else f"{'-':>6}"
            print(f"{name:<9} {speed['ours']:9.2f} {speed['torch']:10.2f} {theirs_txt} {ratio} "
                  f"{floor:7.2f} {speed['ours'] / floor:9.0%} {speed['read']:10.2f} "
                  f"{speed['ours'] / speed['read']:6.0%}")
            if isinstance(official, str):
                print(f"          official '{strategy}' did not run: {official}")
            shares.append(f"{name} {speed['ours'] / speed['matmuls']:.0%}")
            del ours, official, decoders
        print("rwkv_ref: the RNN kernel (kernels/rnn_cpu.cpp); torch ops: the same model with "
              "kernel.RNN_KERNEL = False;\nratio: rwkv_ref / official; floor: bandwidth / bytes "
              "read per token; read-once: torch.sum over the same weights, once per token")
        print(f"profile: the matrix-vector products alone take {', '.join(shares)} of "
              "rwkv_ref's time per token")


# ----------------------------------------------------------------------------- constant cost


class TinyGPT:
    """A pre-LN GPT decoder (random weights) with a KV cache, for timing only.

    Per layer: attention (qkv C->3C, proj C->C, heads of 64) and an MLP (C->4C->C), like the
    RWKV blocks it is compared with. The cache holds K and V for every past position: it
    grows by ``2 * n_layer * C`` floats per token, and every new token reads all of it.
    """

    def __init__(self, vocab: int, n_layer: int, n_embd: int, max_len: int):
        g = torch.Generator().manual_seed(0)
        C = n_embd

        def rand(*shape):
            return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

        self.n_head, self.n_embd = max(1, C // 64), C
        self.emb, self.pos = rand(vocab, C), rand(max_len, C)
        self.layers = [dict(qkv=rand(3 * C, C), proj=rand(C, C), fc=rand(4 * C, C),
                            fc2=rand(C, 4 * C)) for _ in range(n_layer)]
        self.head = rand(vocab, C)
        # in fresh pages from the OS (not recycled heap), touched only as positions are
        # written: resident memory grows with the position, as with a cache grown on demand
        shape = (n_layer, 2, self.n_head, max_len, C // self.n_head)
        self._pages = mmap.mmap(-1, math.prod(shape) * 4)
        self.cache = torch.frombuffer(self._pages, dtype=torch.float32).view(shape)

    @torch.inference_mode()
    def step(self, token: int, pos: int) -> torch.Tensor:
        """Logits (V,) for ``token`` at position ``pos``, appending its K and V to the cache."""
        H, C = self.n_head, self.n_embd
        x = self.emb[token] + self.pos[pos]                                   # (C,)
        for i, w in enumerate(self.layers):
            q, k, v = F.linear(F.layer_norm(x, (C,)), w["qkv"]).view(3, H, 1, -1)
            self.cache[i, 0, :, pos], self.cache[i, 1, :, pos] = k[:, 0], v[:, 0]
            keys = self.cache[i, 0, :, :pos + 1]                             # (H, pos+1, C/H)
            values = self.cache[i, 1, :, :pos + 1]
            att = F.scaled_dot_product_attention(q, keys, values)           # (H, 1, C/H)
            x = x + F.linear(att.reshape(C), w["proj"])
            x = x + F.linear(F.gelu(F.linear(F.layer_norm(x, (C,)), w["fc"])), w["fc2"])
        return F.linear(F.layer_norm(x, (C,)), self.head)


def cost_curve(step, n_positions: int, marks: list[int], window: int = 50):
    """Run ``step(pos)`` for every position; at each mark: the fastest s/token among the last
    ``window`` positions (robust to other load on the machine) and the resident memory (MiB)."""
    times, out = [], {}
    for pos in range(n_positions):
        start = time.perf_counter()
        step(pos)
        times.append(time.perf_counter() - start)
        if pos + 1 in marks:
            out[pos + 1] = (min(times[-window:]), rss_mib())
    return out


def constant_cost(n_positions: int, config: RWKVConfig) -> dict:
    """Time per token and RSS along one long decode, RWKV (RNN mode) and GPT (KV cache)."""
    marks = sorted({m for m in (100, 1000, 2000, 3000, 5000, 7500, n_positions)
                    if m <= n_positions})
    model = model_from_state_dict(random_state_dict(config, seed=1), config).eval()
    state, token = None, torch.tensor([0])

    @torch.inference_mode()
    def rwkv_step(pos):
        nonlocal state, token
        logits, state = model.step(token, state)
        token = logits.argmax(-1)

    gpt = TinyGPT(config.vocab_size, config.n_layer, config.n_embd, n_positions)
    gpt_token = 0

    def gpt_step(pos):
        nonlocal gpt_token
        gpt_token = int(gpt.step(gpt_token, pos).argmax())

    rwkv = cost_curve(rwkv_step, n_positions, marks)
    gpt_curve = cost_curve(gpt_step, n_positions, marks)
    # memory growth from the first mark on (the first steps also pay one-off allocations)
    base, gpt_base = rwkv[marks[0]][1], gpt_curve[marks[0]][1]
    state_kib = sum(t.numel() * t.element_size()
                    for layer in state.layers for t in layer.tensors()) / 2**10
    cache_mib_per_token = config.n_layer * 2 * config.n_embd * 4 / 2**20
    print(f"\nConstant cost: {config.n_layer} layers x {config.n_embd}, vocab "
          f"{config.vocab_size}, batch 1, one decode over positions 1..{n_positions}; time = "
          f"fastest of the last 50 tokens at each mark, RSS = growth since position {marks[0]}")
    print(f"{'position':>9} | {'RWKV ms/tok':>11} {'state KiB':>9} {'RSS +MiB':>8} | "
          f"{'GPT+KV ms/tok':>13} {'cache MiB':>9} {'RSS +MiB':>8}")
    for m in marks:
        print(f"{m:9d} | {rwkv[m][0] * 1e3:11.3f} {state_kib:9.1f} {rwkv[m][1] - base:8.1f} | "
              f"{gpt_curve[m][0] * 1e3:13.3f} {m * cache_mib_per_token:9.1f} "
              f"{gpt_curve[m][1] - gpt_base:8.1f}")
    return dict(marks=marks, rwkv=rwkv, gpt=gpt_curve, base=base, gpt_base=gpt_base)


def plot(curves: dict, config: RWKVConfig, path: Path) -> None:
    """Figure 7 in miniature: time per token and memory against the position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    marks = curves["marks"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for name, key, base in (("RWKV (RNN mode)", "rwkv", curves["base"]),
                            ("GPT + KV cache", "gpt", curves["gpt_base"])):
        ax_t.plot(marks, [curves[key][m][0] * 1e3 for m in marks], "o-", label=name)
        ax_m.plot(marks, [curves[key][m][1] - base for m in marks], "o-", label=name)
    ax_t.set(xlabel="position of the token", ylabel="ms per token", title="time per token")
    ax_m.set(xlabel="position of the token",
             ylabel=f"resident memory growth since position {marks[0]} (MiB)",
             title="memory")
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{config.n_layer} layers x {config.n_embd}, CPU, batch 1 "
                 "(cf. the paper's Figure 7)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32, help="timed tokens, 169M shape")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (batch-1 decoding is bound by memory, not cores)")
    p.add_argument("--positions", type=int, default=10_000, help="length of the long decode")
    p.add_argument("--out", default="out/bench/constant_cost.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"bench_decode: torch {torch.__version__}, {args.threads} thread(s), "
          f"{os.cpu_count()} CPUs, load average {load:.2f}")
    bandwidth = copy_bandwidth()
    print(f"memory bandwidth (512 MiB tensor copy, read + write): {bandwidth / 1e9:.1f} GB/s; "
          "floor = bandwidth / weight bytes read per token")
    decode_table(args.tokens, bandwidth)
    # small enough for two 10,000-token decodes in well under a minute; a character vocabulary
    # so that the head does not hide the growth of the KV cache
    small = RWKVConfig(vocab_size=65, n_layer=4, n_embd=256, wkv_impl="parallel")
    curves = constant_cost(args.positions, small)
    plot(curves, small, Path(args.out))
    print(f"\nplot: {args.out}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
