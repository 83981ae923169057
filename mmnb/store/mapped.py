"""Read-only, zero-copy views of a checkpoint group's arrays: one mmap of the file, checksums
verified, nothing copied into Python memory.

For readers that only pass the bytes on (`mmnb export` writing a safetensors file): a tensor is a
window on the page cache, so exporting costs one write instead of a read, a copy and a write.
Every check of a normal load is made first (`ckptfile.layout`: manifest, schema of the config,
hard links only, data inside the file); a group not laid out as contiguous datasets gives None,
so the caller falls back to `Run.load`.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path
from typing import Any

import numpy as np

from .ckptfile import layout
from .errors import CorruptCheckpoint, reason
from .h5state import as_bytes, checksum


def checked_layout(
    path: Path,
    config: dict[str, Any],
    group: str,
    expect_step: int | None,
    expect_checksum: str | None,
) -> list | None:
    """`ckptfile.layout` for a reader that passes the bytes on (this module, `streamed`), with
    anything a load would refuse as one CorruptCheckpoint naming the file."""
    from .run import PARSE_ERRORS

    try:
        return layout(path, config, group, expect_step=expect_step, expect_checksum=expect_checksum)
    except PARSE_ERRORS as err:
        raise CorruptCheckpoint(
            f"checkpoint {path} is unreadable or corrupt ({reason(err)})"
        ) from None


def mapped_group(
    path: Path,
    group: str,
    config: dict[str, Any],
    *,
    expect_step: int | None = None,
    expect_checksum: str | None = None,
) -> dict[str, tuple[np.ndarray, str | None]] | None:
    """{name: (read-only array view, torch dtype name)} of the datasets directly in `group` of
    the checkpoint at `path`, written by a run of `config`.

    Raises CorruptCheckpoint naming the file for anything a load would refuse; None when the
    group is not laid out as `write_tree` writes it.
    """
    entries = checked_layout(path, config, group, expect_step, expect_checksum)
    if entries is None:
        return None
    out: dict[str, tuple[np.ndarray, str | None]] = {}
    with open(path, "rb") as f:
        size = path.stat().st_size
        # MAP_POPULATE maps every page in one go: far cheaper than a fault per 4 KiB page.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        view = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ) if size else None
    for name, rule, offset, expected in entries:
        count = math.prod(rule.shape)
        if offset is None or count == 0:
            array = np.zeros(rule.shape, dtype=rule.storage)
        else:  # inside the file: checked by `layout`
            array = np.frombuffer(view, dtype=rule.storage, count=count, offset=offset)
            array = array.reshape(rule.shape)
        if checksum(as_bytes(array)) != expected:
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt (checksum mismatch in {name})")
        if group == "model" and not all_finite(array, rule.torch_dtype):  # as `read_checkpoint`
            raise CorruptCheckpoint(
                f"checkpoint {path} is unreadable or corrupt ({name} holds non-finite values)"
            )
        out[name] = (array, rule.torch_dtype)
    return out


def all_finite(array: np.ndarray, torch_dtype: str | None) -> bool:
    """Whether an array of weights (bf16 as its uint16 bits) holds only finite values."""
    if torch_dtype == "bfloat16":  # stored as uint16: all exponent bits set is inf or NaN
        return not bool(np.any((array & 0x7F80) == 0x7F80))
    # min and max propagate NaN and are inf if any value is (no array-sized temporary).
    return (
        array.dtype.kind != "f"
        or not array.size
        or bool(np.isfinite([array.min(), array.max()]).all())
    )


__all__ = ["all_finite", "mapped_group"]
