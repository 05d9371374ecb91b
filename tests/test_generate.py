"""Tokenizers, sampling, generation in RNN mode, checkpoints and the command line."""
import dataclasses
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rwkv_ref import CharTokenizer, NeoXTokenizer, RWKVConfig
from rwkv_ref import convert
from rwkv_ref.checkpoint import load_checkpoint
from rwkv_ref.files import FileProblem
from rwkv_ref.generate import main
from rwkv_ref.gpt import GPT, GPTConfig
from rwkv_ref.sampling import sample_next
from rwkv_ref.testing import random_model

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
CFG = RWKVConfig(vocab_size=len(set(TEXT)), n_layer=2, n_embd=16, wkv_impl="parallel")


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=31)


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory):
    """A small byte-level BPE tokenizer file of the same kind as GPT-NeoX's 20B_tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT * 3], trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


# ----------------------------------------------------------------------------- tokenizers


def test_char_tokenizer():
    tok = CharTokenizer(TEXT)
    assert tok.vocab_size == len(set(TEXT))
    assert tok.chars == sorted(tok.chars)
    ids = tok.encode("hear me")
    assert tok.decode(ids) == "hear me"
    assert tok.decode(torch.tensor(ids)) == "hear me"
    again = CharTokenizer.from_dict(tok.to_dict())
    assert again.encode(TEXT) == tok.encode(TEXT)
    with pytest.raises(ValueError, match=r"\['Z', 'x'\]"):
        tok.encode("xZ")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer("")
    with pytest.raises(ValueError, match="sorted"):
        CharTokenizer.from_dict({"type": "char", "chars": "ba"})


def test_neox_tokenizer_wrapper(bpe_json, monkeypatch):
    tok = NeoXTokenizer(bpe_json)
    ids = tok.encode("Before we proceed ü")
    assert tok.decode(ids) == "Before we proceed ü"
    assert 256 <= tok.vocab_size <= 300
    with pytest.raises(FileNotFoundError, match="20B_tokenizer.json"):
        NeoXTokenizer(bpe_json.parent / "missing.json")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        NeoXTokenizer(bpe_json)


# ----------------------------------------------------------------------------- sampling


def test_greedy_is_deterministic_and_follows_gpt_mode(model):
    prompt = torch.tensor([3, 1, 4, 1, 5])
    out = model.generate(prompt, 12, greedy=True)
    assert out.shape == (17,) and torch.equal(out[:5], prompt)
    assert torch.equal(model.generate(prompt, 12, greedy=True), out)
    with torch.no_grad():
        for t in range(5, 17):                   # each new token: argmax of GPT mode's logits
            logits, _ = model(out[None, :t])
            assert int(logits[0, -1].argmax()) == int(out[t])


def test_seeded_sampling_is_reproducible(model):
    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return model.generate([2, 7], 30, temperature=1.5, generator=g)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


@given(temperature=st.floats(0.05, 5.0), seed=st.integers(0, 1000))
def test_top_k_one_and_tiny_top_p_are_greedy(model, temperature, seed):
    prompt = [seed % CFG.vocab_size, 4]
    greedy = model.generate(prompt, 6, greedy=True)
    g = torch.Generator().manual_seed(seed)
    assert torch.equal(model.generate(prompt, 6, temperature=temperature, top_k=1,
                                      generator=g), greedy)
    assert torch.equal(model.generate(prompt, 6, temperature=temperature, top_p=1e-9,
                                      generator=g), greedy)


@given(k=st.integers(1, 8), p=st.floats(0.05, 1.0), seed=st.integers(0, 1000))
def test_samples_stay_in_the_top_k_and_nucleus_sets(k, p, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 12, generator=g)
    draws = torch.stack([sample_next(logits, top_k=k, generator=g) for _ in range(30)])
    allowed = logits.topk(k, dim=-1).indices                               # (4, k)
    assert bool((draws[..., None] == allowed).any(-1).all())
    draws = torch.stack([sample_next(logits, top_p=p, generator=g) for _ in range(30)])
    probs, order = torch.softmax(logits, -1).sort(dim=-1, descending=True)
    size = ((probs.cumsum(-1) - probs) < p).sum(-1)                 # nucleus size per row
    for row in range(4):
        nucleus = set(order[row, :size[row]].tolist())
        assert set(draws[:, row].tolist()) <= nucleus


def test_stream_and_callback_see_the_same_tokens(model):
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    seen = []
    out = model.generate([1, 2, 3], 10, top_k=5, generator=g1, callback=seen.append)
    streamed = list(model.stream([1, 2, 3], 10, top_k=5, generator=g2))
    assert seen == streamed == out[3:].tolist()
    assert all(isinstance(t, int) for t in streamed)


def test_batched_generation_matches_rows(model):
    prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = model.generate(prompts, 7, greedy=True)
    assert out.shape == (2, 10)
    for row in range(2):
        assert torch.equal(out[row], model.generate(prompts[row], 7, greedy=True))
    assert model.generate(prompts, 0).shape == (2, 3)


@pytest.mark.parametrize("prompt, kwargs, message", [
    ([1, CFG.vocab_size], {}, "vocab_size"),
    ([-1], {}, "vocab_size"),
    ([], {}, "empty"),
    (torch.zeros(0, dtype=torch.long), {}, "empty"),
    ([1.5], {}, "ints"),
    (torch.tensor([0.5]), {}, "integer"),
    ([1], {"temperature": 0.0}, "temperature"),
    ([1], {"temperature": -1.0}, "temperature"),
    ([1], {"top_p": 0.0}, "top_p"),
    ([1], {"top_p": 1.5}, "top_p"),
    ([1], {"top_k": 0}, "top_k"),
    ([1], {"max_new_tokens": -1}, "max_new_tokens"),
])
def test_generation_rejects_bad_arguments(model, prompt, kwargs, message):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        model.generate(prompt, **kwargs)
    with pytest.raises(ValueError, match=message):
        model.stream(prompt, **kwargs)                  # checked at the call, not at next()


def test_temperature_zero_is_fine_when_greedy(model):
    assert torch.equal(model.generate([1], 4, temperature=0.0, greedy=True),
                       model.generate([1], 4, greedy=True))


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_config": vars(model.config),
                "tokenizer": CharTokenizer(TEXT).to_dict(), "iter_num": 7}, path)
    return path


def test_load_checkpoint(model, checkpoint):
    loaded, tok = load_checkpoint(checkpoint)
    assert isinstance(tok, CharTokenizer) and tok.vocab_size == CFG.vocab_size
    assert loaded.config == model.config and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_load_checkpoint_errors(model, tmp_path, bpe_json):
    with pytest.raises(FileProblem, match="not found: .*nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")
    partial = tmp_path / "partial.pt"
    torch.save({"model": model.state_dict()}, partial)
    with pytest.raises(FileProblem, match=r"lacks keys \['model_config', 'tokenizer'\]"):
        load_checkpoint(partial)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(partial.read_bytes()[:1000])
    with pytest.raises(FileProblem, match="truncated.pt is truncated or corrupt"):
        load_checkpoint(truncated)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(FileProblem, match="is not a file written by torch.save"):
        load_checkpoint(text)
    odd = tmp_path / "odd.pt"
    torch.save({"model": {}, "model_config": {}, "tokenizer": {}, "model_type": "mamba"}, odd)
    with pytest.raises(ValueError, match="unknown model type 'mamba'"):
        load_checkpoint(odd)
    official = tmp_path / "official.pth"
    convert.save_blinkdl(model, official)
    with pytest.raises(ValueError, match="--tokenizer"):
        load_checkpoint(official)
    big = random_model(RWKVConfig(vocab_size=300, n_layer=1, n_embd=8, wkv_impl="parallel"))
    convert.save_blinkdl(big, official)
    loaded, tok = load_checkpoint(official, tokenizer_path=bpe_json)
    assert isinstance(tok, NeoXTokenizer) and loaded.config.vocab_size == 300


def test_command_line_prints_the_greedy_continuation(model, checkpoint, capsys):
    main(["--checkpoint", str(checkpoint), "--prompt", "First", "--max_new_tokens", "25",
          "--greedy"])
    printed = capsys.readouterr().out
    tok = CharTokenizer(TEXT)
    expected = tok.decode(model.generate(tok.encode("First"), 25, greedy=True))
    assert printed == expected + "\n"


def test_command_line_seeded_sampling_and_errors(checkpoint, capsys):
    args = ["--checkpoint", str(checkpoint), "--prompt", "hear", "--max_new_tokens", "20",
            "--top_p", "0.9", "--top_k", "10", "--temperature", "0.8", "--seed", "3"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first and first.startswith("hear")
    assert main(["--checkpoint", str(checkpoint), "--prompt", "XYZ"]) == 2
    assert "characters not in the vocabulary" in capsys.readouterr().err
    assert main(["--checkpoint", str(checkpoint), "--temperature", "0"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_module_runs_as_a_script(checkpoint):
    result = subprocess.run(
        [sys.executable, "-m", "rwkv_ref.generate", f"--checkpoint={checkpoint}",
         "--prompt=me", "--max_new_tokens=5", "--greedy"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("me") and len(result.stdout) == len("me") + 5 + 1


def test_a_gpt_checkpoint_loads_and_samples_like_the_model_it_saved(tmp_path):
    gpt = GPT(GPTConfig(vocab_size=len(set(TEXT)), n_layer=1, n_embd=8, n_head=2, ctx_len=16))
    path = tmp_path / "gpt.pt"
    torch.save({"model": gpt.state_dict(), "model_type": "gpt",
                "model_config": dataclasses.asdict(gpt.cfg),
                "tokenizer": CharTokenizer(TEXT).to_dict()}, path)
    loaded, tok = load_checkpoint(path)
    prompt = tok.encode("First")
    assert torch.equal(loaded.generate(prompt, 30, greedy=True), gpt.generate(prompt, 30, greedy=True))
