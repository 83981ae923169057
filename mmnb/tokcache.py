"""The on-disk token cache: data tokenised once, streamed into memory-mapped files.

One entry per (data, tokenizer) — `<cache>/tokens/v2-<data sha256[:32]>-<tokenizer
sha256[:32]>/`, independent of seq_len — holds

    tokens.bin       every token, uint16 when the vocabulary fits, else int32
    offsets.bin      int64 [records + 1]: where each document / conversation starts
    supervised.bin   sft only: uint8 per token, 1 where the loss applies
    meta.json        version, kind, dtype, counts and the full fingerprints; written last

Preparing reads the data in bounded chunks: while one chunk is encoded (the tokenizer's
`encode_batch` runs in parallel and releases the GIL), the next one is read and parsed, and the
one before is appended to the files. Memory stays bounded by a few chunks whatever the data's
size. The entry is built in a temporary folder and renamed into place, so a reader (another
kernel) sees a whole entry or none; training maps the files and reads only the pages it uses.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from .durable import fsync
from .records import Progress, iter_records
from .tokenizer import BOS_TOKEN, ROLES, Tokenizer

CACHE_VERSION = 2  # bump when the cached arrays' meaning or layout changes
_CHUNK_CHARS = 4 << 20  # characters of text per encode_batch call
_CHUNK_RECORDS = 8192  # ... or this many records, whichever comes first
_UINT16_VOCAB = 1 << 16

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class Chunk:
    tokens: np.ndarray  # the chunk's tokens, in the entry's dtype
    lengths: np.ndarray  # int64 tokens per record
    supervised: np.ndarray | None  # uint8 per token (sft)


def entry_path(root: Path, data_fp: str, tok_fp: str) -> Path:
    return root / "tokens" / f"v{CACHE_VERSION}-{data_fp[:32]}-{tok_fp[:32]}"


def load(entry: Path, data_fp: str, tok_fp: str) -> tuple[str, dict[str, np.ndarray]] | None:
    """(kind, arrays) of a complete entry, memory-mapped; None when missing, of another version
    or damaged (the caller rebuilds it)."""
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(meta, dict)
        or meta.get("version") != CACHE_VERSION
        or (meta.get("data"), meta.get("tokenizer")) != (data_fp, tok_fp)
        or meta.get("kind") not in ("pretrain", "sft")
        or meta.get("dtype") not in ("uint16", "int32")
    ):
        return None
    n, records = int(meta["tokens"]), int(meta["records"])
    files = {"tokens": (meta["dtype"], n), "offsets": ("int64", records + 1)}
    if meta["kind"] == "sft":
        files["supervised"] = ("uint8", n)
    arrays = {}
    for name, (dtype, count) in files.items():
        path = entry / f"{name}.bin"
        try:
            if path.stat().st_size != count * np.dtype(dtype).itemsize:
                return None  # truncated: never serve a partial file
        except OSError:
            return None
        arrays[name] = (
            np.memmap(path, dtype=dtype, mode="r", shape=(count,))
            if count
            else np.zeros(0, dtype=dtype)
        )
    if arrays["offsets"][-1] != n:
        return None
    return meta["kind"], arrays


def prepare(
    data_path: Path,
    tokenizer: Tokenizer,
    entry: Path,
    data_fp: str,
    progress: ProgressFn | None = None,
) -> tuple[str, dict[str, np.ndarray]]:
    """Tokenise the data at `data_path` into the cache entry `entry`; return what `load` does."""
    dtype = np.uint16 if tokenizer.vocab_size <= _UINT16_VOCAB else np.int32
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(entry.parent)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.{os.getpid()}."))
    try:
        kind = _write(data_path, tokenizer, tmp, dtype, data_fp, progress)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the cache is ordinary shared data
        fsync(tmp)
        try:
            os.rename(tmp, entry)
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(tmp)  # another process finished the same entry first: use theirs
        fsync(entry.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    loaded = load(entry, data_fp, tokenizer.fingerprint)
    if loaded is None:
        raise OSError(f"token cache {entry} could not be read back after writing it")
    assert loaded[0] == kind
    return loaded


def _write(
    data_path: Path,
    tokenizer: Tokenizer,
    folder: Path,
    dtype: type,
    data_fp: str,
    progress: ProgressFn | None,
) -> str:
    read = Progress()
    started = time.perf_counter()
    encoders = _Encoders(tokenizer, dtype)
    counts = {"tokens": 0, "records": 0}
    kind = "pretrain"
    files = {name: open(folder / f"{name}.bin", "wb") for name in ("tokens", "offsets")}
    files["offsets"].write(np.zeros(1, dtype=np.int64).tobytes())

    def append(chunk: Chunk) -> None:
        files["tokens"].write(chunk.tokens.tobytes())
        ends = counts["tokens"] + np.cumsum(chunk.lengths, dtype=np.int64)
        files["offsets"].write(ends.tobytes())
        if chunk.supervised is not None:
            if "supervised" not in files:
                files["supervised"] = open(folder / "supervised.bin", "wb")
            files["supervised"].write(chunk.supervised.tobytes())
        counts["tokens"] += len(chunk.tokens)
        counts["records"] += len(chunk.lengths)
        if progress is not None:
            seconds = time.perf_counter() - started
            progress(
                {
                    "stage": "tokenize",
                    "bytes": read.done,
                    "total": read.total,
                    "tokens": counts["tokens"],
                    "seconds": seconds,
                }
            )

    try:
        # One worker encodes chunk i while this thread parses chunk i+1 and writes chunk i-1:
        # at most three chunks are alive at once.
        with ThreadPoolExecutor(1, thread_name_prefix="mmnb-tokenize") as pool:
            pending = None
            for kind, records in _chunks(iter_records(data_path, read)):
                future = pool.submit(encoders.encode, kind, records)
                if pending is not None:
                    append(pending.result())
                pending = future
            if pending is not None:
                append(pending.result())
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    meta = {
        "version": CACHE_VERSION,
        "kind": kind,
        "dtype": np.dtype(dtype).name,
        "tokens": counts["tokens"],
        "records": counts["records"],
        "data": data_fp,
        "tokenizer": tokenizer.fingerprint,
    }
    with open(folder / "meta.json", "w", encoding="utf-8") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    return kind


def _chunks(records: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, list]]:
    """Records grouped into chunks of about `_CHUNK_CHARS` characters."""
    chunk: list = []
    chars = 0
    kind = "pretrain"
    for kind, record in records:
        chunk.append(record)
        chars += len(record) if kind == "pretrain" else sum(len(m["content"]) for m in record)
        if chars >= _CHUNK_CHARS or len(chunk) >= _CHUNK_RECORDS:
            yield kind, chunk
            chunk, chars = [], 0
    if chunk:
        yield kind, chunk


class _Encoders:
    """Records → token arrays, exactly as documented in mmnb.data: pretraining documents become
    `[bos] + tokens + [eos]`; each message of a conversation becomes its ChatML header, its
    content, `<|im_end|>` and a newline, each piece tokenised on its own so the supervised span
    (assistant content + `<|im_end|>`) is exact by construction."""

    def __init__(self, tokenizer: Tokenizer, dtype: type) -> None:
        self.tokenizer, self.dtype = tokenizer, dtype
        self.header = {role: tokenizer.encode(f"{BOS_TOKEN}{role}\n") for role in ROLES}
        self.newline = tokenizer.encode("\n")

    def encode(self, kind: str, records: list) -> Chunk:
        return self._pretrain(records) if kind == "pretrain" else self._sft(records)

    def _pretrain(self, texts: list[str]) -> Chunk:
        tok = self.tokenizer
        bos, eos = (tok.bos_id,), (tok.eos_id,)
        encoded = tok.encode_batch(texts)
        lengths = np.fromiter((len(ids) + 2 for ids in encoded), np.int64, len(encoded))
        stream = chain.from_iterable(chain(bos, ids, eos) for ids in encoded)
        tokens = np.fromiter(stream, dtype=self.dtype, count=int(lengths.sum()))
        return Chunk(tokens, lengths, None)

    def _sft(self, conversations: list[list[dict]]) -> Chunk:
        tok = self.tokenizer
        contents = iter(tok.encode_batch([m["content"] for c in conversations for m in c]))
        ids: list[int] = []
        supervised: list[bool] = []
        lengths = []
        for conv in conversations:
            start = len(ids)
            for message in conv:
                header = self.header[message["role"]]
                body = next(contents) + [tok.eos_id]
                ids += header + body + self.newline
                supervised += [False] * len(header)
                supervised += [message["role"] == "assistant"] * len(body)
                supervised += [False] * len(self.newline)
            lengths.append(len(ids) - start)
        return Chunk(
            np.asarray(ids, dtype=self.dtype),
            np.asarray(lengths, dtype=np.int64),
            np.asarray(supervised, dtype=np.uint8),
        )


def _remove_abandoned(folder: Path) -> None:
    """Delete temporary entries whose writing process is gone (killed while preparing)."""
    for tmp in folder.glob(".v*.*.*"):
        try:
            pid = int(tmp.name.split(".")[2])
            os.kill(pid, 0)
        except (ValueError, IndexError):
            continue
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


__all__ = ["CACHE_VERSION", "entry_path", "load", "prepare"]
