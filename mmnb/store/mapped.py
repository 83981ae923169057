"""Read-only, zero-copy views of a checkpoint group's arrays: one mmap of the file, checksums
verified, nothing copied into Python memory.

For readers that only pass the bytes on (`mmnb export` writing a safetensors file): a tensor is a
window on the page cache, so exporting costs one write instead of a read, a copy and a write.
It needs the layout `write_tree` produces (contiguous datasets, no filters, little-endian) and
returns None for anything else, so the caller falls back to `Run.load`.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path

import h5py
import numpy as np
import xxhash

from .errors import CorruptCheckpoint


def mapped_group(path: Path, group: str) -> dict[str, tuple[np.ndarray, str | None]] | None:
    """{name: (read-only array view, torch dtype name)} of the datasets directly in `group`.

    Raises CorruptCheckpoint naming the file on a checksum mismatch or a dataset outside the file;
    None when the group is not laid out as `write_tree` writes it.
    """
    entries = []
    try:
        with h5py.File(path, "r", locking=False) as f:
            for name, ds in f[group].items():
                if not isinstance(ds, h5py.Dataset):
                    return None
                plist = ds.id.get_create_plist()
                if plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_nfilters():
                    return None
                if ds.dtype.byteorder == ">" or ds.dtype.hasobject:
                    return None
                offset = ds.id.get_offset()  # None: never written (an empty dataset)
                entries.append(
                    (name, ds.dtype, ds.shape, offset, ds.attrs["xxh3"], ds.attrs.get("dtype"))
                )
    except (OSError, KeyError) as err:
        raise CorruptCheckpoint(f"checkpoint {path} is unreadable ({err})") from None
    out: dict[str, tuple[np.ndarray, str | None]] = {}
    with open(path, "rb") as f:
        size = path.stat().st_size
        # MAP_POPULATE maps every page in one go: far cheaper than a fault per 4 KiB page.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        view = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ) if size else None
    for name, dtype, shape, offset, checksum, torch_dtype in entries:
        count = math.prod(shape)
        if offset is None or count == 0:
            array = np.zeros(shape, dtype=dtype)
        elif offset + count * dtype.itemsize > size:
            raise CorruptCheckpoint(f"checkpoint {path}: dataset {name} lies outside the file")
        else:
            array = np.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(shape)
        if xxhash.xxh3_64_hexdigest(memoryview(array).cast("B")) != checksum:
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt (checksum mismatch in {name})")
        out[name] = (array, torch_dtype)
    return out


__all__ = ["mapped_group"]
