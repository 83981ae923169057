"""Sharded checkpoints: one shard file per rank, presented whole through HDF5 virtual datasets.

An FSDP2 run holds each parameter and its AdamW moments as a DTensor split by rows (dim 0)
over the ranks. Its checkpoint of step S is still one logical checkpoint, `ckpt/<S>.h5`:

    ckpt/<S>.rank<r>.h5   rank r's rows of every sharded tensor (its local shard), plain
                          contiguous datasets at the tensor's path; written by rank r, all
                          ranks at once
    ckpt/<S>.h5           written by rank 0 after every shard is on disk, through the store's
                          one commit (`Run.commit`, format version 2): the replicated state as
                          ordinary datasets, and every sharded tensor as a *virtual dataset* of
                          its global shape whose row blocks map to the rank files, at the same
                          path as an unsharded checkpoint (`model/<name>`,
                          `optim/state/<name>/exp_avg`, ...)

So plain h5py reads `f["model/model.norm.weight"][()]` whole, and a loader at any world size
reads only the row blocks it needs. The checkpoint's manifest lists each sharded tensor with
`shards`: `[[file, first row, end row, xxh3], ...]`, the checksum of each rank's rows; the
manifest is itself under a checksum, and the run's index holds that checksum, so the checkpoint
file, committed last, vouches for every byte of its shards.

A virtual dataset may draw only from shard files of its own step in its own folder
(`own_shard`, on top of the store's confinement and structural checks in `h5guard`), and its
pinned blocks must tile the rows: anything else is refused as a corrupt checkpoint.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from ..durable import fsync
from . import h5guard, schema
from .h5state import ChecksumError, checksum, numpy_to_tensor, tensor_to_numpy

SHARD_FILE = re.compile(r"^(\d{8})\.rank(\d{1,6})\.h5$")


class ShardLayoutError(ValueError):
    """A virtual dataset that is not the sharded layout this module writes."""


def shard_file_name(step: int, rank: int) -> str:
    return f"{step:08d}.rank{rank}.h5"


def is_dtensor(value: Any) -> bool:
    # No DTensor can exist unless its module was imported: `mmnb runs` need not import it.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


@dataclass
class ShardEntry:
    """One rank's block of one sharded tensor, as that rank wrote it."""

    path: str  # "model/<name>" or "optim/state/<name>/<slot>"
    shape: tuple[int, ...]  # global shape
    dtype: str  # torch dtype name
    start: int  # first global row of this block
    stop: int  # one past the last
    xxh3: str  # checksum of the block's bytes
    link: str | None = None  # the same tensor as `link` (tied weights): one copy on disk


def split_sharded(tree: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """(the tree without DTensors, {"a/b/c": DTensor}) — the replicated and the sharded part."""
    plain: dict[str, Any] = {}
    sharded: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            plain[key], inner = split_sharded(value, path + "/")
            sharded.update(inner)
        elif is_dtensor(value):
            sharded[path] = value
        else:
            plain[key] = value
    return plain, sharded


def _local_rows(path: str, tensor: Any) -> tuple[int, int]:
    """The global rows this rank's shard of `tensor` covers (FSDP2 shards dim 0)."""
    chunks = tensor.__create_chunk_list__()
    shape = tuple(tensor.shape)
    if len(chunks) != 1 or not shape:
        raise ShardLayoutError(f"{path}: expected one row block per rank, got {len(chunks)}")
    offsets, sizes = tuple(chunks[0].offsets), tuple(chunks[0].sizes)
    if any(offsets[1:]) or sizes[1:] != shape[1:]:
        raise ShardLayoutError(f"{path}: sharded along a dimension other than 0")
    return offsets[0], offsets[0] + sizes[0]


def write_shard(
    folder: Path, step: int, rank: int, world_size: int, sharded: dict[str, Any]
) -> tuple[list[ShardEntry], int]:
    """Write this rank's shards of `sharded` to `folder/<step>.rank<rank>.h5`.

    Written under a temporary name, fsynced and renamed: the file is complete or absent. It
    is not a checkpoint yet — that takes rank 0's checkpoint file, written after every rank's
    shard. Returns the entries rank 0 needs for the virtual datasets, and the file's size.
    """
    final = folder / shard_file_name(step, rank)
    tmp = folder / f".{final.name}.{os.getpid()}.tmp"
    entries: list[ShardEntry] = []
    local: dict[str, Any] = {}  # path -> this rank's rows
    first_of: dict[int, str] = {}  # id(DTensor) -> first path (tied weights are one tensor)
    for path, tensor in sharded.items():
        start, stop = _local_rows(path, tensor)
        if id(tensor) in first_of:
            entries.append(ShardEntry(path, (), "", start, stop, "", link=first_of[id(tensor)]))
            continue
        first_of[id(tensor)] = path
        local[path] = tensor.to_local()
        if schema.non_finite({"model": {path: local[path]}}) is not None:
            # (the trainer stops before such a step; this is the store's own guarantee)
            raise ValueError(f"refusing to checkpoint step {step}: {path} is not finite")
        dtype = str(tensor.dtype).removeprefix("torch.")
        entries.append(ShardEntry(path, tuple(tensor.shape), dtype, start, stop, ""))
    try:
        with h5py.File(tmp, "w", libver="latest", locking=False) as f:
            for e in entries:
                if e.link is None:
                    array = tensor_to_numpy(local[e.path])
                    f.create_dataset(e.path, data=array)  # contiguous: what h5guard reads
                    e.xxh3 = checksum(array)
            f.attrs["step"] = step
            f.attrs["rank"] = rank
            f.attrs["world_size"] = world_size
        fsync(tmp)
        os.replace(tmp, final)
        fsync(folder)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return entries, final.stat().st_size


def add_virtual(
    f: h5py.File, manifest: dict[str, Any], step: int, entries_by_rank: list[list[ShardEntry]]
) -> None:
    """Create in checkpoint file `f` one virtual dataset per sharded tensor over the shards,
    each listed in `manifest` with its pinned blocks (`shards`) instead of one checksum."""
    blocks: dict[str, list[tuple[int, ShardEntry]]] = {}
    links: dict[str, str] = {}
    for rank, entries in enumerate(entries_by_rank):
        for e in entries:
            if e.link is not None:
                links[e.path] = e.link
            else:
                blocks.setdefault(e.path, []).append((rank, e))
    for path, ranks in blocks.items():
        ranks.sort(key=lambda re_: re_[1].start)
        first = ranks[0][1]
        layout = h5py.VirtualLayout(shape=first.shape, dtype=_stored_dtype(first.dtype))
        pinned = []
        for rank, e in ranks:
            if e.stop <= e.start:
                continue  # an empty shard (more ranks than rows) maps nothing
            rows = e.stop - e.start
            source = h5py.VirtualSource(
                shard_file_name(step, rank), "/" + path, shape=(rows, *first.shape[1:])
            )
            layout[e.start : e.stop] = source
            pinned.append([shard_file_name(step, rank), e.start, e.stop, e.xxh3])
        parent, _, leaf = path.rpartition("/")
        _require_groups(f, manifest, parent)
        ds = f[parent].create_virtual_dataset(leaf, layout)
        ds.attrs["dtype"] = first.dtype  # for plain h5py readers, as h5state writes it
        manifest["datasets"][path] = {
            "shape": list(first.shape), "torch": first.dtype, "shards": pinned,
        }  # fmt: skip
    for path, target in links.items():
        parent, _, leaf = path.rpartition("/")
        _require_groups(f, manifest, parent)
        f[parent][leaf] = f[target]  # a hard link
        manifest["datasets"][path] = dict(manifest["datasets"][target])


def _require_groups(f: h5py.File, manifest: dict[str, Any], path: str) -> None:
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        if sub not in f:
            f.create_group(sub)
        manifest["groups"].setdefault(sub, None)


def _stored_dtype(dtype_name: str) -> np.dtype:
    if dtype_name == "bfloat16":
        return np.dtype(np.uint16)  # bf16 bits, as h5state stores them
    return torch.empty((), dtype=getattr(torch, dtype_name)).numpy().dtype


# ---- reading ---------------------------------------------------------------------------------


@dataclass
class Block:
    start: int
    stop: int
    file: str  # shard file name, in the checkpoint's folder
    xxh3: str


def own_shard(name: str, step: int) -> str:
    """`name`, if it is a shard file of checkpoint `step` in the checkpoint's own folder: the
    only source a virtual dataset of a checkpoint may name (ShardLayoutError otherwise)."""
    m = SHARD_FILE.match(name)
    if m is None or int(m.group(1)) != step:
        raise ShardLayoutError(
            f"virtual source {name!r} is not a shard of step {step} in the checkpoint's folder"
        )
    return name


def shard_source(root: Path, folder: Path, name: str, step: int) -> str:
    """The checked path of virtual source `name` of a checkpoint of `step` in `folder`: inside
    the store (`confine.virtual_source`), and one of that step's own shard files."""
    from . import confine

    path = confine.virtual_source(root, folder, name)
    own_shard(name, step)
    return path


def pinned_blocks(path: str, entry: dict[str, Any], shape: tuple[int, ...]) -> list[Block]:
    """The row blocks a manifest entry pins for sharded tensor `path`, checked to be shard
    files that tile rows 0..shape[0] in order (ShardLayoutError otherwise)."""
    pinned = entry.get("shards")
    if not shape or not isinstance(pinned, list) or len(pinned) > 65536:
        raise ShardLayoutError(f"/{path}: invalid 'shards' in the manifest")
    blocks, edge = [], 0
    for p in pinned:
        ok = (
            isinstance(p, list)
            and len(p) == 4
            and isinstance(p[0], str)
            and SHARD_FILE.match(p[0]) is not None
            and all(isinstance(n, int) and not isinstance(n, bool) for n in p[1:3])
            and isinstance(p[3], str)
        )
        if not ok:
            raise ShardLayoutError(f"/{path}: invalid 'shards' entry {p!r}")
        if p[1] != edge or p[2] <= p[1]:
            raise ShardLayoutError(f"/{path}: shards do not tile rows 0..{shape[0]}")
        blocks.append(Block(p[1], p[2], p[0], p[3]))
        edge = p[2]
    if edge != shape[0]:
        raise ShardLayoutError(f"/{path}: shards do not tile rows 0..{shape[0]}")
    return blocks


class TensorRef:
    """A tensor of a checked checkpoint not read yet: `read()` all of it, `read((a, b))` rows
    a..b — only the shards those rows lie in are read, each verified whole against its pinned
    checksum. What a loader that needs only part of a checkpoint (a rank of another world size)
    holds instead of the bytes. Raises CorruptCheckpoint naming the file."""

    def __init__(
        self,
        file: Path,
        path: str,
        rule: Any,
        entry: dict[str, Any],
        manifest_sum: str,
        virtual_source: Callable[[str], str],
    ) -> None:
        self.file, self.path, self.rule, self.entry = file, path, rule, entry
        self.manifest_sum, self.virtual_source = manifest_sum, virtual_source
        self.shape, self.dtype = tuple(rule.shape), rule.torch_dtype

    def __repr__(self) -> str:
        return f"TensorRef({self.file.name}:/{self.path}, shape={self.shape}, dtype={self.dtype})"

    def read(self, rows: tuple[int, int] | None = None, verify: bool = True) -> torch.Tensor:
        from .errors import CorruptCheckpoint, reason

        try:
            tensor = numpy_to_tensor(self._read(rows, verify), self.dtype)
            # As `Run.load`: mmnb never commits a non-finite weight or moment, so a file
            # holding one (under valid checksums) is crafted.
            if schema.non_finite({"model": {self.path: tensor}}) is not None:
                raise ValueError(f"/{self.path} holds non-finite values")
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as err:
            raise CorruptCheckpoint(
                f"checkpoint {self.file} is unreadable or corrupt ({reason(err)})"
            ) from None
        return tensor

    def _read(self, rows: tuple[int, int] | None, verify: bool) -> np.ndarray:
        storage, shape = self.rule.storage, self.shape
        with h5py.File(self.file, "r", locking=False) as f:
            # The file checked when the state was loaded, not one put in its place since.
            if h5guard.read_attr(f, "manifest_xxh3", str) != self.manifest_sum:
                raise ChecksumError("the file changed since it was checked")
            ds = h5guard.open_path(f, self.path)
            if not isinstance(ds, h5py.Dataset):
                raise h5guard.UnsafeFile(f"/{self.path} is not a dataset")
            h5guard.check_dataset(
                ds, storage, shape, os.path.getsize(self.file), self.virtual_source
            )
            if not shape or (rows is None and "shards" not in self.entry):
                array = h5guard.read_array(ds, storage, shape)
                if verify and checksum(array) != self.entry.get("xxh3"):
                    raise ChecksumError(f"checksum mismatch in /{self.path}")
                return array
            if "shards" in self.entry:
                blocks = pinned_blocks(self.path, self.entry, shape)
            else:
                blocks = [Block(0, shape[0], self.file.name, str(self.entry.get("xxh3")))]
            start, stop = rows if rows is not None else (0, shape[0])
            out = np.empty((stop - start, *shape[1:]), dtype=storage)
            for b in blocks:
                lo, hi = max(b.start, start), min(b.stop, stop)
                if lo >= hi:
                    continue  # rows this loader does not need: their shard is never read
                if verify:  # a checksum covers a whole block: read it all
                    block = np.empty((b.stop - b.start, *shape[1:]), dtype=storage)
                    ds.read_direct(block, np.s_[b.start : b.stop])
                    if checksum(block) != b.xxh3:
                        raise ChecksumError(f"checksum mismatch in /{self.path} ({b.file})")
                    out[lo - start : hi - start] = block[lo - b.start : hi - b.start]
                else:
                    ds.read_direct(out, np.s_[lo:hi], np.s_[lo - start : hi - start])
            return out


LAZY_GROUPS = ("model", "optim")  # the big ones; the rest is read at once


def load_lazy(run: Any, step: int, groups: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Checkpoint `step` of `run`, checked as `Run.load` checks it, with the tensors of the
    model and optimizer as `TensorRef`s: a loader reads only what it needs, when it needs it.
    Raises CorruptCheckpoint naming the file."""
    from . import ckptfile
    from .errors import CorruptCheckpoint, StoreError, reason
    from .h5state import read_tree
    from .run import PARSE_ERRORS, STATE_GROUPS

    info = run.step_info(step)
    path = run.checkpoint_path(info)
    config = run._owner_config(info)

    def source(name: str) -> str:
        return shard_source(run.store.path, path.parent, name, info.step)

    try:
        file_size = os.path.getsize(path)
        with h5py.File(path, "r", locking=False) as f:
            checked = ckptfile._Checked(
                f, path, config, groups or STATE_GROUPS, info.step, info.checksum
            )
            manifest_sum = h5guard.read_attr(f, "manifest_xxh3", str)

            def lazy(name: str, rule: Any, entry: dict[str, Any]) -> TensorRef:
                return TensorRef(path, name, rule, entry, manifest_sum, source)

            state = {
                g: read_tree(
                    checked.objects,
                    checked.manifest,
                    g,
                    checked.rule,
                    file_size,
                    virtual_source=source,
                    lazy=lazy if g in LAZY_GROUPS else None,
                )  # fmt: skip
                for g in checked.groups
            }
        for group, values in state.items():
            ckptfile._check_json_tree(group, values, checked.spec, checked.step)
    except StoreError as err:
        raise CorruptCheckpoint(f"checkpoint {path}: {err}") from None
    except PARSE_ERRORS as err:
        raise CorruptCheckpoint(
            f"checkpoint {path} is unreadable or corrupt ({reason(err)})"
        ) from None
    return state


def shard_files(folder: Path, step: int) -> list[Path]:
    """The shard files of `step` in a run's checkpoint folder."""
    prefix = f"{step:08d}.rank"
    return sorted(
        p for p in folder.iterdir() if p.name.startswith(prefix) and SHARD_FILE.match(p.name)
    )


__all__ = [
    "SHARD_FILE",
    "ShardEntry",
    "ShardLayoutError",
    "TensorRef",
    "add_virtual",
    "commit_sharded",
    "is_dtensor",
    "load_lazy",
    "own_shard",
    "shard_source",
    "pinned_blocks",
    "shard_file_name",
    "shard_files",
    "split_sharded",
    "write_shard",
]


def commit_sharded(
    run: Any,
    state: dict[str, Any],
    reasons: list[str],
    tags: list[str],
    par: Any,
    notify: Callable[[str], None] | None = None,
) -> Any:
    """Commit the state of every rank as one checkpoint; every rank calls this (a collective).

    `par` is the job's `mmnb.dist.Parallel`. The protocol:
    1. rank 0 says whether the step is committed and intact already (then only its reasons
       are merged; a corrupt one is moved aside with its shards, `Run.settled`);
    2. every rank writes its shard file (temporary name, fsync, rename) — all at once;
    3. gathering every rank's result at rank 0 is the barrier: rank 0 goes on only when every
       shard is on disk, and removes them all if any rank failed;
    4. rank 0 writes the checkpoint file — replicated state, the virtual datasets and the
       manifest pinning every shard's checksum — through the store's one commit (temporary
       name, fsync, rename, then the index: `Run.commit`);
    5. every rank receives rank 0's StepInfo (or its error) before it goes on.
    A crash before 4 completes leaves shard files without a checkpoint file: not a checkpoint,
    never listed, removed by the next writer (`Run._reconcile`). Replicated (DDP) state has
    no shard files: rank 0 writes it once.
    """
    from .errors import StoreError
    from .runfile import CKPT_DIR

    step = int(state["trainer"]["step"])
    plain, sharded = split_sharded(state)
    if not sharded or par.decide(lambda: run.settled(step, notify)):
        return par.decide(lambda: run.commit(plain, reasons, tags, notify))
    folder = run.path / CKPT_DIR
    try:
        mine: tuple[Any, int, str | None] = (
            *write_shard(folder, step, par.rank, par.world_size, sharded),
            None,
        )
    except Exception as err:
        mine = (None, 0, f"{type(err).__name__}: {err}")
    gathered = par.gather(mine)

    def commit() -> Any:
        failed = [(rank, error) for rank, (_, _, error) in enumerate(gathered) if error]
        if failed:
            for shard in shard_files(folder, step):
                shard.unlink(missing_ok=True)
            rank, error = failed[0]
            raise StoreError(f"rank {rank} could not write its shard of step {step}: {error}")

        def virtual(f: h5py.File, manifest: dict[str, Any]) -> int:
            add_virtual(f, manifest, step, [entries for entries, _, _ in gathered])
            return sum(size for _, size, _ in gathered)

        return run.commit(plain, reasons, tags, notify, shards=virtual)

    return par.decide(commit)
