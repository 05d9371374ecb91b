"""Bad input at every command line ends in ONE line on stderr naming the problem and what to
do, and a non-zero exit; ``--debug`` shows the traceback instead.

The command lines run as subprocesses where the process boundary is the thing tested (exit
status, nothing else on stderr); the rest call ``main`` in this process, which is the same code.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_ref import compare, generate, train

REPO = Path(__file__).resolve().parents[1]
TINY = ["--n_layer=1", "--n_embd=16", "--ctx_len=8", "--batch_size=4", "--max_iters=2",
        "--eval_interval=2", "--eval_iters=1", "--sample_tokens=0", "--wkv_impl=parallel",
        "--num_threads=1"]


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def one_line(err: str) -> str:
    """The single line of ``err``; fails if there are more lines or a traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def main_error(main, argv, capsys) -> tuple[int, str]:
    """(exit status, the one line on stderr) of ``main(argv)`` in this process."""
    status = main(argv)
    return status, one_line(capsys.readouterr().err)


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("to be or not to be " * 20, encoding="utf-8")   # 380 characters
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_preset_without_cuda(tmp_path):
    done = cli("rwkv_ref.train", "--preset=gpu", f"--out_dir={tmp_path}")
    line = one_line(done.stderr)
    assert done.returncode == 2
    assert "CUDA is not available" in line and "--device=cpu" in line and "cpu" in line
    assert not any(tmp_path.iterdir())                # nothing was written


def test_debug_shows_the_traceback(tmp_path):
    done = cli("rwkv_ref.train", "--preset=gpu" if not torch.cuda.is_available()
               else "--device=cuda:99", f"--out_dir={tmp_path}", "--debug")
    assert done.returncode != 0 and "Traceback" in done.stderr
    assert "ConfigError" in done.stderr


def test_text_shorter_than_the_context(text, tmp_path, capsys):
    status, line = main_error(train.main, [f"--data={text}", *TINY, "--ctx_len=64",
                                           f"--out_dir={tmp_path / 'out'}"], capsys)
    assert status == 2
    assert str(text) in line and "380 characters" in line and "ctx_len + 1 = 65" in line
    assert "--ctx_len" in line


def test_text_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait ".encode("latin-1") * 100)
    status, line = main_error(train.main, [f"--data={path}", *TINY,
                                           f"--out_dir={tmp_path / 'out'}"], capsys)
    assert status == 2 and str(path) in line and "not UTF-8" in line and "0xe9" in line


def test_missing_and_empty_text(tmp_path, capsys):
    status, line = main_error(train.main, [f"--data={tmp_path / 'nope.txt'}", *TINY], capsys)
    assert status == 2 and "nope.txt" in line and "not a file" in line
    (tmp_path / "empty.txt").write_text("")
    status, line = main_error(train.main, [f"--data={tmp_path / 'empty.txt'}", *TINY], capsys)
    assert status == 2 and "empty" in line


def test_resume_without_a_checkpoint(text, tmp_path, capsys):
    out = tmp_path / "never_trained"
    status, line = main_error(train.main, [f"--data={text}", *TINY, "--resume",
                                           f"--out_dir={out}"], capsys)
    assert status == 2 and str(out / "ckpt.pt") in line and "--resume" in line


@pytest.mark.parametrize("argv, words", [
    (["--n_layr=2"], ["unknown option --n_layr", "--n_layer"]),
    (["--lr=fast"], ["--lr expects float"]),
    (["--model=lstm"], ["--model must be one of"]),
    (["--emb_init=zero"], ["--emb_init must be one of"]),
    (["--device=tpu"], ["--device must be"]),
    (["n_layer=2"], ["--key=value"]),
])
def test_bad_options(argv, words, text, tmp_path, capsys):
    status, line = main_error(train.main, [f"--data={text}", *TINY,
                                           f"--out_dir={tmp_path}", *argv], capsys)
    assert status == 2 and all(w in line for w in words), line


@pytest.mark.parametrize("content, words", [
    (b"", ["is empty"]),
    (b"this is not a checkpoint", ["not a file written by torch.save"]),
    (None, ["truncated or corrupt"]),                  # the first half of a real checkpoint
])
def test_generate_on_a_bad_checkpoint(content, words, tmp_path):
    path = tmp_path / "ckpt.pt"
    if content is None:
        torch.save({"model": {"w": torch.zeros(1000)}}, path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    done = cli("rwkv_ref.generate", f"--checkpoint={path}", "--max_new_tokens=5")
    line = one_line(done.stderr)
    assert done.returncode == 2 and str(path) in line and all(w in line for w in words), line
    assert done.stdout == ""


def test_generate_on_a_missing_checkpoint_and_a_bad_prompt(text, tmp_path, capsys):
    status, line = main_error(generate.main, [f"--checkpoint={tmp_path / 'none.pt'}"], capsys)
    assert status == 2 and "not found" in line and "none.pt" in line
    assert train.main([f"--data={text}", *TINY, f"--out_dir={tmp_path}"]) == 0
    capsys.readouterr()
    status, line = main_error(generate.main, [f"--checkpoint={tmp_path / 'ckpt.pt'}",
                                              "--prompt=XYZ", "--max_new_tokens=3"], capsys)
    assert status == 2 and "X" in line
    status, line = main_error(generate.main, [f"--checkpoint={tmp_path / 'ckpt.pt'}",
                                              "--prompt=to", "--top_p=7", "--max_new_tokens=3"], capsys)
    assert status == 2 and "top_p" in line


def test_compare_and_bench_bad_input(capsys):
    status, line = main_error(compare.main, ["--lrs=fast"], capsys)
    assert status == 2 and "--lrs" in line
    status, line = main_error(compare.main, ["--seeds=0"], capsys)
    assert status == 2 and "--seeds" in line
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "wkvv"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    line = one_line(done.stderr)
    assert done.returncode == 2 and "wkvv" in line and "choose from" in line
