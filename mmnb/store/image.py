"""Writing an HDF5 file without letting HDF5 touch the disk.

HDF5 does not survive a failed write: after ENOSPC or EFBIG inside `H5Fclose` the library's
state is damaged (a "disk full" ended in `malloc(): unaligned tcache chunk` and a segfault).
So HDF5 only lays the file out, in memory: `SparseImage` is the file object it writes its
metadata into, and the datasets' bytes are allocated but never filled by it. mmnb then writes
the metadata and the arrays at their offsets with plain `os.pwrite`, where a failure is an
ordinary OSError and no HDF5 object is touched after it.

Memory: the image holds only metadata (kilobytes); the arrays are written from the tensors'
own memory.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from .h5state import as_bytes


class SparseImage(io.RawIOBase):
    """A file-like object for h5py's `fileobj` driver that keeps only the bytes written."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[int, bytes]] = []  # in order: a later write wins
        self.size = 0
        self._pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def write(self, data: bytes) -> int:  # type: ignore[override]
        data = bytes(data)
        self.writes.append((self._pos, data))
        self._pos += len(data)
        self.size = max(self.size, self._pos)
        return len(data)

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        # HDF5 rarely reads back what it wrote; unwritten bytes read as zeros.
        n = max(0, min(len(buffer), self.size - self._pos))
        view = memoryview(buffer).cast("B")
        view[:n] = bytes(n)
        lo, hi = self._pos, self._pos + n
        for offset, data in self.writes:
            a, b = max(lo, offset), min(hi, offset + len(data))
            if a < b:
                view[a - lo : b - lo] = data[a - offset : b - offset]
        self._pos += n
        return n

    def truncate(self, size: int | None = None) -> int:
        self.size = self._pos if size is None else size
        self.writes = [(o, d[: max(0, self.size - o)]) for o, d in self.writes if o < self.size]
        return self.size

    def flush(self) -> None:
        pass


def write_file(path: Path, image: SparseImage, raw: list[tuple[int, np.ndarray]]) -> int:
    """Create `path` (it must not exist) with the image's metadata and the raw arrays at their
    offsets; fsync it. Return its size. On OSError the partial file is removed and the error
    re-raised."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        for offset, data in image.writes:
            _pwrite_all(fd, memoryview(data), offset)
        for offset, array in raw:
            if offset + array.nbytes > image.size:
                raise ValueError(f"array at {offset} ends after the file ({image.size} bytes)")
            _pwrite_all(fd, memoryview(as_bytes(array)), offset)
        os.ftruncate(fd, image.size)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        discard(path)
        raise
    os.close(fd)
    return image.size


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        if n <= 0:  # a short write that made no progress: report it as the disk being full
            raise OSError(28, os.strerror(28))
        data, offset = data[n:], offset + n


def discard(path: Path) -> None:
    """Remove a temporary file if possible. On a read-only or broken disk even that fails;
    the next writer removes it then (a temporary name never counts as committed)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
