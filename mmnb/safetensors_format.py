"""The safetensors file format, read and written here in a few lines (no dependency).

Layout: an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}` (padded
with spaces to a multiple of 8), then the tensors' raw little-endian bytes back to back.
Nothing in it can execute code; the reader still checks every field before it trusts it,
because the file may come from anywhere.
"""

from __future__ import annotations

import errno
import json
import math
import os
import queue
import struct
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # as the reference implementation


class SafetensorsError(ValueError):
    """A file that is not a well-formed safetensors file; the message names it."""


WRITEBACK = 16 * 2**20  # bytes after which the disk is asked to start writing them


def _raw(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy where it is already contiguous on the CPU."""
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: view the bits
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def _pieces(tensor: Any) -> Iterator[memoryview]:
    """A tensor's bytes; a source with `chunks()` (`mmnb.store.streamed.Streamed`) gives them
    piece by piece, verified, and raises after its last piece if they were not as saved."""
    if hasattr(tensor, "chunks"):
        yield from tensor.chunks()
    elif tensor.numel():
        yield _raw(tensor)


class _Output:
    """Sequential positioned writes to a file descriptor. `durable`: every WRITEBACK bytes the
    range written is handed to the disk while the rest is still being produced, so the fsync
    at the end waits for the last few MiB instead of the whole file (write and disk overlap).
    `close()` before the descriptor is closed."""

    def __init__(self, fd: int, durable: bool) -> None:
        self.fd, self.durable = fd, durable
        self.position = self.handed = 0
        self._writeback = durable and hasattr(os, "posix_fadvise")
        self._ranges: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data)
        while len(view):
            n = os.pwrite(self.fd, view, self.position)
            if n <= 0:  # a short write that made no progress: the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[n:]
            self.position += n
        if self._writeback and self.position - self.handed >= WRITEBACK:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=_hand_to_disk,
                    args=(self.fd, self._ranges),
                    name="mmnb-writeback",
                    daemon=True,
                )
                self._thread.start()
            self._ranges.put((self.handed, self.position - self.handed))
            self.handed = self.position

    def close(self) -> None:
        if self._thread is not None:
            self._ranges.put(None)
            self._thread.join()
            self._thread = None

    def finish(self) -> None:
        self.close()
        if self.durable:
            os.fsync(self.fd)


def _hand_to_disk(fd: int, ranges: queue.SimpleQueue[tuple[int, int] | None]) -> None:
    """Start writing back each range handed over. POSIX_FADV_DONTNEED submits a range's dirty
    pages (it frees none of them while they are in flight); submitting walks every page, so
    it runs here, on another core, while the writer goes on."""
    while (item := ranges.get()) is not None:
        try:
            os.posix_fadvise(fd, item[0], item[1], os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # advice only: the fsync at the end writes whatever this did not


def write(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
    *,
    durable: bool = True,
) -> int:
    """Write `tensors` (in the given order) and string `metadata`; return the file's size.

    Values are torch tensors or sources with `dtype`, `shape` and `chunks()`. `durable`: the
    file is fsynced before this returns. A failure leaves the partial file for the caller to
    remove (it writes under a temporary name)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    sizes = []
    for name, tensor in tensors.items():
        if tensor.dtype not in NAMES:
            raise SafetensorsError(f"{name}: dtype {tensor.dtype} has no safetensors name")
        sizes.append(tensor.numel() * tensor.dtype.itemsize)
        header[name] = {
            "dtype": NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + sizes[-1]],
        }
        offset += sizes[-1]
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    out = _Output(fd, durable)
    try:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for (name, tensor), size in zip(tensors.items(), sizes, strict=True):
            end = out.position + size
            for piece in _pieces(tensor):
                out.write(piece)
            if out.position != end:  # a source that gave other than its shape's bytes
                raise SafetensorsError(f"{name}: {out.position - end:+d} bytes against its shape")
        out.finish()
    finally:
        out.close()
        os.close(fd)
    return 8 + len(blob) + offset


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, dict], dict[str, str], int]:
    """(entries, metadata, data start) of a safetensors file, every field checked."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path}: too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise SafetensorsError(f"{path}: header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SafetensorsError(f"{path}: not a readable safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
    spans = []
    for name, entry in header.items():
        ok = (
            isinstance(entry, dict)
            and entry.get("dtype") in DTYPES
            and isinstance(entry.get("shape"), list)
            and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
            and all(isinstance(o, int) for o in entry["data_offsets"])
        )
        if not ok:
            raise SafetensorsError(f"{path}: malformed header entry for {name!r}")
        begin, end = entry["data_offsets"]
        itemsize = torch.empty((), dtype=DTYPES[entry["dtype"]]).element_size()
        if end - begin != math.prod(entry["shape"]) * itemsize or begin < 0:
            raise SafetensorsError(f"{path}: {name!r} has offsets that do not fit its shape")
        spans.append((begin, end, name))
    # The tensors must tile the data section exactly: no gaps, overlaps or bytes past the end.
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise SafetensorsError(f"{path}: {name!r} does not start where the previous ends")
        position = end
    if 8 + n + position != size:
        raise SafetensorsError(f"{path}: the data section is {size - 8 - n} bytes, not {position}")
    return header, metadata, 8 + n


def read(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors in file order, metadata) of a safetensors file."""
    header, metadata, start = read_header(path)
    tensors: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = DTYPES[entry["dtype"]]
            storage = torch.int16 if dtype == torch.bfloat16 else dtype
            tensor = torch.empty(entry["shape"], dtype=storage)
            if tensor.numel():
                f.seek(start + entry["data_offsets"][0])
                if f.readinto(memoryview(tensor.numpy()).cast("B")) != tensor.nbytes:
                    raise SafetensorsError(f"{path}: truncated while reading {name!r}")
            tensors[name] = tensor.view(dtype) if storage is not dtype else tensor
    return tensors, metadata


__all__ = ["SafetensorsError", "read", "read_header", "write"]
