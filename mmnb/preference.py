"""Preference data for DPO: MiniMind's `dpo.jsonl`, one `{"chosen": [...], "rejected": [...]}`
pair of conversations per line, tokenised once (cached) into fixed-length pairs.

A pair is rendered like an SFT sample (ChatML, `<|im_start|>role\\n…<|im_end|>\\n`), and only
the assistant replies and their closing `<|im_end|>` are labelled, exactly as mmnb labels SFT
data. `batch(indices)` returns the chosen rows of the batch followed by its rejected rows, so a
DPO objective runs both through the model in one forward pass, as MiniMind's `train_dpo.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import corpus
from .data import DataError, data_fingerprint, default_cache_dir, resolve_data_path
from .tokenizer import BOS_TOKEN, ROLES, Tokenizer

IGNORE_INDEX = -100
CACHE_VERSION = 1
_BUNDLED = {"dpo": corpus.DPO_PATH, "bundled:dpo": corpus.DPO_PATH}


def resolve_path(data: str | None) -> Path:
    """ "dpo" / "bundled:dpo" → the bundled preference set; anything else as `data.py` does."""
    if data is None:
        raise DataError("a DPO stage needs preference data: --data dpo.jsonl (or 'dpo')")
    return _BUNDLED.get(data) or resolve_data_path(data)


def read_pairs(path: Path) -> list[tuple[list[dict], list[dict]]]:
    """(chosen, rejected) conversations of a MiniMind DPO file; errors name file and line."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    pairs = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(obj, dict) or "chosen" not in obj or "rejected" not in obj:
                raise DataError(
                    f"{where}: a DPO record needs 'chosen' and 'rejected' conversations"
                )
            pairs.append((_messages(obj["chosen"], where), _messages(obj["rejected"], where)))
    if not pairs:
        raise DataError(f"{path}: no preference pairs")
    return pairs


def _messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'chosen' and 'rejected' must be non-empty lists of messages")
    out = []
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ROLES or not isinstance(content, str):
            raise DataError(f"{where}: message {i} needs a role ({'/'.join(ROLES)}) and content")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: a conversation has no assistant reply to prefer")
    return out


def _tokenize(tokenizer: Tokenizer, pairs: list[tuple[list[dict], list[dict]]]) -> dict:
    header = {role: tokenizer.encode(f"{BOS_TOKEN}{role}\n") for role in ROLES}
    newline = tokenizer.encode("\n")
    ids: list[int] = []
    supervised: list[bool] = []
    lengths = []
    for conv in (c for pair in pairs for c in pair):  # chosen, rejected, chosen, …
        start = len(ids)
        for m in conv:
            body = tokenizer.encode(m["content"]) + [tokenizer.eos_id]
            ids += header[m["role"]] + body + newline
            supervised += [False] * len(header[m["role"]])
            supervised += [m["role"] == "assistant"] * len(body) + [False] * len(newline)
        lengths.append(len(ids) - start)
    return {
        "tokens": np.asarray(ids, dtype=np.int32),
        "supervised": np.asarray(supervised, dtype=bool),
        "offsets": np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
    }


class PreferenceDataset:
    """Fixed-length (chosen, rejected) pairs. `len(ds)` pairs; `ds.batch(indices)` gives
    (input_ids, labels), both int64 [2B, seq_len]: B chosen rows, then the B rejected ones."""

    kind = "dpo"

    def __init__(self, arrays: dict, seq_len: int, pad_id: int, fingerprint: str) -> None:
        self.seq_len, self.fingerprint, self._pad = seq_len, fingerprint, pad_id
        self._tokens, self._supervised = arrays["tokens"], arrays["supervised"]
        offsets = arrays["offsets"]
        self._starts = offsets[:-1]
        self._lengths = np.minimum(np.diff(offsets), seq_len)
        cum = np.concatenate([[0], np.cumsum(self._supervised, dtype=np.int64)])
        kept = cum[self._starts + self._lengths] - cum[self._starts]
        self.num_tokens = int(kept.sum())
        # A side whose every reply was cut off by seq_len has no token to compare.
        self.empty_pairs = int((kept.reshape(-1, 2) == 0).any(axis=1).sum())

    def __len__(self) -> int:
        return len(self._starts) // 2

    def batch(self, indices: np.ndarray | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"pair index out of range for {len(self)} pairs")
        rows = np.concatenate([2 * idx, 2 * idx + 1])  # chosen rows, then rejected rows
        ids = np.full((len(rows), self.seq_len), self._pad, dtype=np.int64)
        labels = np.full((len(rows), self.seq_len), IGNORE_INDEX, dtype=np.int64)
        for r, row in enumerate(rows):
            s, n = self._starts[row], self._lengths[row]
            tokens = self._tokens[s : s + n]
            ids[r, :n] = tokens
            labels[r, :n] = np.where(self._supervised[s : s + n], tokens, IGNORE_INDEX)
        return torch.from_numpy(ids), torch.from_numpy(labels)

    def __repr__(self) -> str:
        return f"PreferenceDataset(pairs={len(self)}, seq_len={self.seq_len})"


def build_preference_dataset(
    data: str | None, tokenizer: Tokenizer, seq_len: int, cache_dir: Path | None = None
) -> PreferenceDataset:
    """Tokenise `data` once (cached by data and tokenizer) and serve `seq_len`-token pairs."""
    path = resolve_path(data)
    data_fp, tok_fp = data_fingerprint(path), tokenizer.fingerprint
    root = cache_dir if cache_dir is not None else default_cache_dir()
    cached = root / "preferences" / f"{data_fp[:32]}-{tok_fp[:32]}.npz"
    arrays = None
    try:
        with np.load(cached, allow_pickle=False) as z:
            if int(z["version"]) == CACHE_VERSION:
                arrays = {k: z[k] for k in ("tokens", "supervised", "offsets")}
    except (OSError, ValueError, KeyError, EOFError):
        pass  # not cached yet, or damaged: rebuild
    if arrays is None:
        arrays = _tokenize(tokenizer, read_pairs(path))
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, version=np.array(CACHE_VERSION), **arrays)
            os.replace(tmp, cached)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    key = f"{data_fp}|{tok_fp}|{seq_len}|dpo"
    return PreferenceDataset(
        arrays, seq_len, tokenizer.pad_id, hashlib.sha256(key.encode()).hexdigest()
    )


__all__ = ["PreferenceDataset", "build_preference_dataset", "read_pairs", "resolve_path"]
