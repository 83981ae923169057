"""image.FileWriter: arrays written on a writer thread (direct I/O for their block-aligned
bulk, ordinary writes for the rest) give exactly the bytes a plain sequential write gives, and a
failing write leaves no file."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_store_writes import tmpfs

from mmnb.store import image
from mmnb.store.image import FileWriter, SparseImage


def _layout(seed: int = 0) -> tuple[SparseImage, list[tuple[int, np.ndarray]], bytes]:
    """Arrays at 64-byte (not 4 KiB) aligned offsets, big ones with odd lengths, metadata
    before, between (a later write partly overwriting an earlier one) and after them; and the
    bytes the file must hold."""
    rng = np.random.default_rng(seed)
    sizes = [100, 3 * 2**20 + 7, 200_000, 5000, 20 * 2**20 + 4097, 64 * 1024 + 1, 17]
    raw, offset = [], 1000
    for size in sizes:
        offset = -(-offset // 64) * 64
        raw.append((offset, rng.integers(0, 256, size, dtype=np.uint8)))
        offset += size + 300  # gaps: holes (zeros) or metadata
    img = SparseImage()
    img.seek(0)
    img.write(b"superblock" * 50)
    img.seek(raw[2][0] - 200)
    img.write(b"m" * 150)
    img.seek(raw[2][0] - 180)
    img.write(b"later wins")
    img.seek(offset)
    img.write(b"tail" * 1000)
    expected = bytearray(img.size)
    for off, data in img.writes:
        expected[off : off + len(data)] = data
    for off, array in raw:
        expected[off : off + array.nbytes] = array.tobytes()
    return img, raw, bytes(expected)


def _direct_io_works(folder: Path) -> bool:
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    os.unlink(folder / "probe")
    return True


def test_writer_gives_the_exact_bytes_with_direct_io(tmp_path):
    img, raw, expected = _layout()
    writer = FileWriter(tmp_path / "f")
    assert writer.direct == _direct_io_works(tmp_path)
    for offset, array in raw:
        writer.put(offset, array)
    assert writer.finish(img) == len(expected)
    assert (tmp_path / "f").read_bytes() == expected


def test_without_direct_io_the_bytes_are_the_same(tmp_path, monkeypatch):
    img, raw, expected = _layout(1)
    monkeypatch.setattr(image, "_set_direct", lambda fd, on: False)
    writer = FileWriter(tmp_path / "f")
    assert not writer.direct
    for offset, array in raw:
        writer.put(offset, array)
    writer.finish(img)
    assert (tmp_path / "f").read_bytes() == expected


def test_direct_io_refused_midway_falls_back_to_ordinary_writes(tmp_path, monkeypatch):
    """A file system that accepts O_DIRECT on open but refuses a write (EINVAL)."""
    img, raw, expected = _layout(2)
    real = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    writer = FileWriter(tmp_path / "f")
    for offset, array in raw:
        writer.put(offset, array)
    writer.finish(img)
    assert (tmp_path / "f").read_bytes() == expected
    if _direct_io_works(tmp_path):
        assert refused  # the direct path was taken, refused, and the write still completed


def test_a_file_size_limit_fails_the_write_and_removes_the_file(tmp_path):
    """RLIMIT_FSIZE: the direct write comes back short, then EFBIG: an OSError, no file."""
    code = textwrap.dedent(
        """
        import errno, resource, sys
        from pathlib import Path
        sys.path.insert(0, sys.argv[2])
        from test_store_image import _layout
        from mmnb.store.image import FileWriter
        img, raw, _ = _layout()
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 2**20, 2 * 2**20))
        path = Path(sys.argv[1])
        writer = FileWriter(path)
        try:
            for offset, array in raw:
                writer.put(offset, array)
            writer.finish(img)
        except OSError as err:
            writer.abort()
            print("errno", err.errno, "exists", path.exists())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "f"), str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["errno", str(errno.EFBIG), "exists", "False"]


def test_a_full_disk_fails_the_write_and_removes_the_file(tmp_path):
    with tmpfs(tmp_path / "small", "8m") as folder:
        if folder is None:
            pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
        img, raw, _ = _layout()  # ~24 MiB of arrays
        writer = FileWriter(folder / "f")
        with pytest.raises(OSError) as err:
            for offset, array in raw:
                writer.put(offset, array)
            writer.finish(img)
        writer.abort()
        assert err.value.errno == errno.ENOSPC
        assert not (folder / "f").exists()
