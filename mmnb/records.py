"""Reading the user's data as a stream of records, in bounded memory, whatever its size.

Two kinds of records, told apart by the records themselves: pretraining documents (`{"text":
...}` lines, `.txt` paragraphs) and MiniMind conversations (`{"conversations": [...]}` lines).
Files are read in blocks and parsed line by line, so a data set larger than memory streams
through; every problem is a `DataError` naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import corpus
from .tokenizer import ROLES, render_chat

_BLOCK = 1 << 22  # bytes read at a time
_BOM = b"\xef\xbb\xbf"
# Bytes of text a tokenizer is trained on at most. BPE merges settle long before 64 MiB of
# text, and training on more costs minutes and gigabytes (docs/data.md).
TOKENIZER_SAMPLE_BYTES = 64 << 20
_SAMPLE_WINDOWS = 64  # a larger JSONL file is sampled in this many evenly spaced windows
_BUNDLED = {
    "chat": corpus.CHAT_PATH,
    "bundled:chat": corpus.CHAT_PATH,
    "bundled:pretrain": corpus.PRETRAIN_PATH,
}


class DataError(ValueError):
    """A problem with the user's data: the message names the file (and line) to fix."""


def resolve_data_path(data: str | None) -> Path:
    """None → the bundled pretraining corpus; "chat" / "bundled:chat" / "bundled:pretrain" →
    the bundled files; anything else is a path (`~` expanded)."""
    if data is None:
        return corpus.PRETRAIN_PATH
    if data in _BUNDLED:
        return _BUNDLED[data]
    if data.startswith("bundled:"):
        raise DataError(f"unknown bundled data {data!r}: use bundled:pretrain or bundled:chat")
    return Path(data).expanduser()


# ---- the stream -----------------------------------------------------------------------------


@dataclass
class Progress:
    """How far a pass over the data has come (for progress displays)."""

    done: int = 0  # bytes of input consumed
    total: int = 0  # bytes of input in all


def iter_records(path: str | Path, progress: Progress | None = None) -> Iterator[tuple[str, Any]]:
    """Yield (kind, record) for every record of the data at `path`, in order, streaming.

    kind is "pretrain" (record: the document text) or "sft" (record: a list of
    {"role", "content"} messages), the same for every record of one data set.
    `.jsonl`: one object per line, `{"text": ...}` or `{"conversations": [...]}` (blank lines
    skipped). `.txt`: documents are paragraphs separated by blank lines. A folder: every `*.txt`
    under it, in sorted order of relative path. `progress.done` advances as bytes are consumed.
    """
    path = Path(path)
    progress = progress if progress is not None else Progress()
    if path.is_dir():
        files = txt_files(path)
        if not files:
            raise DataError(f"{path}: folder has no .txt files")
        progress.total = sum(f.stat().st_size for f in files)
        count = 0
        for f in files:
            for doc in _paragraphs(_lines(f, progress)):
                count += 1
                yield "pretrain", doc
        if not count:
            raise DataError(f"{path}: no documents")
    elif not path.exists():
        raise DataError(f"data file not found: {path}")
    elif path.suffix.lower() == ".jsonl":
        progress.total = path.stat().st_size
        yield from _jsonl_records(path, _lines(path, progress))
    elif path.suffix.lower() == ".txt":
        progress.total = path.stat().st_size
        count = 0
        for doc in _paragraphs(_lines(path, progress)):
            count += 1
            yield "pretrain", doc
        if not count:
            raise DataError(f"{path}: no documents")
    else:
        raise DataError(f"{path}: unsupported data file type (use .jsonl, .txt or a folder)")


def read_records(path: str | Path) -> tuple[str, list]:
    """("pretrain", [text, ...]) or ("sft", [[{"role", "content"}, ...], ...]): the whole data
    set in memory (small data, tests). Large data goes through `iter_records`."""
    kind, records = "pretrain", []
    for kind, record in iter_records(path):  # noqa: B007 (the kind of the last record is kept)
        records.append(record)
    return kind, records


def _lines(
    path: Path, progress: Progress, start: int = 0, window: int | None = None
) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, read in blocks; line endings as open() reads
    them (\r\n and \r become \n), a leading BOM dropped. With `window`, only the lines that
    end in the `window` bytes from `start` (a line start) — or the first line, if longer."""
    lineno = 0  # lines yielded (after line-ending normalisation)
    raw_lines = 0  # \n bytes seen: the line numbers an editor shows, for encoding errors
    block_size = window or _BLOCK
    with path.open("rb") as f:
        f.seek(start)
        carry = b""
        while True:
            block = f.read(block_size)
            eof = not block
            progress.done += len(block)
            if start == 0 and lineno == 0 and not carry and block.startswith(_BOM):
                block = block[len(_BOM) :]
            data = carry + block
            if not eof:
                # Cut after the last \n: a \r\n pair, or a multi-byte character, never straddles.
                cut = data.rfind(b"\n") + 1
                data, carry = data[:cut], data[cut:]
            if data:
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad = raw_lines + data[: e.start].count(b"\n") + 1
                    raise DataError(f"{path}:{bad}: not valid UTF-8") from None
                raw_lines += data.count(b"\n")
                text = text.replace("\r\n", "\n").replace("\r", "\n")
                # split("\n"), not splitlines(): U+2028 and friends may stand unescaped in JSON.
                parts = text.split("\n")
                if text.endswith("\n"):
                    parts.pop()
                for line in parts:
                    lineno += 1
                    yield lineno, line
                if window is not None:
                    return
            if eof:
                return


def _paragraphs(lines: Iterator[tuple[int, str]]) -> Iterator[str]:
    """Documents of a text: runs of lines between blank lines (only spaces/tabs), stripped."""
    para: list[str] = []
    for _, line in lines:
        if line.strip(" \t\f\v"):
            para.append(line)
        elif para:
            doc = "\n".join(para).strip()
            para = []
            if doc:
                yield doc
    if para:
        doc = "\n".join(para).strip()
        if doc:
            yield doc


def _jsonl_records(path: Path, lines: Iterator[tuple[int, str]]) -> Iterator[tuple[str, Any]]:
    kind: str | None = None
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        line_kind, record = _parse_record(obj, f"{path}:{lineno}")
        if kind is None:
            kind = line_kind
        elif line_kind != kind:
            raise DataError(f"{path}:{lineno}: {line_kind} record in a {kind} file (mixed kinds)")
        yield kind, record
    if kind is None:
        raise DataError(f"{path}: no records")


def _parse_record(obj: Any, where: str) -> tuple[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "conversations" in obj:
        if "text" in obj:
            raise DataError(f"{where}: record has both 'text' and 'conversations'")
        return "sft", _parse_conversation(obj["conversations"], where)
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: 'text' must be a string, got {type(obj['text']).__name__}")
        return "pretrain", obj["text"]
    raise DataError(f"{where}: record needs a 'text' or a 'conversations' key")


def _parse_conversation(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: conversations[{i}] is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: conversations[{i}] has role {role!r}, not {'/'.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: conversations[{i}] needs a string 'content'")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: conversation has no assistant message to learn from")
    return out


def txt_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.rglob("*.txt") if p.is_file()), key=lambda p: _rel(p, folder))


def _rel(p: Path, folder: Path) -> str:
    return p.relative_to(folder).as_posix()


# ---- what a tokenizer is trained on ---------------------------------------------------------


def training_texts(kind: str, records: list) -> list[str]:
    """What a tokenizer is trained on: the documents, or the ChatML-rendered conversations."""
    return list(records) if kind == "pretrain" else [render_chat(c) for c in records]


def tokenizer_sample(path: str | Path, budget: int = TOKENIZER_SAMPLE_BYTES) -> Iterator[str]:
    """The texts a tokenizer for the data at `path` is trained on, at most about `budget` bytes.

    Data up to `budget` bytes is used whole. A larger JSONL file contributes the whole lines of
    `_SAMPLE_WINDOWS` evenly spaced windows of `budget / _SAMPLE_WINDOWS` bytes each, so the
    sample spans the file; a larger text file or folder contributes its first documents up to
    the budget. Either way the sample is a pure function of the data's bytes.
    """
    path = Path(path)
    size = (
        sum(f.stat().st_size for f in txt_files(path))
        if path.is_dir()
        else (path.stat().st_size if path.exists() else 0)
    )
    if size <= budget or path.is_dir() or path.suffix.lower() != ".jsonl":
        taken = 0
        for kind, record in iter_records(path):
            text = record if kind == "pretrain" else render_chat(record)
            yield text
            taken += len(text)
            if taken >= budget:
                return
        return
    window = budget // _SAMPLE_WINDOWS
    kind: str | None = None
    for i in range(_SAMPLE_WINDOWS):
        start = _line_start(path, i * size // _SAMPLE_WINDOWS)
        for rec_kind, record in _jsonl_records(path, _lines(path, Progress(), start, window)):
            if kind is None:
                kind = rec_kind
            elif rec_kind != kind:
                raise DataError(f"{path}: {rec_kind} record in a {kind} file (mixed kinds)")
            yield record if rec_kind == "pretrain" else render_chat(record)


def _line_start(path: Path, offset: int) -> int:
    """The first line start at or after `offset`."""
    if offset == 0:
        return 0
    with path.open("rb") as f:
        f.seek(offset - 1)
        while block := f.read(1 << 16):
            nl = block.find(b"\n")
            if nl >= 0:
                return f.tell() - len(block) + nl + 1
    return path.stat().st_size


# ---- fingerprints ---------------------------------------------------------------------------

_fingerprints: dict[tuple, str] = {}  # (path, stat identity) → sha256, for this process
_SETTLED = 2.0  # seconds since a file's last change after which its stat identifies its bytes


def data_fingerprint(path: str | Path, memo: Path | None = None) -> str:
    """sha256 of the data: a file's bytes; a folder's sorted `.txt` names and bytes.

    A large file is read once, not at every run start: its hash is remembered per (path,
    device, inode, size, mtime, ctime) in this process and, with `memo` (a folder), on disk.
    Any write to a file gives it a new ctime, which no user tool can set back, so an unchanged
    identity means unchanged bytes — with one caveat, handled here: timestamps are coarse (a
    few ms), so a file is remembered only if it last changed more than `_SETTLED` seconds before
    it was hashed; any later write then carries a later timestamp (git's "racy clean" rule).
    """
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in txt_files(path):
            body = f.read_bytes()
            # Length-prefixed, so moving bytes between names changes the hash.
            h.update(f"{_rel(f, path)}\0{len(body)}\0".encode())
            h.update(body)
        return h.hexdigest()
    try:
        key = _identity(path)
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    if key in _fingerprints:
        return _fingerprints[key]
    memo_file = None
    if memo is not None:
        memo_file = memo / f"{hashlib.sha256(key[0].encode()).hexdigest()[:32]}.json"
        try:
            saved = json.loads(memo_file.read_text(encoding="utf-8"))
            if saved["identity"] == list(key) and len(saved["sha256"]) == 64:
                _fingerprints[key] = saved["sha256"]
                return saved["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not remembered (or unreadable): hash the file
    started = time.time()
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    if started - max(key[4], key[5]) / 1e9 > _SETTLED and _identity(path) == key:
        _fingerprints[key] = digest
        if memo_file is not None:
            _remember(memo_file, {"identity": list(key), "sha256": digest})
    return digest


def _identity(path: Path) -> tuple:
    st = path.stat()
    return (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _remember(file: Path, value: dict) -> None:
    # Best effort (a read-only cache just means hashing again); atomic, so readers never see
    # half a file.
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value), encoding="utf-8")
        os.replace(tmp, file)
    except OSError:
        pass


__all__ = [
    "DataError",
    "Progress",
    "TOKENIZER_SAMPLE_BYTES",
    "data_fingerprint",
    "iter_records",
    "read_records",
    "resolve_data_path",
    "tokenizer_sample",
    "training_texts",
]
