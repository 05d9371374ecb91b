"""Checking one student function against the package with hypothesis, and the verdict.

    result = check(EXERCISES["merge"], merge, seed=1234)

Hypothesis draws inputs, calls the reference and the student's function, and compares them;
on a disagreement (or an exception) it shrinks the input and the verdict keeps the smallest
one found. A ``NotImplementedError`` ends the search at once ("not yet implemented").
Shrinking stops after ``budget_s`` seconds of CPU time (not wall time: a busy machine
does not cut it short) with the smallest input so far.
"""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, field

import torch
from hypothesis import HealthCheck, Phase, given, reporting, seed as hypothesis_seed, settings
from torch import Tensor

from rwkv_ref.grading.draw import show, show_case
from rwkv_ref.grading.exercises import Exercise, ReferenceMissing
from rwkv_ref.state import LayerState, RWKVState

PASSED, FAILED, TODO = "passed", "FAILED", "not yet implemented"
MISSING, ERROR, UNAVAILABLE = "missing", "error", "no reference"


@dataclass
class Verdict:
    """The outcome for one exercise: a status above and the lines that explain it."""

    name: str
    status: str
    lines: list[str] = field(default_factory=list)


class _Stop(BaseException):
    """Ends the hypothesis search at once (hypothesis only catches ``Exception``)."""


class Mismatch(AssertionError):
    """The student's result differs from the package's (the message says where)."""


def leaves(value, path: str):
    """(name, tensor) for every tensor in a result: tuples in order, states by field.

    Args:
        value: a tensor, a tuple/list/NamedTuple, a ``LayerState`` or an ``RWKVState``.
        path: the name of ``value``; parts get ``path.field`` or ``path[i]``.
    """
    if isinstance(value, Tensor):
        return [(path, value)]
    if isinstance(value, RWKVState):
        return [x for i, layer in enumerate(value.layers)
                for x in leaves(layer, f"{path}.layers[{i}]")]
    if isinstance(value, LayerState):
        return (leaves(value.att_x, f"{path}.att_x") + leaves(value.wkv, f"{path}.wkv")
                + leaves(value.ffn_x, f"{path}.ffn_x"))
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return [x for name, part in zip(value._fields, value)
                for x in leaves(part, f"{path}.{name}")]
    if isinstance(value, (tuple, list)):
        return [x for i, part in enumerate(value) for x in leaves(part, f"{path}[{i}]")]
    raise Mismatch(f"{path} is a {type(value).__name__}, expected tensors")


def named_leaves(result, returns: tuple[str, ...]):
    """``leaves`` of a function's result, its top-level parts named by ``returns``."""
    if len(returns) == 1:
        return leaves(result, returns[0])
    if not isinstance(result, (tuple, list)) or len(result) != len(returns):
        got = f"{len(result)} values" if isinstance(result, (tuple, list)) \
            else f"a {type(result).__name__}"
        raise Mismatch(f"returned {got}, expected ({', '.join(returns)})")
    return [x for part, name in zip(result, returns) for x in leaves(part, name)]


def compare(got, expected, ex: Exercise) -> None:
    """Raise ``Mismatch`` naming the first tensor of ``got`` that differs from ``expected``."""
    want = named_leaves(expected, ex.returns)
    have = [t for _, t in named_leaves(got, ex.returns)]
    if len(have) != len(want):
        raise Mismatch(f"returned {len(have)} tensors, expected {len(want)}: "
                       f"{', '.join(name for name, _ in want)}")
    for (name, e), g in zip(want, have):
        if g.shape != e.shape:
            raise Mismatch(f"{name} has shape {tuple(g.shape)}, expected {tuple(e.shape)}")
        close = torch.isclose(g.detach().double(), e.detach().double(), ex.rtol, ex.atol)
        if not bool(close.all()):
            where = tuple(int(i) for i in (~close).nonzero()[0])
            dtype = "" if g.dtype == e.dtype else f" (got {g.dtype}, expected {e.dtype})"
            first = _distinct(e[where].item(), g[where].item())
            raise Mismatch(f"{name}: expected {show(e)}, got {show(g)}; first difference at "
                           f"{where}: {first}{dtype}")


def _distinct(expected: float, got: float) -> str:
    """"expected X, got Y" with as many digits as it takes to tell them apart."""
    for digits in (6, 10, 17):
        if f"{expected:.{digits}g}" != f"{got:.{digits}g}":
            break
    return f"expected {expected:.{digits}g}, got {got:.{digits}g}"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def check(ex: Exercise, fn, seed: int, max_examples: int = 40,
          budget_s: float = 8.0) -> Verdict:
    """Grade ``fn`` as exercise ``ex`` on up to ``max_examples`` drawn inputs.

    Returns:
        A ``Verdict``: passed, FAILED (smallest input, expected and got), not yet implemented,
        error (the exception's first line, with the input), or no reference.
    """
    try:
        if ex.requires is not None:
            ex.requires()
    except ReferenceMissing as e:
        return Verdict(ex.name, UNAVAILABLE, [str(e)])
    start, last = time.process_time(), {}

    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=False,
              report_multiple_bugs=False, suppress_health_check=list(HealthCheck),
              phases=(Phase.generate, Phase.shrink), print_blob=False)
    @hypothesis_seed(seed)
    @given(case=ex.draw)
    def prop(case):
        try:
            expected = ex.expected(case)
        except Exception as e:
            raise _Stop(Verdict(ex.name, ERROR, [f"the package's reference raised "
                                                 f"{_one_line(e)} (a bug of the grader)"]))
        try:
            got = ex.call_student(fn, case)
            compare(got, expected, ex)
        except NotImplementedError as e:
            raise _Stop(Verdict(ex.name, TODO, [str(e)]))
        except Exception as e:
            last.update(case=case, error=e)
            if time.process_time() - start > budget_s:
                raise _Stop(None)
            raise

    with contextlib.redirect_stdout(io.StringIO()), reporting.with_reporter(lambda _: None):
        try:
            prop()
            return Verdict(ex.name, PASSED, [f"{max_examples} inputs"])
        except _Stop as stop:
            if stop.args[0] is not None:
                return stop.args[0]
        except Exception as e:
            if not last:     # hypothesis itself failed (e.g. a flaky student function)
                return Verdict(ex.name, ERROR, [_one_line(e)])
    return _failure(ex, last["case"], last["error"], time.process_time() - start > budget_s)


def _failure(ex: Exercise, case: dict, error: Exception, cut: bool) -> Verdict:
    """The verdict for the smallest failing input found."""
    lines = [f"input: {show_case(case)}"]
    if ex.note:
        lines.append(f"({ex.note})")
    if isinstance(error, Mismatch):
        status, lines = FAILED, lines + [str(error)]
    else:
        status, lines = ERROR, lines + [f"raised {_one_line(error)}"]
    if cut:
        lines.append("(shrinking stopped at the time limit: a smaller input may exist)")
    return Verdict(ex.name, status, lines)
