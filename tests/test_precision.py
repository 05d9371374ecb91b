"""The precision study (rwkv_ref/precision.py) at small sizes: its measurements measure what
they claim, and ``rescale_for_fp16`` changes no logits while keeping fp16 finite."""
import pytest
import torch

from rwkv_ref import precision
from rwkv_ref.testing import random_model
from rwkv_ref.model import RWKVConfig

F64 = torch.float64


def small_model(n_layer=4):
    """A random model whose residual stream has a variance ~1e4: LayerNorm's eps (1e-5) then
    stays negligible even after x is halved four times, as in a trained model's large x."""
    model = random_model(RWKVConfig(vocab_size=20, n_layer=n_layer, n_embd=16,
                                    wkv_impl="logspace"), seed=3)
    with torch.no_grad():
        model.blocks[0].ln0.weight.mul_(100.0)
        model.blocks[0].ln0.bias.mul_(100.0)
    return model


IDX = torch.tensor([[1, 5, 7, 19, 0, 3, 3, 12]])


@pytest.mark.parametrize("every", [1, 2, 3])
def test_rescale_leaves_float32_logits_and_states_unchanged(every):
    model = small_model()
    before = [p.clone() for p in model.parameters()]
    rescaled = precision.rescale_for_fp16(model, every)
    logits, state = model(IDX)
    logits_r, state_r = rescaled(IDX)
    # with autograd on, RNN mode runs the Python lines (the compiled block is tested elsewhere)
    step, _ = model.step(IDX[:, 0], state)
    step_r, _ = rescaled.step(IDX[:, 0], state_r)
    torch.testing.assert_close(logits_r, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step_r, step, rtol=1e-4, atol=1e-4)
    for s, s_r in zip(state.layers, state_r.layers):
        for t, t_r in zip(s.tensors(), s_r.tensors()):
            torch.testing.assert_close(t_r, t, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_rescale_halves_the_residual_stream_after_every_nth_block():
    model, every = small_model(n_layer=6), 2
    peaks = precision.residual_peaks(model, IDX)
    peaks_r = precision.residual_peaks(precision.rescale_for_fp16(model, every), IDX)
    for i, (p, p_r) in enumerate(zip(peaks, peaks_r)):
        assert p_r == pytest.approx(p / 2 ** ((i + 1) // every), rel=1e-4), f"block {i}"


def test_rescale_keeps_a_growing_model_finite_in_fp16():
    model = precision.grown_model(n_layer=12, n_embd=32, growth=2.5)
    rows = {(r["rescaled"], r["dtype"]): r for r in precision.fp16_rows(model, IDX, every=2)}
    assert rows[False, "float32"]["peak"] > 65504              # beyond fp16's largest number
    assert not rows[False, "float16"]["finite"]
    assert rows[True, "float16"]["finite"] and rows[True, "float16"]["peak"] < 65504
    assert rows[True, "float16"]["rel_err"] < 0.05
    assert rows[True, "float32"]["rel_err"] < 1e-4


def test_rescale_rejects_a_bad_every():
    with pytest.raises(ValueError, match="every must be a positive int"):
        precision.rescale_for_fp16(small_model(), 0)


PURE = ("naive", "logspace", "recurrent", "parallel", "scan")


def test_default_variants_are_the_cpu_ones_and_the_scan():
    names = precision.default_impls()
    assert "scan" in names and "cuda" not in names and set(PURE) <= set(names)


def test_rows_measure_rounding_only_when_computed_in_float32():
    rows = precision.precision_rows(PURE, lengths=(8, 40), channels=4)
    assert {r["impl"] for r in rows} == set(PURE)
    for r in rows:
        assert r["finite"] == (r["rel_err"] != float("inf"))
        if r["compute"] == "float32":
            assert r["finite"]
            # half inputs computed in float32: beyond the inputs' rounding, only the final
            # rounding of y to the dtype (half its eps, relative) ...
            assert r["compute_err"] < torch.finfo(getattr(torch, r["dtype"])).eps / 2 + 1e-5, r
        if r["dtype"] == "float32":
            assert r["rel_err"] < 1e-5, r
    # ... and the rounding of bf16 inputs is ~8 times that of fp16 (2^-8 against 2^-11)
    err = {(r["impl"], r["dtype"]): r["rel_err"] for r in rows
           if r["compute"] == "float32" and r["T"] == 40}
    assert err["logspace", "bfloat16"] > 3 * err["logspace", "float16"]


def test_native_fp16_exponentials_overflow_but_float32_compute_does_not():
    """k ~ N(0, 4^2) has keys above 11.09, where e^k passes fp16's 65504."""
    rows = precision.precision_rows(["naive", "logspace"], [torch.float16], (32,), channels=8)
    by = {(r["impl"], r["compute"]): r for r in rows}
    assert not by["naive", "native"]["finite"]
    assert by["naive", "float32"]["finite"] and by["logspace", "native"]["finite"]


def test_native_bf16_running_sum_stalls():
    """Equal keys and a slow decay: the state's b should reach 1/(1 - e^-w) ~ 1000, but in
    bf16 1 + 256 rounds back to 256, so the sum stalls and the new values weigh too much."""
    T, C = 2000, 1
    w, u = torch.full((C,), 1e-3, dtype=F64), torch.zeros(C, dtype=F64)
    k = torch.zeros(1, T, C, dtype=F64)
    v = torch.linspace(-1, 1, T, dtype=F64).reshape(1, T, C)
    y_ref = precision.run_variant("logspace", w, u, k, v, "float32").double()
    half = [x.bfloat16() for x in (w, u, k, v)]
    native = precision.run_variant("logspace", *half, "native")
    promoted = precision.run_variant("logspace", *half, "float32")
    assert precision.relative_error(native, y_ref) > 0.1
    assert precision.relative_error(promoted, y_ref) < 0.02


def test_relative_error_of_a_non_finite_output_is_inf():
    y_ref = torch.ones(1, 3, 2, dtype=F64)
    assert precision.relative_error(torch.tensor([[[1.0, float("nan")]] * 3]), y_ref) == \
        float("inf")
    assert precision.relative_error(y_ref * 1.01, y_ref) == pytest.approx(0.01)


def test_table_and_plot(tmp_path):
    rows = precision.precision_rows(["naive", "scan"], [torch.float16], (16,), channels=8)
    table = precision.markdown_table(rows)
    assert "| naive (native) | nan |" in table and "| scan |" in table
    precision.plot_precision(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
