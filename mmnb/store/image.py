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

import errno
import fcntl
import io
import mmap
import os
import queue
import threading
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
    writer = FileWriter(path)
    try:
        for offset, array in raw:
            writer.put(offset, array)
        return writer.finish(image)
    except BaseException:
        writer.abort()
        raise


class FileWriter:
    """Creates a file and writes arrays into it on writer threads while the caller goes on
    laying the file out (and checking the state): the disk and the CPU work at the same time.

    `put(offset, array)` hands over an array as soon as HDF5 has allocated its bytes;
    `finish(image)` waits for the arrays, writes the metadata, sets the size and fsyncs.

    The bulk of each array goes through O_DIRECT, from a page-aligned staging buffer, in
    4 KiB-aligned blocks: no page cache (whose state decided how long a buffered write plus
    fsync took: 0.16 s or 0.7 s for the same 340 MB on the development machine), and the CPU
    is free while the device copies. What is not block-aligned — each array's first and last
    partial block, and the metadata — is written with ordinary writes at the end, on pages
    no direct write touches. A file system without O_DIRECT (EINVAL) gets ordinary writes.
    The arrays must not change until `finish` returns (the caller's state is frozen at a
    step boundary: a blocking save, or the host copy of an async one).
    """

    def __init__(self, path: Path, size_hint: int = 0) -> None:
        """`size_hint`: bytes the file will have at least (its arrays'), allocated up front so
        the direct writes overwrite allocated blocks (in parallel) instead of extending the
        file (one at a time)."""
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd = os.open(path, flags, 0o644)
        self.direct = _set_direct(self.fd, True)
        self.edges: list[tuple[int, np.ndarray]] = []
        self.end = 0  # where the last array ends: checked against the image's size
        self.error: BaseException | None = None
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        if self.direct and size_hint > 0:
            try:
                os.posix_fallocate(self.fd, 0, size_hint)  # a full disk fails here, early
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    self._close()
                    discard(path)
                    raise

    def put(self, offset: int, array: np.ndarray) -> None:
        data = as_bytes(array)
        self.end = max(self.end, offset + data.nbytes)
        lo = -(-offset // BLOCK) * BLOCK
        hi = (offset + data.nbytes) // BLOCK * BLOCK
        if not self.direct or hi - lo < DIRECT_MIN:
            self.edges.append((offset, data))
            return
        self.edges.append((offset, data[: lo - offset]))
        self.edges.append((hi, data[hi - offset :]))
        if not self.threads:
            self.threads = [
                threading.Thread(target=self._run, name="mmnb-file-writer", daemon=True)
                for _ in range(WRITERS)
            ]
            for thread in self.threads:
                thread.start()
        for start in range(lo, hi, STAGING):
            self.queue.put((start, data[start - offset : min(hi, start + STAGING) - offset]))

    def finish(self, image: SparseImage) -> int:
        """Write the metadata, set the size, fsync; return the size (OSError on failure: call
        `abort`)."""
        self._join()
        if self.end > image.size:
            raise ValueError(f"an array ends at {self.end}, after the file ({image.size} bytes)")
        if self.direct:
            _set_direct(self.fd, False)
        for offset, data in image.writes:
            _pwrite_all(self.fd, memoryview(data), offset)
        for offset, data in self.edges:
            _pwrite_all(self.fd, memoryview(data), offset)
        os.ftruncate(self.fd, image.size)
        os.fsync(self.fd)
        self._close()
        return image.size

    def abort(self) -> None:
        """Stop writing and remove the partial file."""
        try:
            self._join()
        except BaseException:
            pass
        self._close()
        discard(self.path)

    def _join(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()
        self.threads = []
        if self.error is not None:
            raise self.error

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _run(self) -> None:
        # Never prints (contract 7): a failure is kept and raised by `finish`.
        staging = mmap.mmap(-1, STAGING)  # page-aligned, as O_DIRECT needs (freed with it)
        buffer = np.frombuffer(staging, dtype=np.uint8)
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain: `finish` raises the first error
            offset, data = item
            try:
                if self.direct:
                    buffer[: data.nbytes] = data  # numpy copies without the GIL
                    self._write(memoryview(staging)[: data.nbytes], offset)
                else:
                    self._write(memoryview(data), offset)
            except BaseException as err:
                self.error = err

    def _write(self, data: memoryview, offset: int) -> None:
        try:
            _pwrite_all(self.fd, data, offset)
        except OSError as err:
            # EINVAL: this file system (or a short write that left the offset unaligned)
            # takes no direct I/O here; write the rest through the page cache.
            if err.errno != errno.EINVAL or not self.direct:
                raise
            _set_direct(self.fd, False)
            self.direct = False
            _pwrite_all(self.fd, data, offset)


BLOCK = 4096  # direct I/O alignment: offsets, lengths and memory (logical block size <= 4 KiB)
DIRECT_MIN = 64 * 1024  # smaller arrays are not worth a direct write
STAGING = 16 * 2**20  # bytes per direct write
# Two writers keep two requests in flight: 0.126 s against 0.148 s for one (and 0.154 s for
# buffered writes + fsync) writing 344 MiB on the development machine's virtual disk.
WRITERS = 2


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; False where the system has no O_DIRECT."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | direct) if on else (flags & ~direct))
    except OSError:
        return False
    return on


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
