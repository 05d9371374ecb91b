"""How precise WKV is in float32, bfloat16 and float16, and why fp16 models overflow.

    python -m rwkv_ref.precision --out_dir=out/experiments [--quick]

Three things can go wrong in half precision:

1. **Rounding the inputs.** ``rwkv_ref.wkv`` computes in float32 for bf16 and fp16 inputs
   (``compute="float32"`` below), so its only half-precision error is the rounding of k and v:
   a key k rounded by up to |k| 2^-8 (bf16) or |k| 2^-11 (fp16) changes its weight e^k by that
   fraction, so the error grows with the size of the keys.
2. **Computing in the half dtype** (``compute="native"``: a variant's arithmetic run in bf16 or
   fp16 itself). Explicit exponentials overflow fp16 once k > 11.09 (e^11.09 = 65504, its
   largest number), so ``naive`` returns nan; and a running sum stops growing once one more
   term is below half its ulp (1 + 256 == 256 in bf16, 1 + 2048 == 2048 in fp16), which is
   what the scans' states meet on long sequences with slow decays.
3. **The residual stream of a deep model.** Every block adds its outputs onto x, and in large
   trained models x grows with depth until it passes 65504 in fp16: inf, then nan from the
   next LayerNorm. The official ``rwkv`` package counters it with RESCALE_LAYER: x is halved
   after every N-th block and block i's ``att.output`` and ``ffn.value`` weights are divided by
   2^(i // N), so each block still adds the same fraction of x. Every LayerNorm sees x times a
   power of 2 and returns what it returned before (up to its eps), so the logits do not change.
   ``rescale_for_fp16`` does this to a copy of a model.

``precision_rows`` measures 1 and 2 against a float64 reference (``logspace`` in float64);
``rescale_for_fp16``, ``grown_model`` and ``residual_peaks`` show 3.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import time
from pathlib import Path

import torch
from torch import Tensor

from rwkv_ref.wkv import WKV_IMPLS, WKVState, wkv

_wkv_module = importlib.import_module("rwkv_ref.wkv")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LENGTHS = (16, 64, 256, 1024, 4096, 16384)
NAIVE_MAX = 2**24          # naive holds (C, T, T) tensors: run it only where C T^2 fits this
COMPILED = ("cpp", "cuda")  # float32 kernels: no native half-precision rows


def default_impls() -> tuple[str, ...]:
    """Every variant that runs on the CPU, the scan included."""
    return tuple(name for name in WKV_IMPLS if name != "cuda")


def make_inputs(T: int, channels: int, seed: int = 0, key_scale: float = 4.0):
    """float64 w (positive, 0.0025 .. 2.7: slow decays make long sums), u, k, v of shape
    (C,), (C,), (1, T, C), (1, T, C); k ~ N(0, key_scale^2)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.empty(channels, dtype=torch.float64).uniform_(-6, 1, generator=g))
    u = torch.randn(channels, generator=g, dtype=torch.float64)
    k = torch.randn(1, T, channels, generator=g, dtype=torch.float64) * key_scale
    v = torch.randn(1, T, channels, generator=g, dtype=torch.float64)
    return w, u, k, v


def run_variant(impl: str, w: Tensor, u: Tensor, k: Tensor, v: Tensor, compute: str) -> Tensor:
    """y (1, T, C) of one variant from the empty state.

    Args:
        compute: ``"float32"``: as ``rwkv_ref.wkv`` does it (half inputs computed in float32);
            ``"native"``: the variant's own arithmetic in the dtype of the inputs.
    """
    B, _, C = k.shape
    pure = _wkv_module._PURE
    if compute == "native":
        # EMPTY_P (-1e38) does not fit fp16: the empty state's p is the dtype's lowest number
        empty = WKVState.empty(B, C, torch.float32)
        empty = WKVState(*(x.to(k.dtype) for x in empty[:2]),
                         torch.full_like(empty.p, torch.finfo(k.dtype).min, dtype=k.dtype))
        return pure[impl](w, u, k, v, empty)[0]
    return wkv(w, u, k, v, impl=impl)[0]


def relative_error(y: Tensor, y_ref: Tensor) -> float:
    """max |y - y_ref| / max |y_ref|: the error on the scale of the outputs (inf if y is not
    finite)."""
    if not bool(torch.isfinite(y).all()):
        return float("inf")
    return float((y.double() - y_ref).abs().max() / y_ref.abs().max())


def precision_rows(impls=None, dtypes=DTYPES, lengths=LENGTHS, channels: int = 32,
                   seed: int = 0, key_scale: float = 4.0) -> list[dict]:
    """The error of every variant's y for every input dtype and length.

    Args:
        impls: variant names (default ``default_impls()``).  dtypes: input dtypes.
        lengths: T values.  channels: C.  seed, key_scale: of ``make_inputs``.
    Returns:
        One dict per (T, dtype, impl, compute): ``impl, dtype, compute, T, rel_err`` (against
        float64 ``logspace`` on the exact inputs), ``compute_err`` (against float64 on the
        inputs as rounded to dtype: the arithmetic's own share), ``finite``, ``seconds``.
    """
    impls = default_impls() if impls is None else tuple(impls)
    rows = []
    for T in lengths:
        w, u, k, v = make_inputs(T, channels, seed, key_scale)
        y_exact = wkv(w, u, k, v, impl="logspace")[0]
        for dtype in dtypes:
            rounded = [x.to(dtype) for x in (w, u, k, v)]
            y_rounded = wkv(*(x.double() for x in rounded), impl="logspace")[0]
            for impl in impls:
                if impl == "naive" and channels * T * T > NAIVE_MAX:
                    continue
                modes = ["float32"] + ["native"] * (dtype != torch.float32
                                                    and impl not in COMPILED)
                for compute in modes:
                    start = time.perf_counter()
                    with torch.no_grad():
                        y = run_variant(impl, *rounded, compute=compute)
                    rows.append({"impl": impl, "dtype": str(dtype).replace("torch.", ""),
                                     "compute": compute, "T": T,
                                     "rel_err": relative_error(y, y_exact),
                                     "compute_err": relative_error(y, y_rounded),
                                     "finite": bool(torch.isfinite(y).all()),
                                     "seconds": time.perf_counter() - start})
    return rows


# ----------------------------------------------------------------------------- reporting


def _label(row: dict) -> str:
    return row["impl"] + (" (native)" if row["compute"] == "native" else "")


def plot_precision(rows: list[dict], path) -> None:
    """One panel per dtype: rel_err against T for every variant (one colour each; dashed:
    native half arithmetic); non-finite outputs as x at the top. Writes a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(row["dtype"] for row in rows))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5 * len(dtypes), 4), sharey=True,
                             squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        mine = [row for row in rows if row["dtype"] == dtype]
        colors = {impl: f"C{i}" for i, impl in enumerate(dict.fromkeys(r["impl"] for r in rows))}
        for label in dict.fromkeys(map(_label, mine)):     # one colour per variant
            line = [row for row in mine if _label(row) == label]
            color = colors[line[0]["impl"]]
            ok = [row for row in line if row["finite"]]
            style = "--" if "native" in label else "-"
            ax.loglog([r["T"] for r in ok], [max(r["rel_err"], 1e-17) for r in ok], style,
                      marker="o", color=color, label=label)
            bad = [row["T"] for row in line if not row["finite"]]
            ax.loglog(bad, [1.0] * len(bad), "x", color=color, markersize=10)
        ax.set(title=f"inputs in {dtype} (x: inf or nan)", xlabel="sequence length T")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("max |y - y64| / max |y64|")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(rows: list[dict]) -> str:
    """rel_err per variant (rows) and T (columns), one table per dtype; "nan" where the
    output is not finite, "-" where the variant was not run."""
    lengths = sorted({row["T"] for row in rows})
    out = []
    for dtype in dict.fromkeys(row["dtype"] for row in rows):
        mine = [row for row in rows if row["dtype"] == dtype]
        out += [f"**inputs in {dtype}** (max |y - y64| / max |y64|)", "",
                "| variant | " + " | ".join(f"T={T}" for T in lengths) + " |",
                "|---|" + "---:|" * len(lengths)]
        for label in dict.fromkeys(map(_label, mine)):
            cells = {row["T"]: (f"{row['rel_err']:.1e}" if row["finite"] else "nan")
                     for row in mine if _label(row) == label}
            out.append(f"| {label} | " + " | ".join(cells.get(T, "-") for T in lengths) + " |")
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- fp16 models


def rescale_for_fp16(model, every: int):
    """A copy of ``model`` that halves its residual stream after every ``every``-th block.

    Block i's ``att.output`` and ``ffn.value`` weights are divided by 2^(i // every) (their
    writes shrink with x) and x is halved after blocks every-1, 2 every-1, ...; both are powers
    of 2, so exact, and the LayerNorms make the logits and states those of ``model`` (up to
    LayerNorm's eps). GPT mode (``model(idx)``) and RNN mode (``model.step``) both halve.

    Args:
        model: an ``rwkv_ref.RWKV`` (not modified).  every: N >= 1, the official RESCALE_LAYER.
    Returns:
        The rescaled copy.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"rescale_for_fp16: every must be a positive int, got {every!r}")
    model = copy.deepcopy(model)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            for linear in (block.att.output, block.ffn.value):
                linear.weight.div_(2 ** (i // every))
            if (i + 1) % every == 0:
                block.register_forward_hook(_halve_output)
                block.step = _halving(block.step)
    return model


def _halve_output(module, args, output):
    """Forward hook of a block: (x, state) -> (x / 2, state)."""
    x, state = output
    return x / 2, state


def _halving(step):
    """``Block.step`` followed by halving the x it returns."""
    def halved(x, state):
        x, state = step(x, state)
        return x / 2, state
    return halved


def grown_model(n_layer: int = 12, n_embd: int = 64, growth: float = 2.5, seed: int = 0,
                vocab_size: int = 50):
    """A random RWKV whose block i writes growth^i times more into the residual stream: a
    stand-in for the growth of x with depth seen in large trained models.

    Returns:
        ``rwkv_ref.RWKV`` in float32 (``wkv_impl="logspace"``).
    """
    from rwkv_ref.model import RWKVConfig
    from rwkv_ref.testing import random_model

    config = RWKVConfig(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd,
                        wkv_impl="logspace")
    model = random_model(config, seed=seed)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            block.att.output.weight.mul_(growth ** i)
            block.ffn.value.weight.mul_(growth ** i)
    return model


def residual_peaks(model, idx: Tensor) -> list[float]:
    """max |x| of the residual stream after every block in GPT mode (float32 or the model's
    dtype). Args: idx (B, T) token ids. Returns: n_layer floats."""
    peaks = []
    hooks = [block.register_forward_hook(lambda m, a, out: peaks.append(
        float(out[0].float().abs().max()))) for block in model.blocks]
    try:
        with torch.no_grad():
            model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return peaks


def fp16_rows(model, idx: Tensor, every: int) -> list[dict]:
    """GPT-mode logits of ``model`` and of ``rescale_for_fp16(model, every)`` in float32 and
    float16, against the float32 logits of ``model``.

    Returns:
        One dict per (rescaled, dtype): ``rescaled, dtype, peak`` (max |x| after the last
        block), ``finite``, ``rel_err`` (max |logits - logits32| / max |logits32|).
    """
    with torch.no_grad():
        reference = model(idx)[0]
    rows = []
    for rescaled, base in ((False, model), (True, rescale_for_fp16(model, every))):
        for dtype in (torch.float32, torch.float16):
            m = copy.deepcopy(base).to(dtype)
            with torch.no_grad():
                logits = m(idx)[0]
            rows.append({"rescaled": rescaled, "dtype": str(dtype).replace("torch.", ""),
                             "peak": residual_peaks(m, idx)[-1],
                             "finite": bool(torch.isfinite(logits).all()),
                             "rel_err": relative_error(logits.float(), reference.double())})
    return rows


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="WKV precision in float32, bf16 and fp16")
    parser.add_argument("--out_dir", default="out/experiments")
    parser.add_argument("--quick", action="store_true", help="T up to 1024 only")
    parser.add_argument("--channels", type=int, default=32)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    lengths = tuple(T for T in LENGTHS if T <= 1024) if args.quick else LENGTHS
    rows = precision_rows(lengths=lengths, channels=args.channels)
    out = Path(args.out_dir)
    plot_precision(rows, out / "precision.png")
    model = grown_model()
    idx = torch.randint(0, model.config.vocab_size, (1, 64),
                        generator=torch.Generator().manual_seed(0))
    every = 2
    lines = ["# WKV precision in float32, bfloat16 and float16", "",
             (f"C = {args.channels}, B = 1, k ~ N(0, 4^2), w in [0.0025, 2.7]; reference: "
              "logspace in float64 on the exact inputs. `(native)`: the variant's arithmetic "
              "in the input dtype; otherwise half inputs are computed in float32 as "
              "rwkv_ref.wkv does."), "", markdown_table(rows),
             f"## A {model.config.n_layer}-layer model whose residual stream grows with depth",
             "", f"rescaled: `rescale_for_fp16(model, every={every})`", "",
             "| rescaled | dtype | max abs(x) after the last block | logits finite | rel. error |",
             "|---|---|---:|---|---:|"]
    for row in fp16_rows(model, idx, every):
        lines.append(f"| {row['rescaled']} | {row['dtype']} | {row['peak']:.4g} | "
                     f"{row['finite']} | {row['rel_err']:.1e} |")
    seconds = time.perf_counter() - start
    lines += ["", f"({seconds:.0f} s on {torch.get_num_threads()} threads)"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'precision.png'} and {out / 'precision.md'}")


if __name__ == "__main__":
    main()
