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
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from . import tokcache
from .records import (
    TOKENIZER_SAMPLE_BYTES,
    DataError,
    data_fingerprint,
    iter_records,
    read_records,
    resolve_data_path,
    tokenizer_sample,
    training_texts,
)
from .tokenizer import Tokenizer

IGNORE_INDEX = -100  # label value the loss skips (torch's cross_entropy default)
ProgressFn = tokcache.ProgressFn  # called with {"stage", "bytes", "total", "tokens", "seconds"}


def default_cache_dir() -> Path:
    """`$MMNB_CACHE` if set, else `~/.cache/mmnb`."""
    env = os.environ.get("MMNB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmnb"


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
    progress: ProgressFn | None = None,
) -> Tokenizer:
    """The tokenizer a run uses: `tokenizer_path` if given, else one trained on the data with
    `vocab_size`, cached by (data fingerprint, vocab_size) so later calls load it.

    Training reads at most `TOKENIZER_SAMPLE_BYTES` of text (`records.tokenizer_sample`), so
    it costs the same for a 1 GB data set as for a 64 MB one.
    """
    if tokenizer_path is not None:
        try:
            return Tokenizer.from_file(Path(tokenizer_path).expanduser())
        except ValueError as e:
            raise DataError(str(e)) from None
    path = resolve_data_path(data)
    root = cache_dir if cache_dir is not None else default_cache_dir()
    data_fp = data_fingerprint(path, memo=root / "fingerprints")
    cached = root / "tokenizers" / f"{data_fp[:32]}-v{vocab_size}.json"
    try:
        return Tokenizer.from_file(cached)
    except ValueError:
        pass  # not cached yet (or unreadable): train and (re)write it
    tokenizer = Tokenizer.train(_sample(path, progress), vocab_size)
    _atomic_write(cached, lambda f: f.write(tokenizer.to_json().encode("utf-8")))
    return tokenizer


def _sample(path: Path, progress: ProgressFn | None) -> list[str]:
    """The tokenizer's training text (bounded), read with progress reports."""
    if path.is_dir():
        size = sum(f.stat().st_size for f in path.rglob("*.txt") if f.is_file())
    else:
        size = path.stat().st_size if path.exists() else 0
    total = min(size, TOKENIZER_SAMPLE_BYTES)
    started = time.perf_counter()
    texts, taken, reported = [], 0, 0
    for text in tokenizer_sample(path):
        texts.append(text)
        taken += len(text)
        if progress is not None and taken - reported >= 1 << 20:
            reported = taken
            seconds = time.perf_counter() - started
            progress({"stage": "tokenizer", "bytes": min(taken, total), "total": total,
                      "tokens": 0, "seconds": seconds})  # fmt: skip
    if progress is not None:
        seconds = time.perf_counter() - started
        progress({"stage": "tokenizer", "bytes": total, "total": total, "tokens": 0,
                  "seconds": seconds})  # fmt: skip
    return texts


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
            self.__dict__["num_tokens"] = n * seq_len  # what the cached property would give
        else:
            self._supervised = arrays["supervised"]
            offsets = np.asarray(arrays["offsets"])  # one int64 per conversation: small
            self._starts = offsets[:-1]
            self._lengths = np.minimum(np.diff(offsets), seq_len)

    @cached_property
    def num_tokens(self) -> int:
        """Supervised tokens that survive truncation (sft); computed once, in bounded slices."""
        total = 0
        step = 1 << 16  # conversations per slice
        for lo in range(0, len(self._starts), step):
            starts, lengths = self._starts[lo : lo + step], self._lengths[lo : lo + step]
            base = int(starts[0])
            sup = np.asarray(self._supervised[base : int(starts[-1] + lengths[-1])])
            before = np.concatenate([[0], np.cumsum(sup, dtype=np.int64)])
            rel = starts - base
            total += int((before[rel + lengths] - before[rel]).sum())
        return total

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
        labels[rows, cols] = np.where(self._supervised[src] != 0, tokens, IGNORE_INDEX)
        return torch.from_numpy(ids), torch.from_numpy(labels)

    def __repr__(self) -> str:
        return (
            f"TokenDataset(kind={self.kind!r}, samples={len(self)}, seq_len={self.seq_len}, "
            f"num_tokens={self.num_tokens})"
        )


def build_dataset(
    data: str | None,
    tokenizer: Tokenizer,
    seq_len: int,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
) -> TokenDataset:
    """Tokenise `data` (or map its cached tokens) and serve `seq_len`-token samples.

    The cache lives under `cache_dir` (default `default_cache_dir()`), keyed by the data and
    tokenizer fingerprints; one entry serves every seq_len (see `mmnb.tokcache`). `progress`
    is called as preparation advances (bytes read, tokens written, seconds).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    path = resolve_data_path(data)
    root = cache_dir if cache_dir is not None else default_cache_dir()
    data_fp, tok_fp = data_fingerprint(path, memo=root / "fingerprints"), tokenizer.fingerprint
    entry = tokcache.entry_path(root, data_fp, tok_fp)
    loaded = tokcache.load(entry, data_fp, tok_fp)
    if loaded is None:
        loaded = tokcache.prepare(path, tokenizer, entry, data_fp, progress)
    kind, arrays = loaded
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
    "TOKENIZER_SAMPLE_BYTES",
    "DataError",
    "IGNORE_INDEX",
    "TokenDataset",
    "build_dataset",
    "data_fingerprint",
    "default_cache_dir",
    "epoch_order",
    "iter_records",
    "read_records",
    "resolve_data_path",
    "tokenizer_for",
    "training_texts",
]
