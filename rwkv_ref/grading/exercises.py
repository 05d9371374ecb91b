"""The one adapter layer between the chapters' exercises and the package: ``EXERCISES``.

Each entry says, for one exercise of EXERCISES.md: its chapter, how to draw an input (a
hypothesis strategy of a dict ``case``), how to call the student's function on it, what the
package returns for it (the reference), the names of the returned tensors and the tolerance
of the comparison. Nothing here computes an expected value itself: every reference is a call
into ``rwkv_ref``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from hypothesis import assume, strategies as st

from rwkv_ref.grading.draw import (Described, clone, decay_rates, models, offsets, tensors,
                                   wkv_inputs, wkv_states)
from rwkv_ref.model import token_shift
from rwkv_ref.state import LayerState
from rwkv_ref.wkv import WKVState, _merge, wkv, wkv_step


class ReferenceMissing(Exception):
    """The package function an exercise is graded against does not exist (yet)."""


@dataclass(frozen=True)
class Exercise:
    """How to grade one exercise.

    ``draw`` gives a dict ``case``; the student's function is called as ``fn(*case[args])``
    (or by ``call`` if given) and ``reference(case)`` is the package's answer. Both results
    are flattened into tensors, named by ``returns`` (states by field), and compared with
    ``torch.isclose(rtol, atol)``.
    """

    name: str
    chapter: int
    args: tuple[str, ...]
    returns: tuple[str, ...]
    draw: st.SearchStrategy
    reference: Callable[[dict], Any]
    call: Callable[[Callable, dict], Any] | None = None
    note: str = ""              # how the call is made, when that is not just fn(*args)
    requires: Callable[[], Any] | None = None   # raises ReferenceMissing if the ref is absent
    rtol: float = 1e-7
    atol: float = 1e-9

    def call_student(self, fn: Callable, case: dict):
        """The student's result on ``case`` (on copies of its tensors, without autograd)."""
        with torch.no_grad():
            if self.call is not None:
                return self.call(fn, {name: clone(value) for name, value in case.items()})
            return fn(*(clone(case[name]) for name in self.args))

    def expected(self, case: dict):
        """The package's result on ``case`` (on copies of its tensors)."""
        return self.reference({name: clone(value) for name, value in case.items()})


# ----------------------------------------------------------------------------- the WKV

_WKV_ARGS = ("w", "u", "k", "v")


@st.composite
def _one_token(draw, stable: bool = True):
    """w, u (C,), k_t, v_t (B, C) and a state; with ``stable`` every exponent (k and p) is
    shifted by a common drawn offset, under which the outputs do not change."""
    B, C = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    offset = draw(offsets) if stable else 0.0
    return dict(w=draw(decay_rates(C)), u=draw(tensors((C,), -30.0, 30.0)),
                k_t=draw(tensors((B, C), -30.0, 30.0)) + offset,
                v_t=draw(tensors((B, C), -3.0, 3.0)), state=draw(wkv_states(B, C, offset)))


@st.composite
def _stable_step_case(draw):
    case = draw(_one_token())
    a, b, p = case.pop("state")
    return dict(case, a=a, b=b, p=p)


def _stable_step_ref(c):
    y, s = wkv_step(c["w"], c["u"], c["k_t"], c["v_t"], WKVState(c["a"], c["b"], c["p"]))
    return y, s.a, s.b, s.p


@st.composite
def _merge_case(draw):
    B, C, offset = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(offsets)
    return dict(x=draw(wkv_states(B, C, offset)), y=draw(wkv_states(B, C, offset)))


@st.composite
def _chunked_case(draw):
    offset = draw(offsets)
    w, u, k, v = draw(wkv_inputs(max_T=10, offset=offset))
    B, T, C = k.shape
    return dict(w=w, u=u, k=k, v=v, state=draw(wkv_states(B, C, offset)),
                chunk=draw(st.integers(1, T + 1)), split=draw(st.integers(1, T)))


def _chunked_call(fn, c):
    """Two calls, tokens [0, split) then [split, T), the state handed from one to the next."""
    s = c["split"]
    y, state = fn(c["w"], c["u"], c["k"][:, :s], c["v"][:, :s], c["state"], c["chunk"])
    if s == c["k"].shape[1]:
        return y, state
    y2, state = fn(c["w"], c["u"], c["k"][:, s:], c["v"][:, s:], state, c["chunk"])
    return torch.cat([y, y2], dim=1), state


@st.composite
def _wkv_case(draw):
    return dict(zip(_WKV_ARGS, draw(wkv_inputs())))


@st.composite
def _backward_case(draw):
    w, u, k, v = draw(wkv_inputs(max_T=5))
    return dict(w=w, u=u, k=k, v=v, gy=draw(tensors(k.shape, -3.0, 3.0)))


def _backward_ref(c):
    """Gradients of sum(y * gy) by autograd through the ``logspace`` scan."""
    leaves = [c[n].requires_grad_() for n in ("w", "u", "k", "v")]
    with torch.enable_grad():
        y, _ = wkv(*leaves, impl="logspace")
        # with T = 1, y does not depend on w: its gradient is then zero
        return torch.autograd.grad((y * c["gy"]).sum(), leaves, allow_unused=True,
                                   materialize_grads=True)


# ----------------------------------------------------------------------------- the model


@st.composite
def _layer_case(draw, part: str | None):
    """A drawn model's layer (or its ``part``), x (B, T, C), x_prev its token shift, and a
    carried state: x_prev[t=0], the WKV state, and for a whole block both shifts."""
    model = draw(models())
    i = draw(st.integers(0, model.value.config.n_layer - 1))
    block = model.value.blocks[i]
    C, A = block.ln1.normalized_shape[0], block.att.time_decay.shape[0]
    B, T = draw(st.integers(1, 2)), draw(st.integers(1, 5))
    x = draw(tensors((B, T, C), -3.0, 3.0))
    last = draw(tensors((B, C), -3.0, 3.0))
    module = Described(getattr(block, part) if part else block,
                       f"{model.text}.blocks[{i}]" + (f".{part}" if part else ""))
    case = {part or "block": module, "x": x}
    if part is not None:
        case["x_prev"] = token_shift(x, last)
    if part == "att":
        case["state"] = draw(wkv_states(B, A))
    if part is None:
        case["state"] = LayerState(last, draw(wkv_states(B, A)), draw(tensors((B, C), -3, 3)))
    return case


@st.composite
def _model_case(draw):
    model = draw(models())
    V = model.value.config.vocab_size
    B, T = draw(st.integers(1, 2)), draw(st.integers(1, 5))
    idx = torch.tensor(draw(st.lists(st.lists(st.integers(0, V - 1), min_size=T, max_size=T),
                                     min_size=B, max_size=B)))
    prefix = draw(st.lists(st.lists(st.integers(0, V - 1), min_size=B, max_size=B),
                           max_size=3))                  # T0 rows of B tokens; T0 = 0: None
    state = None
    if prefix:
        prefix = torch.tensor(prefix).T                  # (B, T0)
        with torch.no_grad():
            state = Described(model.value(prefix)[1],
                              f"model(torch.tensor({prefix.tolist()}))[1]")
    return dict(model=model, idx=idx, state=state)


# ----------------------------------------------------------------------------- sampling


def _next_token_probs():
    try:
        return importlib.import_module("rwkv_ref.sampling").next_token_probs
    except (ImportError, AttributeError) as e:
        raise ReferenceMissing("rwkv_ref.sampling.next_token_probs does not exist yet") from e


def _sampling_ref(c):
    return _next_token_probs()(c["logits"], c["temperature"], c["top_k"], c["top_p"])


@st.composite
def _sampling_case(draw):
    """logits (B, V) float32 without near-ties, a temperature, top_k, top_p; an input whose
    top_p sits on a boundary of the cumulative mass (where rounding decides) is skipped."""
    B, V = draw(st.integers(1, 2)), draw(st.integers(1, 8))
    logits = draw(tensors((B, V), -2.0, 2.0, dtype=torch.float32))
    # spread the logits by a drawn ranking, so that simple draws (all zeros) are not ties
    rank = torch.tensor(draw(st.permutations(range(V))), dtype=torch.float32)
    logits = logits + 0.7 * rank
    gaps = logits.sort(dim=-1).values.diff(dim=-1)
    assume(V == 1 or bool(gaps.min() > 1e-3))
    case = dict(logits=logits, temperature=draw(st.floats(0.25, 0.6) | st.floats(1.5, 3.0)),   # far from 1
                top_k=draw(st.none() | st.integers(1, V)),
                # a real nucleus in half the draws: that is where top-p mistakes show
                top_p=draw(st.none() | st.just(1.0) | st.floats(0.05, 0.999)
                           | st.floats(0.3, 0.95)))
    if case["top_p"] is not None and case["top_p"] < 1:
        near = [_sampling_ref(dict(case, top_p=case["top_p"] + d)) > 0 for d in (-1e-4, 1e-4)]
        assume(torch.equal(*near))
    return case


# ----------------------------------------------------------------------------- the table

EXERCISES: dict[str, Exercise] = {ex.name: ex for ex in [
    Exercise("wkv_loops", 2, _WKV_ARGS, ("y",), _wkv_case(),
             lambda c: wkv(c["w"], c["u"], c["k"], c["v"], impl="naive")[0]),
    Exercise("stable_step", 3, ("w", "u", "k_t", "v_t", "a", "b", "p"), ("y_t", "a", "b", "p"),
             _stable_step_case(), _stable_step_ref),
    Exercise("merge", 4, ("x", "y"), ("state",), _merge_case(), lambda c: _merge(c["x"], c["y"])),
    Exercise("wkv_step", 4, ("w", "u", "k_t", "v_t", "state"), ("y_t", "state"), _one_token(),
             lambda c: wkv_step(c["w"], c["u"], c["k_t"], c["v_t"], c["state"])),
    Exercise("wkv_chunked", 5, (*_WKV_ARGS, "state", "chunk"), ("y", "state"), _chunked_case(),
             lambda c: wkv(c["w"], c["u"], c["k"], c["v"], c["state"], impl="parallel"),
             call=_chunked_call, note="called on tokens [0, split), then on [split, T) with "
                                      "the state it returned; y is the two outputs joined"),
    Exercise("wkv_backward", 6, (*_WKV_ARGS, "gy"), ("gw", "gu", "gk", "gv"), _backward_case(),
             _backward_ref, note="the gradients of sum(y * gy)", rtol=1e-6, atol=1e-8),
    Exercise("time_mixing", 7, ("att", "x", "x_prev", "state"), ("out", "state"),
             _layer_case("att"),
             lambda c: c["att"](c["x"], c["x_prev"], c["state"], "logspace")),
    Exercise("channel_mixing", 7, ("ffn", "x", "x_prev"), ("out",), _layer_case("ffn"),
             lambda c: c["ffn"](c["x"], c["x_prev"])),
    Exercise("block_forward", 8, ("block", "x", "state"), ("x", "state"), _layer_case(None),
             lambda c: c["block"](c["x"], c["state"], "logspace")),
    Exercise("rwkv_forward", 8, ("model", "idx", "state"), ("logits", "state"), _model_case(),
             lambda c: c["model"](c["idx"], c["state"])),
    Exercise("sampling_probs", 10, ("logits", "temperature", "top_k", "top_p"), ("probs",),
             _sampling_case(), _sampling_ref, rtol=1e-5, atol=1e-6,
             requires=_next_token_probs),
]}
