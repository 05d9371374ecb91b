"""rwkv_ref.data: where the text comes from, its hash, the split, the tokenizer and the batches.

Nothing here touches the network: downloads are served from local files through file:// URLs.
"""
import hashlib

import pytest
import torch

from rwkv_ref import data
from rwkv_ref.data import DataError, find_text, get_batch, load_data

N_CHARS, N_TRAIN, N_VAL = 1_115_394, 1_003_854, 111_540


@pytest.fixture(scope="module")
def shakespeare():
    """The local copy of tiny-shakespeare (CI keeps one beside the repository)."""
    for path in (data.SHARED_COPY, data.CACHE_PATH):
        if path.is_file():
            return path
    pytest.skip("no local copy of tiny-shakespeare (see rwkv_ref/data.py)")


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No environment variable, an empty cache and no shared copy: only what a test sets."""
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setattr(data, "CACHE_PATH", tmp_path / "cache" / "tinyshakespeare.txt")
    monkeypatch.setattr(data, "SHARED_COPY", tmp_path / "absent" / "tinyshakespeare.txt")
    return tmp_path


def test_tiny_shakespeare_facts(shakespeare):
    raw = shakespeare.read_bytes()
    assert len(raw) == N_CHARS
    assert hashlib.sha256(raw).hexdigest() == data.TINY_SHAKESPEARE_SHA256
    d = load_data(shakespeare)
    assert d.tokenizer.vocab_size == 65
    assert (len(d.train), len(d.val)) == (N_TRAIN, N_VAL)
    assert d.train.dtype == d.val.dtype == torch.long
    text = raw.decode("utf-8")
    assert d.tokenizer.decode(d.train[-20:]) == text[N_TRAIN - 20:N_TRAIN]
    assert d.tokenizer.decode(d.val[:20]) == text[N_TRAIN:N_TRAIN + 20]


def test_tokenizer_round_trip_on_the_whole_text(shakespeare):
    d = load_data(shakespeare)
    text = shakespeare.read_text(encoding="utf-8")
    assert d.tokenizer.decode(torch.cat([d.train, d.val])) == text


def test_resolution_order(isolated, monkeypatch):
    """explicit path > RWKV_REF_DATA > cache > the shared copy."""
    files = {}
    for name in ("explicit", "env", "cache", "shared"):
        files[name] = isolated / name / "text.txt"
        files[name].parent.mkdir()
        files[name].write_text(name)
    monkeypatch.setattr(data, "CACHE_PATH", files["cache"])
    monkeypatch.setattr(data, "SHARED_COPY", files["shared"])
    monkeypatch.setattr(data, "check_sha256", lambda *args, **kwargs: None)
    assert find_text() == files["cache"]
    files["cache"].unlink()
    assert find_text() == files["shared"]
    monkeypatch.setenv(data.DATA_ENV, str(files["env"]))
    assert find_text() == files["env"]
    assert find_text(files["explicit"]) == files["explicit"]


def test_any_utf8_text_is_accepted_without_a_hash(isolated):
    path = isolated / "poem.txt"
    text = "Ünïcödé lines, ½ and ∑.\n" * 10
    path.write_text(text, encoding="utf-8")
    d = load_data(path)
    assert d.tokenizer.vocab_size == len(set(text))
    assert len(d.train) == int(0.9 * len(text)) and len(d.train) + len(d.val) == len(text)
    assert d.tokenizer.decode(torch.cat([d.train, d.val])) == text


def test_missing_or_binary_file_is_a_clear_error(isolated):
    with pytest.raises(DataError, match="not a file"):
        find_text(isolated / "nope.txt")
    binary = isolated / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(DataError, match="not UTF-8"):
        load_data(binary)


def test_corrupted_cache_fails_the_hash(isolated, shakespeare):
    data.CACHE_PATH.parent.mkdir(parents=True)
    corrupted = bytearray(shakespeare.read_bytes())
    corrupted[1000] ^= 1
    data.CACHE_PATH.write_bytes(bytes(corrupted))
    with pytest.raises(DataError, match="sha256") as err:
        find_text()
    assert str(data.CACHE_PATH) in str(err.value)     # says where to put a good copy


def test_download_into_the_cache(isolated, shakespeare, monkeypatch):
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_URL", shakespeare.as_uri())
    path = find_text()
    assert path == data.CACHE_PATH
    assert path.read_bytes() == shakespeare.read_bytes()
    assert list(path.parent.iterdir()) == [path]           # no temporary file left behind
    assert find_text() == path                             # the second time, from the cache


def test_download_with_a_wrong_hash_leaves_nothing(isolated, shakespeare, monkeypatch):
    bad = isolated / "bad.txt"
    bad.write_bytes(shakespeare.read_bytes()[:-1])
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_URL", bad.as_uri())
    with pytest.raises(DataError, match="sha256"):
        find_text()
    assert not data.CACHE_PATH.exists()
    assert list(data.CACHE_PATH.parent.iterdir()) == []


def test_failed_download_says_where_to_put_the_file(isolated, monkeypatch):
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_URL", (isolated / "missing.txt").as_uri())
    with pytest.raises(DataError, match="could not download") as err:
        find_text()
    assert str(data.CACHE_PATH) in str(err.value) and data.DATA_ENV in str(err.value)
    assert not data.CACHE_PATH.exists()


def test_batches_are_shifted_windows():
    ids = torch.arange(1000)                      # each window is a run of consecutive ids
    g = torch.Generator().manual_seed(0)
    x, y = get_batch(ids, batch_size=7, ctx_len=33, generator=g)
    assert x.shape == y.shape == (7, 33) and x.dtype == torch.long
    assert torch.equal(y, x + 1)                  # the next token
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(7, 32, dtype=torch.long))
    assert int(y.max()) < 1000
    assert len(set(x[:, 0].tolist())) > 1         # random starts


def test_batches_are_deterministic_per_seed():
    ids = torch.arange(5000)

    def batches(seed):
        g = torch.Generator().manual_seed(seed)
        return [get_batch(ids, 4, 16, g)[0] for _ in range(3)]

    same, other = batches(1), batches(2)
    assert all(torch.equal(a, b) for a, b in zip(batches(1), same))
    assert not torch.equal(same[0], other[0])
    assert not torch.equal(same[0], same[1])      # the generator moves on


def test_every_start_can_be_drawn():
    ids = torch.arange(12)
    g = torch.Generator().manual_seed(0)
    x, y = get_batch(ids, batch_size=500, ctx_len=4, generator=g)
    assert set(x[:, 0].tolist()) == set(range(12 - 4))    # the last window ends at ids[-1]
    with pytest.raises(ValueError, match="ctx_len"):
        get_batch(ids, 1, 12, g)
