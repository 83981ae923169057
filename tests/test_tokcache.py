"""The streaming token cache: same tokens as tokenising in memory, bounded memory, mapped files,
atomic entries, progress as events."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mmnb
from mmnb import corpus, records, tokcache
from mmnb.data import build_dataset, tokenizer_for
from mmnb.progress import ConsoleProgress
from mmnb.records import DataError, iter_records, tokenizer_sample
from mmnb.tokenizer import BOS_TOKEN, Tokenizer


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMNB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def expected_pretrain(tok: Tokenizer, path) -> list[int]:
    """The definition, one document at a time with plain `encode`: [bos] doc [eos] ..."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out += [tok.bos_id, *tok.encode(json.loads(line)["text"]), tok.eos_id]
    return out


def expected_sft(tok: Tokenizer, path) -> tuple[list[int], list[int], list[int]]:
    ids, sup, offsets = [], [], [0]
    with open(path, encoding="utf-8") as f:
        for line in f:
            for m in json.loads(line)["conversations"]:
                head = tok.encode(f"{BOS_TOKEN}{m['role']}\n")
                body = tok.encode(m["content"]) + [tok.eos_id]
                nl = tok.encode("\n")
                ids += head + body + nl
                sup += [0] * len(head) + [int(m["role"] == "assistant")] * len(body) + [0] * len(nl)
            offsets.append(len(ids))
    return ids, sup, offsets


def test_streamed_cache_equals_in_memory_tokenisation_of_the_bundled_data(cache):
    tok = tokenizer_for(None, 1024)
    # Small chunks and read blocks, so chunk and block boundaries fall everywhere.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokcache, "_CHUNK_CHARS", 20_000)
        mp.setattr(records, "_BLOCK", 65_536)
        ds = build_dataset(None, tok, seq_len=128)
        chat = build_dataset("chat", tok, seq_len=128)
    assert isinstance(ds._tokens, np.memmap) and ds._tokens.dtype == np.uint16  # mapped
    assert ds._tokens.tolist() == expected_pretrain(tok, corpus.PRETRAIN_PATH)
    ids, sup, offsets = expected_sft(tok, corpus.CHAT_PATH)
    assert chat._tokens.tolist() == ids and chat._supervised.tolist() == sup
    assert chat._starts.tolist() == offsets[:-1]
    # The fingerprint semantics are unchanged: sha256 of "data|tokenizer|seq_len|kind".
    data_fp = hashlib.sha256(corpus.PRETRAIN_PATH.read_bytes()).hexdigest()
    key = f"{data_fp}|{tok.fingerprint}|128|pretrain"
    assert ds.fingerprint == hashlib.sha256(key.encode()).hexdigest()
    # ... and so is the cache key: one entry per (data, tokenizer), found again.
    entry = tokcache.entry_path(cache, data_fp, tok.fingerprint)
    assert entry.is_dir() and json.loads((entry / "meta.json").read_text())["data"] == data_fp
    again = build_dataset(None, tok, seq_len=64)
    assert np.array_equal(again._tokens, ds._tokens)
    assert len(list((cache / "tokens").iterdir())) == 2  # pretrain and chat, nothing else


def test_line_endings_bom_and_blocks_do_not_change_records(tmp_path, monkeypatch):
    docs = ["première ligne\nsuite 🐱", "β" * 40, "tail  "]
    text = "\ufeff" + "\r\n \r\n".join(docs).replace("\n", "\r\n") + "\r\n\r\n"
    (tmp_path / "a.txt").write_bytes(text.encode("utf-8"))
    lines = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\r\n" for d in docs)
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode("utf-8"))
    for block in (3, 7, 64, 1 << 20):  # blocks split \r\n pairs and multi-byte characters
        monkeypatch.setattr(records, "_BLOCK", block)
        assert [r for _, r in iter_records(tmp_path / "a.txt")] == [d.strip() for d in docs]
        assert [r for _, r in iter_records(tmp_path / "a.jsonl")] == docs


def test_paragraphs_split_as_the_blank_line_rule(tmp_path):
    # The rule: documents are separated by lines holding only spaces/tabs, then stripped.
    rng = random.Random(0)
    for i in range(200):
        text = "".join(
            rng.choice(["a", "b", " ", "\t", "\n", "\n", "\xa0", "\f"]) for _ in range(40)
        )
        path = tmp_path / f"{i}.txt"
        path.write_text(text, encoding="utf-8", newline="")
        pieces = re.split(r"\n[ \t\f\v]*(?:\n[ \t\f\v]*)+", text)
        expected = [p.strip() for p in pieces if p.strip()]
        if expected:
            assert [r for _, r in iter_records(path)] == expected, repr(text)


def test_tokenizer_training_reads_a_bounded_sample(tmp_path):
    lines = [json.dumps({"text": f"document {i:05d} " + "word " * 20}) + "\n" for i in range(4000)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    small = list(tokenizer_sample(path, budget=path.stat().st_size))
    assert len(small) == 4000  # data within the budget is used whole
    sample = list(tokenizer_sample(path, budget=64_000))
    assert 64_000 * 0.5 < sum(map(len, sample)) < 64_000 * 1.5
    numbers = [int(t.split()[1]) for t in sample]
    assert numbers[0] == 0 and numbers[-1] > 3800  # windows span the file, whole lines only
    assert sample == list(tokenizer_sample(path, budget=64_000))  # a pure function of the data


def test_failed_preparation_leaves_no_entry_and_abandoned_ones_are_removed(tmp_path, cache):
    tok = Tokenizer.train(["a b c"], vocab_size=300)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n' * 3000 + "{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3001: invalid JSON"):
        build_dataset(str(bad), tok, seq_len=4)
    assert list((cache / "tokens").iterdir()) == []
    # A folder left by a killed process (its pid is gone) is removed by the next preparation.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    abandoned = cache / "tokens" / f".v2-x-y.{dead}.abcd"
    abandoned.mkdir()
    good = tmp_path / "good.txt"
    good.write_text("one two three four five six", encoding="utf-8")
    build_dataset(str(good), tok, seq_len=4)
    assert not abandoned.exists()


def test_preparation_reports_progress_as_events(tmp_path, store):
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in corpus.generate_pretrain(0, 300))
    )
    events = []
    mmnb.train("p", store=store, data=str(data), vocab_size=300, max_steps=1,
               listeners=[events.append], **{"hidden_size": 32, "layers": 1, "heads": 2,
               "kv_heads": 1, "intermediate_size": 64, "max_seq_len": 32})  # fmt: skip
    prep = [e.info for e in events if e.kind == "prepare"]
    assert prep[0]["stage"] == "tokenizer" and prep[0]["total"] == data.stat().st_size
    tokenize = [p for p in prep if p["stage"] == "tokenize"]
    assert tokenize and tokenize[-1]["bytes"] == tokenize[-1]["total"] == data.stat().st_size
    assert tokenize[-1]["tokens"] > 0
    assert [e.kind for e in events].index("start") > [e.kind for e in events].index("prepare")
    # The console renders it: a bar in bytes, then the training bar.
    out = _Capture()
    progress = ConsoleProgress(file=out, prepare_delay=0)
    for event in events:
        progress(event)
    assert "training a tokenizer" in out.text and "preparing data" in out.text


class _Capture:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def test_200mb_jsonl_prepares_in_bounded_memory(tmp_path):
    """A child process prepares a 200 MB JSONL; its peak RSS (getrusage of a child of a small
    launcher, so nothing is inherited from this big test process) stays within 160 MiB of what
    it held before preparing. Tokenising in memory needed ~400 MiB more on this file."""
    path = tmp_path / "big.jsonl"
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(100)) for _ in range(8)]
    # Long repeated words tokenise fast; the unused field makes the lines long, as MiniMind's
    # metadata does, so the file is 200 MB without hours of tokenising.
    block = "".join(
        json.dumps({"text": " ".join(rng.choice(words) for _ in range(30)), "meta": "x" * 12000})
        + "\n"
        for _ in range(64)
    ).encode()
    with open(path, "wb") as f:
        for _ in range(200 * 2**20 // len(block)):
            f.write(block)
    worker = textwrap.dedent(f"""
        import json, sys
        from mmnb.data import build_dataset
        from mmnb.tokenizer import Tokenizer
        def hwm():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
        tok = Tokenizer.train([" ".join({words!r})] * 20, vocab_size=1200)
        before = hwm()
        ds = build_dataset({str(path)!r}, tok, seq_len=64)
        print(json.dumps({{"before_kib": before, "tokens": len(ds._tokens)}}))
    """)
    launcher = textwrap.dedent("""
        import json, resource, subprocess, sys
        out = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        result = json.loads(out.stdout)
        result["peak_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        print(json.dumps(result))
    """)
    env = {**os.environ, "MMNB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", launcher, worker], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    grew_mib = (result["peak_kib"] - result["before_kib"]) / 1024
    assert result["tokens"] > 600_000
    assert grew_mib < 160, f"preparing 200 MB grew the peak RSS by {grew_mib:.0f} MiB"
