"""A checkpoint group's tensors as sources to stream into another file, verified as they pass.

For a writer that only passes the bytes on (`mmnb export --format hf|safetensors`): each
tensor is read once, in chunks, from the checkpoint file into one small buffer; each chunk is
hashed and checked for non-finite values there and handed to the writer from that same buffer.
The bytes written are the bytes verified (no second read, no window in which the file could
change between check and copy), and no separate verification pass reads 400 MB first.

A tensor's checksum can only be judged after its last chunk: the writer writes into a
temporary file, and the mismatch (`CorruptCheckpoint` naming the checkpoint file) is raised
from the last `chunks()` step, before the writer can finish; the exporter removes the
temporary output. Every check that precedes reading a byte (manifest, schema, layout) is made
up front by `ckptfile.layout`, as for `mapped_group`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xxhash

from .errors import CorruptCheckpoint, reason
from .h5state import numpy_to_tensor
from .mapped import all_finite, checked_layout

if TYPE_CHECKING:
    from .run import Run

CHUNK = 4 * 2**20  # bytes per read: stays in the CPU's cache between hash, check and write
# A piece stays valid while the next RING - 1 are taken: a writer may still be writing the
# pieces it queued (`safetensors_format._Output` keeps up to IN_FLIGHT + 1 = 3 in flight).
RING = 4


class _Reader:
    """The checkpoint file and the ring of buffers every tensor of the group is read through
    (so one tensor's chunks are taken to the end before the next tensor's start)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ring: list[memoryview] = []
        self._turn = 0

    def chunks(self, offset: int, size: int, step: int) -> Iterator[memoryview]:
        """`size` bytes from `offset` in pieces of at most `step` bytes, each valid until
        RING - 1 more have been taken."""
        if not self._ring:
            self._ring = [memoryview(np.empty(CHUNK, dtype=np.uint8)) for _ in range(RING)]
        fd = self._call(os.open, self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # A larger readahead window: on a cold cache the disk reads ahead while the chunks
            # before are hashed and written. (WILLNEED per tensor read ahead a little more but
            # cost the warm case a walk over every cached page: slower where it matters.)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, offset, size, os.POSIX_FADV_SEQUENTIAL)
            end = offset + size
            while offset < end:
                n = min(step, end - offset)
                buffer = self._ring[self._turn]
                self._turn = (self._turn + 1) % RING
                got = 0
                while got < n:
                    k = self._call(os.preadv, fd, [buffer[got:n]], offset + got)
                    if k <= 0:
                        raise CorruptCheckpoint(f"checkpoint {self.path} is truncated")
                    got += k
                yield buffer[:n]
                offset += n
        finally:
            os.close(fd)

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except FileNotFoundError:  # deleted since it was listed (retention in another process)
            raise CorruptCheckpoint(f"checkpoint {self.path} does not exist") from None
        except OSError as err:
            raise CorruptCheckpoint(
                f"checkpoint {self.path} is unreadable ({reason(err)})"
            ) from None


@dataclasses.dataclass(frozen=True)
class Streamed:
    """One tensor of a checkpoint file, to be written as `dtype` (its stored dtype unless
    converted with `to`). `chunks()` yields its bytes verified; `load()` the whole tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # as written out
    stored: str  # the torch dtype name it was saved as
    storage: np.dtype  # the numpy type of its bytes in the file (bf16: uint16)
    offset: int | None  # None: no bytes in the file (an empty or never-written dataset)
    checksum: str
    finite: bool  # model weights must be finite, as a load requires
    reader: _Reader = dataclasses.field(repr=False)

    def to(self, dtype: torch.dtype) -> Streamed:
        return dataclasses.replace(self, dtype=dtype)

    def numel(self) -> int:
        return math.prod(self.shape)

    def chunks(self) -> Iterator[memoryview]:
        """The tensor's bytes as `dtype`, in pieces valid until RING - 1 more are taken; raises
        CorruptCheckpoint after the last piece if the stored bytes do not match their
        checksum or hold non-finite weights."""
        itemsize = self.storage.itemsize
        size = self.numel() * itemsize
        convert = self.dtype != getattr(torch, self.stored)
        hasher = xxhash.xxh3_64()
        finite = True  # so far
        if self.offset is None:  # HDF5 reads unwritten storage as zeros
            pieces: Iterator[memoryview] = iter([memoryview(bytearray(size))] if size else [])
        else:
            pieces = self.reader.chunks(self.offset, size, CHUNK - CHUNK % itemsize)
        for piece in pieces:
            hasher.update(piece)
            array = np.frombuffer(piece, dtype=self.storage)
            if self.finite and finite:
                finite = all_finite(array, self.stored)
            if convert:
                out = numpy_to_tensor(array, self.stored).to(self.dtype)
                yield _bytes_of(out)
            else:
                yield piece
            del array
        # Judged in this order so a flipped byte reads as the corruption it is, not as a NaN.
        if hasher.hexdigest() != self.checksum:
            raise CorruptCheckpoint(
                f"checkpoint {self.reader.path} is corrupt (checksum mismatch in {self.name})"
            )
        if not finite:
            raise CorruptCheckpoint(
                f"checkpoint {self.reader.path} is unreadable or corrupt "
                f"({self.name} holds non-finite values)"
            )

    def load(self) -> torch.Tensor:
        """The whole tensor as `dtype`, verified (for a value computed from it)."""
        tensor = torch.empty(self.shape, dtype=self.dtype)
        target = _bytes_of(tensor)
        position = 0
        for piece in self.chunks():
            target[position : position + len(piece)] = piece
            position += len(piece)
        return tensor


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, shared (numpy has no bf16: its bits as int16)."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return memoryview(tensor.numpy()).cast("B")


def whole(tensor: torch.Tensor | Streamed) -> torch.Tensor:
    """A tensor, loading (and verifying) a streamed one."""
    return tensor.load() if isinstance(tensor, Streamed) else tensor


def streamed_group(
    path: Path,
    group: str,
    config: dict[str, Any],
    *,
    expect_step: int | None = None,
    expect_checksum: str | None = None,
) -> dict[str, Streamed] | None:
    """{name: Streamed} of the datasets directly in `group` of the checkpoint at `path`,
    written by a run of `config`, after every check a load makes before reading a tensor.

    Raises CorruptCheckpoint naming the file for anything a load would refuse; None when the
    group is not laid out as `write_tree` writes it (the caller falls back to `Run.load`).
    """
    entries = checked_layout(path, config, group, expect_step, expect_checksum)
    if entries is None:
        return None
    reader = _Reader(path)
    out: dict[str, Streamed] = {}
    for name, rule, offset, expected in entries:
        stored = rule.torch_dtype or str(np.dtype(rule.storage))
        out[name] = Streamed(
            name=name,
            shape=tuple(rule.shape),
            dtype=getattr(torch, stored),
            stored=stored,
            storage=np.dtype(rule.storage),
            offset=offset,
            checksum=expected,
            finite=group == "model",
            reader=reader,
        )
    return out


def streamed_checkpoint(run: Run, step: int, group: str = "model") -> dict[str, Streamed] | None:
    """`streamed_group` of checkpoint `step` of `run`, checked as `Run.load` checks it (the
    file the index lists, of the step it says, under the config of the run that wrote it)."""
    info = run.step_info(step)
    return streamed_group(
        run.checkpoint_path(info),
        group,
        run._owner_config(info),
        expect_step=info.step,
        expect_checksum=info.checksum,
    )


__all__ = ["CHUNK", "Streamed", "streamed_checkpoint", "streamed_group", "whole"]
