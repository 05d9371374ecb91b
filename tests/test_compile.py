"""``torch.compile`` through the kernels (rwkv_ref.kernel's custom ops): a GPT-mode training
step (forward and backward through the cpp WKV kernel) and an RNN-mode ``model.step``
(through the rnn kernel's block_step) each compile to one graph, with no graph break, run the
kernels (counted by wrapping the extension's functions), and give eager's numbers.

The first test pays for inductor's C++ compilation (about 30 s on 2 cores).
"""
import subprocess
import sys
import textwrap

import pytest
import torch

from rwkv_ref import RWKVConfig, kernel
from rwkv_ref.recipe import compute_loss
from rwkv_ref.testing import random_model

from test_kernel import require_kernel

CONFIG = RWKVConfig(vocab_size=11, n_layer=2, n_embd=16, dim_att=8, dim_ffn=24, wkv_impl="auto")


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CONFIG.vocab_size, (2, 9), generator=g) for _ in range(2)]


def count_calls(monkeypatch, name, functions):
    """Wrap the extension's ``functions`` so that each call is counted: {function: calls}."""
    ext, calls = require_kernel(name), {f: 0 for f in functions}
    for f in functions:
        original = getattr(ext, f)

        def counted(*args, _f=f, _original=original):
            calls[_f] += 1
            return _original(*args)

        monkeypatch.setattr(ext, f, counted)
    return calls


def graph_breaks(fn, *args):
    """Dynamo's verdict on fn(*args): (graph breaks, the graphs' code)."""
    torch._dynamo.reset()
    explain = torch._dynamo.explain(fn)(*args)
    return explain.graph_break_count, "".join(g.code for g in explain.graphs)


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_gpt_mode_training_compiles_to_one_graph_through_the_cpp_kernel(monkeypatch):
    calls = count_calls(monkeypatch, "cpp", ("forward", "backward"))
    model = random_model(CONFIG, seed=1)
    x, y = batch(2)
    breaks, code = graph_breaks(compute_loss, model, x, y)
    assert breaks == 0 and code.count("rwkv_ref.wkv_forward") == CONFIG.n_layer
    calls.update(forward=0, backward=0)                      # explain ran it once
    compiled = torch.compile(compute_loss, fullgraph=True)
    loss = compiled(model, x, y)
    grads = grads_of(model, loss)
    assert calls == {"forward": CONFIG.n_layer, "backward": CONFIG.n_layer}  # ran the kernel
    eager = compute_loss(model, x, y)
    torch.testing.assert_close(loss, eager)
    for got, want in zip(grads, grads_of(model, eager)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_rnn_mode_step_compiles_to_one_graph_through_the_rnn_kernel(monkeypatch):
    calls = count_calls(monkeypatch, "rnn", ("block_step", "linear"))
    model = random_model(CONFIG, seed=3).eval()
    token = torch.tensor([1, 7])
    with torch.no_grad():
        _, state = model(batch(4)[0])                          # a populated state
        breaks, code = graph_breaks(model.step, token, state)
        assert breaks == 0 and code.count("rwkv_ref.rnn_block_step") == CONFIG.n_layer
        calls.update(block_step=0, linear=0)                 # explain ran it once
        compiled = torch.compile(model.step, fullgraph=True)
        logits, new_state = compiled(token, state)
        assert calls == {"block_step": CONFIG.n_layer, "linear": 1}   # the blocks, the head
        want, want_state = model.step(token, state)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    for got, ref in zip(new_state.layers, want_state.layers):
        for a, b in zip(got.tensors(), ref.tensors()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["parallel", "cpp"])
def test_compiled_model_still_rejects_bad_tokens_in_eager(impl):
    """Without fullgraph, a bad input falls back to eager, which raises the usual ValueError."""
    if impl == "cpp":
        require_kernel("cpp")
    model = random_model(RWKVConfig(vocab_size=5, n_layer=1, n_embd=4, wkv_impl=impl))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.raises(ValueError, match="integer token ids"):
        compiled(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(torch.full((2, 3), 9))                          # eager: the range check too
    assert kernel.unavailable_reason("cpp") is None or impl == "parallel"


FRESH = textwrap.dedent("""
    import sys
    import rwkv_ref
    assert "torch._dynamo" not in sys.modules, "import rwkv_ref imported torch._dynamo"
    import torch
    from rwkv_ref import RWKVConfig
    from rwkv_ref.recipe import compute_loss
    from rwkv_ref.testing import random_model
    config = RWKVConfig(vocab_size=11, n_layer=2, n_embd=16, dim_att=8, dim_ffn=24,
                        wkv_impl="auto")
    model = random_model(config, seed=1)
    x, y = (torch.randint(0, 11, (2, 9)) for _ in range(2))
    loss = torch.compile(compute_loss, fullgraph=True, backend="eager")(model, x, y)
    loss.backward()
    print("ok", float(loss))
""")


def test_a_fresh_process_compiles_before_any_eager_call():
    """``import rwkv_ref`` leaves dynamo unimported (it costs 1.2 s), and in a fresh process
    whose first call is a fullgraph compile, the kernel's availability check (build and
    self-check) is still kept as a constant rather than traced: kernel.py marks it so by hand,
    and this fails if torch stops honouring the mark. The tests above warm the kernel eagerly
    first, so they would not notice."""
    require_kernel("cpp")
    result = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok ")
