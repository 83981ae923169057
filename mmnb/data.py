"""Training data: read records, tokenise once (cached on disk), serve fixed-length samples.

Two kinds of data, told apart by the records themselves:
- pretrain: plain documents. Each becomes `[bos] + tokens + [eos]`; all are concatenated into one
  stream that is cut into non-overlapping `seq_len` chunks (the last partial chunk is dropped).
- sft: MiniMind conversations. Each is one sample, rendered as ChatML, truncated to `seq_len`
  and right-padded; only assistant replies (and their closing `<|im_end|>`) carry labels.

Labels are never shifted here: the model shifts inside its loss, as MiniMind's does.
The tokenised arrays are cached per (data, tokenizer), independent of `seq_len`, so a second
build or a resume never tokenises again and chunking/padding is cheap work at load time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from mmnb import corpus
from mmnb.tokenizer import BOS_TOKEN, ROLES, Tokenizer, render_chat

IGNORE_INDEX = -100  # label value the loss skips (torch's cross_entropy default)
CACHE_VERSION = 1  # bump when the cached arrays' meaning changes
_ENCODE_CHUNK = 8192  # texts per encode_batch call: bounds the Python objects alive at once
_BUNDLED = {
    "chat": corpus.CHAT_PATH,
    "bundled:chat": corpus.CHAT_PATH,
    "bundled:pretrain": corpus.PRETRAIN_PATH,
}


class DataError(ValueError):
    """A problem with the user's data: the message names the file (and line) to fix."""


# ---- locating and reading -------------------------------------------------------------------


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


def default_cache_dir() -> Path:
    """`$MMNB_CACHE` if set, else `~/.cache/mmnb`."""
    env = os.environ.get("MMNB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmnb"


def read_records(path: str | Path) -> tuple[str, list]:
    """("pretrain", [text, ...]) or ("sft", [[{"role", "content"}, ...], ...]).

    `.jsonl`: one object per line, `{"text": ...}` or `{"conversations": [...]}` (blank lines
    skipped). `.txt`: documents are paragraphs separated by blank lines. A folder: every `*.txt`
    under it, in sorted order of relative path.
    """
    path = Path(path)
    if path.is_dir():
        files = _txt_files(path)
        if not files:
            raise DataError(f"{path}: folder has no .txt files")
        docs = [doc for f in files for doc in _paragraphs(_read_text(f))]
    elif not path.exists():
        raise DataError(f"data file not found: {path}")
    elif path.suffix.lower() == ".jsonl":
        return _read_jsonl(path)
    elif path.suffix.lower() == ".txt":
        docs = _paragraphs(_read_text(path))
    else:
        raise DataError(f"{path}: unsupported data file type (use .jsonl, .txt or a folder)")
    if not docs:
        raise DataError(f"{path}: no documents")
    return "pretrain", docs


def _txt_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.rglob("*.txt") if p.is_file()), key=lambda p: _rel(p, folder))


def _rel(p: Path, folder: Path) -> str:
    return p.relative_to(folder).as_posix()


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{lineno}: not valid UTF-8") from None
    # Same line-ending handling as open(): the tokens must not depend on the platform.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n[ \t\f\v]*(?:\n[ \t\f\v]*)+", text) if p.strip()]


def _read_jsonl(path: Path) -> tuple[str, list]:
    kind: str | None = None
    records: list = []
    # split("\n"), not splitlines(): U+2028 and friends may stand unescaped inside JSON strings.
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
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
        records.append(record)
    if kind is None:
        raise DataError(f"{path}: no records")
    return kind, records


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


def data_fingerprint(path: str | Path) -> str:
    """sha256 of the data: a file's bytes; a folder's sorted `.txt` names and bytes."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in _txt_files(path):
            body = f.read_bytes()
            # Length-prefixed, so moving bytes between names changes the hash.
            h.update(f"{_rel(f, path)}\0{len(body)}\0".encode())
            h.update(body)
        return h.hexdigest()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def training_texts(kind: str, records: list) -> list[str]:
    """What a tokenizer is trained on: the documents, or the ChatML-rendered conversations."""
    return list(records) if kind == "pretrain" else [render_chat(c) for c in records]


# ---- the on-disk cache ----------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    # A reader (another kernel) sees the old file or the whole new one, never a partial one.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; the cache is ordinary shared data
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tokenizer_for(
    data: str | None,
    vocab_size: int,
    tokenizer_path: str | None = None,
    cache_dir: Path | None = None,
) -> Tokenizer:
    """The tokenizer a run uses: `tokenizer_path` if given, else one trained on the data with
    `vocab_size`, cached by (data fingerprint, vocab_size) so later calls load it."""
    if tokenizer_path is not None:
        try:
            return Tokenizer.from_file(Path(tokenizer_path).expanduser())
        except ValueError as e:
            raise DataError(str(e)) from None
    path = resolve_data_path(data)
    root = cache_dir if cache_dir is not None else default_cache_dir()
    cached = root / "tokenizers" / f"{data_fingerprint(path)[:32]}-v{vocab_size}.json"
    try:
        return Tokenizer.from_file(cached)
    except ValueError:
        pass  # not cached yet (or unreadable): train and (re)write it
    kind, records = read_records(path)
    tokenizer = Tokenizer.train(training_texts(kind, records), vocab_size)
    _atomic_write(cached, lambda f: f.write(tokenizer.to_json().encode("utf-8")))
    return tokenizer


def _load_arrays(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None  # missing or damaged: the caller rebuilds it
    if "version" not in arrays or int(arrays["version"]) != CACHE_VERSION:
        return None
    return arrays


# ---- tokenising -----------------------------------------------------------------------------


def _encode_all(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(texts), _ENCODE_CHUNK):
        out += tokenizer.encode_batch(list(texts[start : start + _ENCODE_CHUNK]))
    return out


def _tokenize_pretrain(tokenizer: Tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    bos, eos = (tokenizer.bos_id,), (tokenizer.eos_id,)
    encoded = _encode_all(tokenizer, texts)
    count = sum(len(ids) + 2 for ids in encoded)
    stream = chain.from_iterable(chain(bos, ids, eos) for ids in encoded)
    return {"tokens": np.fromiter(stream, dtype=np.int32, count=count)}


def _tokenize_sft(tokenizer: Tokenizer, conversations: list[list[dict]]) -> dict[str, np.ndarray]:
    # Each piece is tokenised on its own and concatenated, so the boundary between what is
    # supervised (assistant content + <|im_end|>) and what is not is exact by construction.
    header = {role: tokenizer.encode(f"{BOS_TOKEN}{role}\n") for role in ROLES}  # as render_chat
    newline = tokenizer.encode("\n")
    contents = iter(_encode_all(tokenizer, [m["content"] for c in conversations for m in c]))
    ids: list[int] = []
    supervised: list[bool] = []
    lengths = []
    for conv in conversations:
        start = len(ids)
        for message in conv:
            body = next(contents) + [tokenizer.eos_id]
            ids += header[message["role"]] + body + newline
            supervised += [False] * len(header[message["role"]])
            supervised += [message["role"] == "assistant"] * len(body)
            supervised += [False] * len(newline)
        lengths.append(len(ids) - start)
    return {
        "tokens": np.asarray(ids, dtype=np.int32),
        "supervised": np.asarray(supervised, dtype=bool),
        "offsets": np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
    }


# ---- the dataset ----------------------------------------------------------------------------


class TokenDataset:
    """Fixed-length samples of one tokenised data set.

    `len(ds)` samples; `ds.batch(indices)` gives (input_ids, labels), both int64 [B, seq_len].
    `num_tokens` counts label positions that are not IGNORE_INDEX: every token of every chunk for
    pretrain, the supervised (assistant) tokens that survive truncation for sft.
    """

    def __init__(
        self,
        kind: str,
        seq_len: int,
        arrays: dict[str, np.ndarray],
        pad_id: int,
        fingerprint: str,
    ) -> None:
        self.kind, self.seq_len, self.fingerprint = kind, seq_len, fingerprint
        self._pad_id = pad_id
        self._tokens = arrays["tokens"]
        if kind == "pretrain":
            n = len(self._tokens) // seq_len
            self._chunks = self._tokens[: n * seq_len].reshape(n, seq_len)  # a view, no copy
            self.num_tokens = n * seq_len
        else:
            self._supervised = arrays["supervised"]
            self._starts = arrays["offsets"][:-1]
            self._lengths = np.minimum(np.diff(arrays["offsets"]), seq_len)
            before = np.concatenate([[0], np.cumsum(self._supervised, dtype=np.int64)])
            self.num_tokens = int(
                (before[self._starts + self._lengths] - before[self._starts]).sum()
            )

    def __len__(self) -> int:
        return len(self._chunks) if self.kind == "pretrain" else len(self._starts)

    def batch(self, indices: np.ndarray | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) of the samples at `indices`, int64 [B, seq_len]."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"indices must be one-dimensional, got shape {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample index out of range for {len(self)} samples")
        if self.kind == "pretrain":
            x = torch.from_numpy(self._chunks[idx].astype(np.int64))
            return x, x.clone()
        # Scatter each conversation's (truncated) tokens into a padded [B, seq_len] block in one
        # vectorised step: rows/cols/src are flat indices over all tokens of the batch.
        lengths = self._lengths[idx]
        rows = np.repeat(np.arange(len(idx)), lengths)
        cols = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        src = np.repeat(self._starts[idx], lengths) + cols
        tokens = self._tokens[src].astype(np.int64)
        ids = np.full((len(idx), self.seq_len), self._pad_id, dtype=np.int64)
        labels = np.full((len(idx), self.seq_len), IGNORE_INDEX, dtype=np.int64)
        ids[rows, cols] = tokens
        labels[rows, cols] = np.where(self._supervised[src], tokens, IGNORE_INDEX)
        return torch.from_numpy(ids), torch.from_numpy(labels)

    def __repr__(self) -> str:
        return (
            f"TokenDataset(kind={self.kind!r}, samples={len(self)}, seq_len={self.seq_len}, "
            f"num_tokens={self.num_tokens})"
        )


def build_dataset(
    data: str | None, tokenizer: Tokenizer, seq_len: int, cache_dir: Path | None = None
) -> TokenDataset:
    """Tokenise `data` (or load its cached tokens) and serve `seq_len`-token samples.

    The cache lives under `cache_dir` (default `default_cache_dir()`), keyed by the data and
    tokenizer fingerprints; one entry serves every seq_len.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    path = resolve_data_path(data)
    data_fp, tok_fp = data_fingerprint(path), tokenizer.fingerprint
    root = cache_dir if cache_dir is not None else default_cache_dir()
    cached = root / "tokens" / f"{data_fp[:32]}-{tok_fp[:32]}.npz"
    arrays = _load_arrays(cached)
    if arrays is None:
        kind, records = read_records(path)
        tokenize = _tokenize_pretrain if kind == "pretrain" else _tokenize_sft
        arrays = tokenize(tokenizer, records)
        arrays |= {"kind": np.array(kind), "version": np.array(CACHE_VERSION)}
        _atomic_write(cached, lambda f: np.savez(f, **arrays))
    kind = str(arrays["kind"])
    key = f"{data_fp}|{tok_fp}|{seq_len}|{kind}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()
    ds = TokenDataset(kind, seq_len, arrays, tokenizer.pad_id, fingerprint)
    if len(ds) == 0:
        raise DataError(
            f"{path}: {len(arrays['tokens'])} tokens make no sample of max_seq_len {seq_len}"
        )
    return ds


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch (int64), a pure function of (seed, epoch).

    A fresh generator per epoch, so the trainer can seek to any position of any epoch in O(1)
    and nothing depends on global RNG state.
    """
    if num_samples < 0 or seed < 0 or epoch < 0:
        raise ValueError(
            f"need non-negative num_samples, seed, epoch; got {num_samples, seed, epoch}"
        )
    rng = np.random.Generator(np.random.PCG64([seed, epoch]))
    return rng.permutation(num_samples).astype(np.int64, copy=False)


__all__ = [
    "DataError",
    "IGNORE_INDEX",
    "TokenDataset",
    "build_dataset",
    "data_fingerprint",
    "default_cache_dir",
    "epoch_order",
    "read_records",
    "resolve_data_path",
    "tokenizer_for",
    "training_texts",
]
