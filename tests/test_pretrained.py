"""rwkv_ref.pretrained: downloads checked before they are kept, sha256 records, the golden check.

Nothing here touches the network: the sources are local files behind ``file://`` URLs (or a
fake response), and the real-weights test runs only when the files are already present.
"""
import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_ref import RWKVConfig, pretrained
from rwkv_ref.files import FileProblem
from rwkv_ref.testing import random_state_dict

SMALL = RWKVConfig(vocab_size=64, n_layer=2, n_embd=16)
SMALL_SIZES = {"n_layer": 2, "n_embd": 16, "vocab_size": 64}
W, T = pretrained.WEIGHTS, pretrained.TOKENIZER


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """A small official-layout checkpoint and a small BPE tokenizer, served by file:// URLs,
    with the checks' expectations set to what these small files are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    src = tmp_path / "source"
    src.mkdir()
    torch.save(random_state_dict(SMALL, seed=3), src / W)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Hello my name is Ada, and my name is short. " * 4],
                            trainers.BpeTrainer(vocab_size=280, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(src / T))
    monkeypatch.setattr(pretrained, "EXPECTED_CONFIG", SMALL_SIZES)
    monkeypatch.setattr(pretrained, "TOKENIZER_VOCAB", tok.get_vocab_size())
    monkeypatch.setattr(pretrained, "HELLO_IDS", tok.encode(pretrained.HELLO).ids)
    serve(monkeypatch, W, src / W)
    serve(monkeypatch, T, src / T)
    return src


def serve(monkeypatch, name, path, size=None):
    """Point ``REMOTES[name]`` at a local file (and a known size, if given)."""
    remote = dataclasses.replace(pretrained.REMOTES[name], url=Path(path).as_uri(), size=size)
    monkeypatch.setitem(pretrained.REMOTES, name, remote)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.tmp"))


# ----------------------------------------------------------------------------- success


def test_download_keeps_the_file_and_its_sha256_record(sources, tmp_path):
    dest = tmp_path / "models"
    for name in (W, T):
        path = pretrained.download(name, dest)
        data = (sources / name).read_bytes()
        assert path == dest / name and path.read_bytes() == data
        record = (dest / f"{name}.sha256").read_text()
        assert record == f"{hashlib.sha256(data).hexdigest()}  {name}\n"
    # the record is in sha256sum's own format: the system tool accepts it
    subprocess.run(["sha256sum", "-c", f"{W}.sha256", f"{T}.sha256"], cwd=dest, check=True,
                   capture_output=True)
    assert leftovers(dest) == []
    model, tokenizer = pretrained.load(dest)        # verified against the records, then loaded
    expected = random_state_dict(SMALL, seed=3)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
    assert tokenizer.decode(tokenizer.encode("my name")) == "my name"


def test_the_destination_appears_only_after_the_checks(sources, tmp_path, monkeypatch):
    dest, seen = tmp_path / "models", []
    real = pretrained.REMOTES[W]

    def spy(path):
        seen.append((path.parent, (dest / W).exists(), (path.stat().st_size)))
        real.check(path)

    monkeypatch.setitem(pretrained.REMOTES, W, dataclasses.replace(real, check=spy))
    pretrained.download(W, dest)
    # checked while in a temporary file beside the destination, complete, not yet renamed
    assert seen == [(dest, False, (sources / W).stat().st_size)]


# ----------------------------------------------------------------------------- failures


def assert_nothing_kept(dest: Path, name: str):
    assert not (dest / name).exists() and not (dest / f"{name}.sha256").exists()
    assert leftovers(dest) == []


def test_a_truncated_download_of_known_size_is_refused(sources, tmp_path, monkeypatch):
    full = (sources / W).read_bytes()
    (sources / "cut.pth").write_bytes(full[: len(full) // 2])
    serve(monkeypatch, W, sources / "cut.pth", size=len(full))
    dest = tmp_path / "models"
    with pytest.raises(pretrained.DownloadProblem,
                       match=rf"got {len(full) // 2:,d} of {len(full):,d} bytes"):
        pretrained.download(W, dest)
    assert_nothing_kept(dest, W)


def test_a_short_response_is_refused_by_its_content_length(sources, tmp_path, monkeypatch):
    class Short:                        # a server that announces 1000 bytes and sends 600
        headers = {"Content-Length": "1000"}
        body = [b"x" * 600, b""]

        def read(self, n):
            return self.body.pop(0)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(pretrained.urllib.request, "urlopen", lambda url, timeout: Short())
    dest = tmp_path / "models"
    with pytest.raises(pretrained.DownloadProblem, match="got 600 of 1,000 bytes"):
        pretrained.download(T, dest)
    assert_nothing_kept(dest, T)


def test_a_truncated_checkpoint_of_unknown_size_fails_the_structure_check(sources, tmp_path,
                                                                          monkeypatch):
    full = (sources / W).read_bytes()
    (sources / "cut.pth").write_bytes(full[: len(full) - 100])
    serve(monkeypatch, W, sources / "cut.pth")
    dest = tmp_path / "models"
    with pytest.raises(pretrained.DownloadProblem, match="does not load as a torch file"):
        pretrained.download(W, dest)
    assert_nothing_kept(dest, W)


def other_sizes(**sizes):
    """A file maker: a random checkpoint of SMALL's sizes but these."""
    config = RWKVConfig(**{**SMALL_SIZES, **sizes})
    return lambda p: torch.save(random_state_dict(config), p)


@pytest.mark.parametrize("make, message", [
    (other_sizes(n_layer=3), r"sizes are \{'n_layer': 3"),
    (other_sizes(n_embd=32), r"'n_embd': 32"),
    (other_sizes(vocab_size=65), r"'vocab_size': 65\}, not the 169M"),
    (lambda p: torch.save({"weight": torch.zeros(3)}, p), "not an RWKV-4 checkpoint"),
    (lambda p: torch.save([torch.zeros(3)], p), "holds a list"),
    (lambda p: p.write_text('{"not": "a checkpoint"}'), "does not load as a torch file"),
])
def test_a_wrong_checkpoint_is_refused(sources, tmp_path, monkeypatch, make, message):
    make(sources / "wrong.pth")
    serve(monkeypatch, W, sources / "wrong.pth")
    dest = tmp_path / "models"
    with pytest.raises(pretrained.DownloadProblem, match=message):
        pretrained.download(W, dest)
    assert_nothing_kept(dest, W)


def test_a_wrong_tokenizer_is_refused(sources, tmp_path, monkeypatch):
    dest = tmp_path / "models"
    serve(monkeypatch, T, sources / W)              # a checkpoint where the tokenizer should be
    with pytest.raises(pretrained.DownloadProblem, match="does not parse as a tokenizer"):
        pretrained.download(T, dest)
    serve(monkeypatch, T, sources / T)
    monkeypatch.setattr(pretrained, "HELLO_IDS", [12092, 619, 1416, 310])   # GPT-NeoX's ids
    with pytest.raises(pretrained.DownloadProblem, match="encodes 'Hello my name is' as"):
        pretrained.download(T, dest)
    monkeypatch.setattr(pretrained, "TOKENIZER_VOCAB", 50277)
    with pytest.raises(pretrained.DownloadProblem, match="tokens, not 50277"):
        pretrained.download(T, dest)
    assert_nothing_kept(dest, T)


def test_a_failed_download_leaves_the_previous_file_alone(sources, tmp_path, monkeypatch):
    dest = tmp_path / "models"
    pretrained.download(W, dest)
    before = (dest / W).read_bytes(), (dest / f"{W}.sha256").read_text()
    serve(monkeypatch, W, sources / T)              # now the source is the wrong file
    with pytest.raises(pretrained.DownloadProblem):
        pretrained.download(W, dest)
    assert ((dest / W).read_bytes(), (dest / f"{W}.sha256").read_text()) == before
    assert leftovers(dest) == []


def test_a_download_killed_earlier_leaves_nothing_after_the_next(sources, tmp_path):
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / f"{W}.x1y2z3.tmp").write_bytes(b"half a checkpoint")   # as SIGKILL would leave it
    pretrained.download(W, dest)
    assert leftovers(dest) == []


def test_an_unreachable_source_is_one_clear_error(sources, tmp_path, monkeypatch):
    serve(monkeypatch, W, sources / "absent.pth")
    dest = tmp_path / "models"
    with pytest.raises(pretrained.DownloadProblem, match="the download of file:.* failed"):
        pretrained.download(W, dest)
    assert_nothing_kept(dest, W)


# ----------------------------------------------------------------------------- later loads


def test_a_file_changed_after_its_download_is_refused(sources, tmp_path):
    dest = tmp_path / "models"
    for name in (W, T):
        pretrained.download(name, dest)
    data = bytearray((dest / W).read_bytes())
    data[-1] ^= 1                                   # one bit flipped
    (dest / W).write_bytes(bytes(data))
    with pytest.raises(FileProblem, match="the file changed; fetch it again"):
        pretrained.verify(dest / W)
    with pytest.raises(FileProblem, match="the file changed"):
        pretrained.load(dest)
    assert leftovers(dest) == []


def test_trust_on_first_use_records_a_file_put_there_by_hand(sources, tmp_path):
    dest = tmp_path / "by_hand"
    dest.mkdir()
    (dest / W).write_bytes((sources / W).read_bytes())
    digest = pretrained.verify(dest / W)
    assert digest == hashlib.sha256((sources / W).read_bytes()).hexdigest()
    assert (dest / f"{W}.sha256").read_text().split() == [digest, W]
    with pytest.raises(FileProblem, match=r"not in .*fetch it with: python -m rwkv_ref"):
        pretrained.verify(dest / T)


def test_the_models_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(pretrained.ENV_VAR, str(tmp_path))
    assert pretrained.paths() == (tmp_path / W, tmp_path / T)
    assert not pretrained.available()
    monkeypatch.delenv(pretrained.ENV_VAR)
    assert pretrained.default_dir() == Path(pretrained.__file__).parents[1] / "models"


# ----------------------------------------------------------------------------- command line


def test_the_command_line_fetches_then_rechecks(sources, tmp_path, capsys):
    dest = tmp_path / "models"
    assert pretrained.main([f"--out={dest}"]) == 0
    assert pretrained.available(dest) and "sha256" in capsys.readouterr().out
    assert pretrained.main([f"--out={dest}"]) == 0           # nothing fetched the second time
    assert capsys.readouterr().out.count("already there, checked") == 2


def test_the_command_line_reports_a_bad_file_in_one_line(sources, tmp_path, monkeypatch,
                                                         capsys):
    serve(monkeypatch, W, sources / T)
    dest = tmp_path / "models"
    assert pretrained.main([f"--out={dest}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rwkv_ref.pretrained: ")
    assert "not the expected file" in err[0]
    assert_nothing_kept(dest, W)
    (dest / W).write_bytes((sources / T).read_bytes())      # a wrong file put there by hand
    assert pretrained.main([f"--out={dest}"]) == 2
    assert "delete it and fetch it" in capsys.readouterr().err


def test_the_module_runs_as_a_command():
    out = subprocess.run([sys.executable, "-m", "rwkv_ref.pretrained", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--out" in out


# ----------------------------------------------------------------------------- real weights

MODELS = pretrained.default_dir()


@pytest.mark.skipif(not pretrained.available(MODELS),
                    reason=f"the RWKV-4 169M Pile files are not in {MODELS}: fetch them with "
                           f"`{pretrained.COMMAND}` (or point ${pretrained.ENV_VAR} at them)")
def test_golden_hello_my_name_is():
    """transformers' RWKV integration test: RWKV/rwkv-4-169m-pile continues "Hello my name is"
    greedily with these 10 tokens. The same weights, loaded from BlinkDL's file by rwkv_ref."""
    model, tokenizer = pretrained.load(MODELS, wkv_impl="parallel")
    prompt = tokenizer.encode("Hello my name is")
    assert prompt == [12092, 619, 1416, 310]
    out = model.generate(prompt, 10, greedy=True)
    assert tokenizer.decode(out[len(prompt):]) == " Jasmine and I am a newbie to the"
