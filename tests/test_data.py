"""Reading data, tokenising it into samples, the on-disk cache and the epoch order."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time

import numpy as np
import pytest
import torch

from mmnb import corpus
from mmnb.data import (
    IGNORE_INDEX,
    DataError,
    build_dataset,
    data_fingerprint,
    epoch_order,
    read_records,
    resolve_data_path,
    tokenizer_for,
    training_texts,
)
from mmnb.tokenizer import Tokenizer, render_chat

CONVERSATIONS = [
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Where does Mira live?"},
        {"role": "assistant", "content": "Mira lives in Oakvale."},
        {"role": "user", "content": "What is 3 plus 4?"},
        {"role": "assistant", "content": "3 plus 4 is 7."},
    ],
    [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": " Hello! 🐱\n\nHow can I help?  "},
    ],
    [
        {"role": "user", "content": "Say <|im_end|> please"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Count."},
        {"role": "assistant", "content": "1, 2, 3."},
    ],
]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMNB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(corpus.generate_pretrain(num_docs=200), vocab_size=400)


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path, records: list) -> str:
    write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return str(path)


class NoEncoding:
    """Looks like `tok` (same fingerprint) but fails if asked to tokenise anything."""

    def __init__(self, tok: Tokenizer) -> None:
        self._tok = tok
        self.fingerprint, self.pad_id = tok.fingerprint, tok.pad_id
        self.bos_id, self.eos_id = tok.bos_id, tok.eos_id
        self.vocab_size = tok.vocab_size

    def encode(self, text):
        raise AssertionError("tokenised again")

    encode_batch = encode


# ---- reading --------------------------------------------------------------------------------


def test_read_jsonl_pretrain_and_sft(tmp_path):
    path = write(tmp_path / "p.jsonl", '{"text": "a"}\n\n   \n{"text": "b\\u2028c", "id": 3}\n')
    assert read_records(path) == ("pretrain", ["a", "b\u2028c"])
    sft = jsonl(tmp_path / "s.jsonl", [{"conversations": c} for c in CONVERSATIONS])
    assert read_records(sft) == ("sft", CONVERSATIONS)


def test_read_txt_paragraphs_and_folders(tmp_path):
    path = write(tmp_path / "a.txt", "first doc\nline two\n\n\n  \nsecond doc\n\n")
    assert read_records(path) == ("pretrain", ["first doc\nline two", "second doc"])
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    write(folder / "b.txt", "bee")
    write(folder / "sub" / "a.txt", "sub a\n\nsub a2")
    write(folder / "a.txt", "ay")
    write(folder / "notes.md", "ignored")
    assert read_records(folder) == ("pretrain", ["ay", "bee", "sub a", "sub a2"])


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n\n{"text": oops}\n', r"bad\.jsonl:3: invalid JSON"),
        ('{"text": "ok"}\n{"conversations": [{"role": "user", "content": "q"}, '
         '{"role": "assistant", "content": "a"}]}\n', r"bad\.jsonl:2: sft record in a pretrain"),
        ('{"text": "ok"}\n{"txt": "typo"}\n', r"bad\.jsonl:2: record needs a 'text' or"),
        ('{"text": 5}\n', r"bad\.jsonl:1: 'text' must be a string"),
        ('["text"]\n', r"bad\.jsonl:1: expected a JSON object, got list"),
        ('{"conversations": []}\n', r"bad\.jsonl:1: 'conversations' must be a non-empty list"),
        ('{"conversations": [{"role": "bot", "content": "x"}]}\n', r":1: conversations\[0\] has"),
        ('{"conversations": [{"role": "user"}]}\n', r":1: conversations\[0\] needs a string"),
        ('{"conversations": [{"role": "user", "content": "x"}]}\n', r":1: .*no assistant message"),
        ('{"text": "a", "conversations": []}\n', r":1: record has both"),
        ("\n  \n", r"bad\.jsonl: no records"),
    ],
)  # fmt: skip
def test_read_jsonl_errors_name_file_and_line(tmp_path, content, message):
    path = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError, match=message) as err:
        read_records(path)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_read_other_errors(tmp_path):
    with pytest.raises(DataError, match=r"^data file not found: .*missing\.jsonl$"):
        read_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="unsupported data file type"):
        read_records(write(tmp_path / "x.csv", "a,b"))
    with pytest.raises(DataError, match="no documents"):
        read_records(write(tmp_path / "empty.txt", "\n \n\n"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="folder has no .txt files"):
        read_records(tmp_path / "nothing")
    (tmp_path / "latin1.txt").write_bytes(b"ok\nalso ok\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"latin1\.txt:3: not valid UTF-8"):
        read_records(tmp_path / "latin1.txt")


def test_resolve_data_path(tmp_path, monkeypatch):
    assert resolve_data_path(None) == corpus.PRETRAIN_PATH
    assert resolve_data_path("bundled:pretrain") == corpus.PRETRAIN_PATH
    assert resolve_data_path("chat") == resolve_data_path("bundled:chat") == corpus.CHAT_PATH
    assert resolve_data_path("some/file.jsonl").as_posix() == "some/file.jsonl"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_data_path("~/d.txt") == tmp_path / "d.txt"
    with pytest.raises(DataError, match="unknown bundled data 'bundled:nope'"):
        resolve_data_path("bundled:nope")


def test_data_fingerprint(tmp_path):
    path = write(tmp_path / "a.txt", "hello")
    assert data_fingerprint(path) == hashlib.sha256(b"hello").hexdigest()
    folder = tmp_path / "f"
    folder.mkdir()
    write(folder / "x.txt", "ab")
    write(folder / "y.txt", "c")
    first = data_fingerprint(folder)
    assert data_fingerprint(folder) == first
    write(folder / "x.txt", "a")
    write(folder / "y.txt", "bc")  # same bytes overall, split differently
    assert data_fingerprint(folder) != first
    (folder / "y.txt").rename(folder / "z.txt")
    assert data_fingerprint(folder) not in (first,)
    with pytest.raises(DataError, match="data file not found"):
        data_fingerprint(tmp_path / "gone.txt")


def test_fingerprint_of_an_unchanged_file_is_remembered_exactly(tmp_path, monkeypatch):
    from mmnb import records

    monkeypatch.setattr(records, "_SETTLED", 0.05)
    monkeypatch.setattr(records, "_fingerprints", {})
    memo = tmp_path / "memo"
    path = write(tmp_path / "d.txt", "hello world")
    assert data_fingerprint(path, memo) == hashlib.sha256(b"hello world").hexdigest()
    assert not memo.exists()  # just written: its timestamp cannot vouch for its bytes yet
    time.sleep(0.1)
    real = data_fingerprint(path, memo)
    (saved,) = memo.iterdir()
    # A fresh process trusts the memo while the file's identity (inode, size, times) holds.
    records._fingerprints.clear()
    saved.write_text(saved.read_text().replace(real, "f" * 64))
    assert data_fingerprint(path, memo) == "f" * 64
    # Same size, other bytes, mtime set back: the ctime still moved, so it is hashed again.
    before = path.stat()
    path.write_text("HELLO WORLD", encoding="utf-8")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    assert data_fingerprint(path, memo) == hashlib.sha256(b"HELLO WORLD").hexdigest()


def test_training_texts():
    assert training_texts("pretrain", ["a", "b"]) == ["a", "b"]
    assert training_texts("sft", CONVERSATIONS[:1]) == [render_chat(CONVERSATIONS[0])]


# ---- samples --------------------------------------------------------------------------------


def test_pretrain_stream_is_cut_into_exact_chunks(tmp_path, tok):
    docs = ["Mira walked to the market.", "Pip purred.", "Snow fell on Oakvale all day long."]
    path = write(tmp_path / "d.txt", "\n\n".join(docs))
    stream = [t for d in docs for t in [tok.bos_id] + tok.encode(d) + [tok.eos_id]]
    ds = build_dataset(str(path), tok, seq_len=8)
    n = len(stream) // 8
    assert ds.kind == "pretrain" and len(ds) == n and ds.num_tokens == n * 8
    x, y = ds.batch(np.arange(n))
    assert x.dtype == y.dtype == torch.int64 and x.shape == (n, 8)
    assert x.flatten().tolist() == stream[: n * 8]
    assert torch.equal(x, y)  # not shifted: the model shifts
    x2, _ = ds.batch([2, 0])
    assert torch.equal(x2, x[[2, 0]])
    with pytest.raises(IndexError):
        ds.batch([n])
    with pytest.raises(IndexError):
        ds.batch([-1])


def test_sft_labels_supervise_exactly_the_assistant_replies(tmp_path, tok):
    path = jsonl(tmp_path / "c.jsonl", [{"conversations": c} for c in CONVERSATIONS])
    ds = build_dataset(path, tok, seq_len=256)
    assert ds.kind == "sft" and len(ds) == len(CONVERSATIONS)
    ids, labels = ds.batch(np.arange(len(ds)))
    assert ids.shape == labels.shape == (3, 256)
    total = 0
    for conv, row, lab in zip(CONVERSATIONS, ids.tolist(), labels.tolist(), strict=True):
        rendered = render_chat(conv)
        n = next(i for i in range(len(row), 0, -1) if row[i - 1] != tok.pad_id)
        assert tok.decode(row[:n]) == rendered
        assert row[n:] == [tok.pad_id] * (256 - n) and lab[n:] == [IGNORE_INDEX] * (256 - n)
        sup = [i for i, v in enumerate(lab) if v != IGNORE_INDEX]
        assert all(lab[i] == row[i] for i in sup)
        replies = [m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"]
        assert tok.decode([row[i] for i in sup]) == "".join(replies)
        # Each supervised run starts right after an assistant header and ends at <|im_end|>.
        runs = np.split(np.array(sup), np.flatnonzero(np.diff(sup) != 1) + 1)
        assert len(runs) == len(replies)
        for run in runs:
            assert tok.decode(row[: run[0]]).endswith("<|im_start|>assistant\n")
            assert row[run[-1]] == tok.eos_id and tok.decode([row[run[-1] + 1]]) == "\n"
        total += len(sup)
    assert ds.num_tokens == total


def test_sft_truncates_to_seq_len(tmp_path, tok):
    path = jsonl(tmp_path / "c.jsonl", [{"conversations": c} for c in CONVERSATIONS])
    full_ids, full_labels = build_dataset(path, tok, seq_len=256).batch([0, 1, 2])
    ids, labels = build_dataset(path, tok, seq_len=12).batch([0, 1, 2])
    assert torch.equal(ids, full_ids[:, :12]) and torch.equal(labels, full_labels[:, :12])


def test_second_build_loads_the_cache_without_tokenising(tmp_path, tok, cache):
    path = jsonl(tmp_path / "c.jsonl", [{"conversations": c} for c in CONVERSATIONS])
    first = build_dataset(path, tok, seq_len=64)
    files = sorted((cache / "tokens").iterdir())
    assert [f.name[:3] for f in files] == ["v2-"]  # one entry, no temporary folder left behind
    assert sorted(p.name for p in files[0].iterdir()) == [
        "meta.json",
        "offsets.bin",
        "supervised.bin",
        "tokens.bin",
    ]
    for seq_len in (64, 16):  # one cache entry serves every seq_len
        again = build_dataset(path, NoEncoding(tok), seq_len=seq_len)
        assert again.kind == "sft" and len(again) == len(first)
    again = build_dataset(path, NoEncoding(tok), seq_len=64)
    assert again.fingerprint == first.fingerprint
    for a, b in zip(first.batch([0, 1, 2]), again.batch([0, 1, 2]), strict=True):
        assert torch.equal(a, b)
    assert build_dataset(path, tok, seq_len=16).fingerprint != first.fingerprint
    text = write(tmp_path / "d.txt", "one two three four five six seven eight nine ten")
    first = build_dataset(str(text), tok, seq_len=4)
    again = build_dataset(str(text), NoEncoding(tok), seq_len=4)
    assert torch.equal(first.batch([0])[0], again.batch([0])[0])
    with pytest.raises(AssertionError, match="tokenised again"):  # changed data re-tokenises
        build_dataset(str(write(text, "new words here")), NoEncoding(tok), seq_len=4)


def test_data_too_short_for_one_sample(tmp_path, tok):
    with pytest.raises(DataError, match=r"tokens make no sample of max_seq_len 512"):
        build_dataset(str(write(tmp_path / "d.txt", "tiny")), tok, seq_len=512)


def test_tokenizer_for_trains_once_then_loads(tmp_path, monkeypatch, cache):
    path = write(tmp_path / "d.txt", "\n\n".join(corpus.generate_pretrain(num_docs=60)))
    calls = []
    real_train = Tokenizer.train.__func__
    monkeypatch.setattr(Tokenizer, "train", classmethod(lambda c, *a: calls.append(1) or
                                                        real_train(c, *a)))  # fmt: skip
    first = tokenizer_for(str(path), 300)
    second = tokenizer_for(str(path), 300)
    assert len(calls) == 1 and first.fingerprint == second.fingerprint
    assert first.vocab_size == 300
    tokenizer_for(str(path), 320)
    assert len(calls) == 2  # another vocab size is another tokenizer
    assert len(list((cache / "tokenizers").iterdir())) == 2
    saved = tmp_path / "tok.json"
    first.save(saved)
    assert tokenizer_for(None, 999, tokenizer_path=str(saved)).fingerprint == first.fingerprint
    with pytest.raises(DataError, match="tokenizer file not found"):
        tokenizer_for(None, 999, tokenizer_path=str(tmp_path / "none.json"))


def test_bundled_corpus_with_the_tiny_preset(cache):
    tok = tokenizer_for(None, 1024)
    assert tok.vocab_size == 1024
    ds = build_dataset(None, tok, seq_len=128)
    assert ds.kind == "pretrain" and len(ds) > 3000
    chat = build_dataset("chat", tok, seq_len=128)
    assert chat.kind == "sft" and len(chat) == corpus.DEFAULT_NUM_CONVERSATIONS


# ---- epoch order ----------------------------------------------------------------------------


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    a = epoch_order(1000, seed=1337, epoch=0)
    assert a.dtype == np.int64 and sorted(a.tolist()) == list(range(1000))
    np.random.seed(0)
    random.seed(0)
    torch.manual_seed(0)
    assert np.array_equal(epoch_order(1000, 1337, 0), a)
    np.random.seed(1)
    assert np.array_equal(epoch_order(1000, 1337, 0), a)
    assert not np.array_equal(epoch_order(1000, 1337, 1), a)
    assert not np.array_equal(epoch_order(1000, 1338, 0), a)
    expected = np.random.Generator(np.random.PCG64([1337, 0])).permutation(1000)
    assert np.array_equal(a, expected)
    assert epoch_order(0, 1, 2).tolist() == []
    with pytest.raises(ValueError):
        epoch_order(10, -1, 0)
