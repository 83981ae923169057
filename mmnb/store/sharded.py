"""Sharded checkpoints: one shard file per rank, presented whole through HDF5 virtual datasets.

An FSDP2 run holds each parameter and its AdamW moments as a DTensor split by rows (dim 0)
over the ranks. Its checkpoint of step S is still one logical checkpoint, `ckpt/<S>.h5`:

    ckpt/<S>.rank<r>.h5   rank r's rows of every sharded tensor (its local shard), each with
                          `dtype` and `xxh3` attributes; written by rank r, all ranks at once
    ckpt/<S>.h5           written by rank 0 after every shard is on disk: the replicated state
                          as ordinary datasets, and every sharded tensor as a *virtual dataset*
                          of its global shape whose row blocks map to the rank files, at the same
                          path as an unsharded checkpoint (`model/<name>`,
                          `optim/state/<name>/exp_avg`, ...)

So plain h5py reads `f["model/model.norm.weight"][()]` whole, and a loader at any world size
reads only the row blocks it needs. A virtual dataset's `shards` attribute pins the blocks and
the checksum of each shard: the checkpoint file, committed last, vouches for its shards.

What a virtual dataset may point at is exactly this layout and nothing else: sources named
`<S>.rank<r>.h5` in the checkpoint's own folder, for the checkpoint's own step, at the dataset's
own path, as row blocks that tile the whole tensor. Anything else is refused on read
(`StoreError`-compatible `ValueError`), so a crafted file cannot make a loader read outside
the run's folder or fill a tensor with HDF5's fill value.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .h5state import ChecksumError, _checksum, numpy_to_tensor, write_tree

SHARD_FILE = re.compile(r"^(\d{8})\.rank(\d{1,6})\.h5$")
_CKPT_FILE = re.compile(r"^(\d{8})\.h5$")


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    local: dict[str, Any] = {}
    first_of: dict[int, str] = {}  # id(DTensor) -> first path (tied weights are one tensor)
    for path, tensor in sharded.items():
        start, stop = _local_rows(path, tensor)
        if id(tensor) in first_of:
            entries.append(ShardEntry(path, (), "", start, stop, "", link=first_of[id(tensor)]))
            continue
        first_of[id(tensor)] = path
        node = local
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = tensor.to_local()
        dtype = str(tensor.dtype).removeprefix("torch.")
        entries.append(ShardEntry(path, tuple(tensor.shape), dtype, start, stop, ""))
    try:
        with h5py.File(tmp, "w", libver="latest", locking=False) as f:
            write_tree(f, local)
            for e in entries:
                if e.link is None:
                    e.xxh3 = str(f[e.path].attrs["xxh3"])
            f.attrs["step"] = step
            f.attrs["rank"] = rank
            f.attrs["world_size"] = world_size
        _fsync(tmp)
        os.replace(tmp, final)
        _fsync(folder)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return entries, final.stat().st_size


def add_virtual(f: h5py.File, step: int, entries_by_rank: list[list[ShardEntry]]) -> None:
    """Create in checkpoint file `f` one virtual dataset per sharded tensor over the shards."""
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
        stored = _stored_dtype(first.dtype)
        layout = h5py.VirtualLayout(shape=first.shape, dtype=stored)
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
        group = f.require_group(parent) if parent else f
        ds = group.create_virtual_dataset(leaf, layout)
        ds.attrs["dtype"] = first.dtype
        ds.attrs["shards"] = json.dumps(pinned)
    for path, target in links.items():
        parent, _, leaf = path.rpartition("/")
        (f.require_group(parent) if parent else f)[leaf] = f[target]  # a hard link


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


def virtual_blocks(ds: h5py.Dataset) -> list[Block]:
    """The row blocks of a sharded tensor, validated against the layout this module writes."""
    here = Path(ds.file.filename)
    m = _CKPT_FILE.match(here.name)
    if m is None:
        raise ShardLayoutError(f"{here}: a virtual dataset outside a checkpoint file")
    step = int(m.group(1))
    shape = ds.shape
    if not shape:
        raise ShardLayoutError(f"{here}:{ds.name}: a scalar cannot be sharded")
    try:
        pinned = json.loads(ds.attrs["shards"])
    except (KeyError, ValueError) as err:
        raise ShardLayoutError(f"{here}:{ds.name}: no valid 'shards' attribute ({err})") from None
    blocks: list[Block] = []
    for vmap in ds.virtual_sources():
        name, dset = vmap.file_name, vmap.dset_name
        sm = SHARD_FILE.match(name)
        if sm is None or int(sm.group(1)) != step:
            raise ShardLayoutError(
                f"{here}:{ds.name}: virtual source {name!r} is not a shard of step {step} in "
                "the checkpoint's folder"
            )
        if dset != ds.name:
            raise ShardLayoutError(f"{here}:{ds.name}: virtual source names dataset {dset!r}")
        lo, hi = vmap.vspace.get_select_bounds()
        if tuple(lo[1:]) != (0,) * (len(shape) - 1) or tuple(hi[1:]) != tuple(
            n - 1 for n in shape[1:]
        ):
            raise ShardLayoutError(f"{here}:{ds.name}: a block that is not whole rows")
        blocks.append(Block(lo[0], hi[0] + 1, name, ""))
    blocks.sort(key=lambda b: b.start)
    if [[b.file, b.start, b.stop] for b in blocks] != [p[:3] for p in pinned]:
        raise ShardLayoutError(f"{here}:{ds.name}: virtual sources disagree with 'shards'")
    edge = 0
    for b, p in zip(blocks, pinned, strict=True):
        if b.start != edge:
            raise ShardLayoutError(f"{here}:{ds.name}: blocks do not tile rows 0..{shape[0]}")
        b.xxh3 = str(p[3])
        edge = b.stop
    if edge != shape[0]:
        raise ShardLayoutError(f"{here}:{ds.name}: blocks do not tile rows 0..{shape[0]}")
    return blocks


def read_rows(
    ds: h5py.Dataset,
    rows: tuple[int, int] | None = None,
    *,
    verify: bool = True,
    sources: dict[Path, h5py.File] | None = None,
) -> np.ndarray:
    """Rows [start, stop) of a dataset (all when None), plain or sharded.

    A checksum covers a whole dataset or a whole shard, so with `verify` every shard the rows
    touch is read whole (for a loader at the writer's world size: exactly its own shard).
    `sources` caches opened shard files across calls; the caller closes them.
    """
    if not ds.is_virtual:
        if rows is None or verify:
            array = np.asarray(ds[()])
            if verify and _checksum(array) != ds.attrs["xxh3"]:
                raise ChecksumError(f"checksum mismatch in {ds.name}")
            return array if rows is None else array[rows[0] : rows[1]]
        return np.asarray(ds[rows[0] : rows[1]])
    start, stop = rows if rows is not None else (0, ds.shape[0])
    out = np.empty((stop - start, *ds.shape[1:]), dtype=ds.dtype)
    folder = Path(ds.file.filename).parent
    own = sources if sources is not None else {}
    try:
        for b in virtual_blocks(ds):
            lo, hi = max(b.start, start), min(b.stop, stop)
            if lo >= hi:
                continue
            path = folder / b.file
            f = own.get(path)
            if f is None:
                try:
                    f = own[path] = h5py.File(path, "r", locking=False)
                except OSError as err:
                    raise OSError(f"shard {path} is missing or unreadable ({err})") from None
            src = f[ds.name]
            if src.is_virtual or src.shape != (b.stop - b.start, *ds.shape[1:]):
                raise ShardLayoutError(f"{path}:{ds.name}: not the block the checkpoint names")
            if verify:
                block = np.asarray(src[()])
                if _checksum(block) != b.xxh3 or src.attrs.get("xxh3") != b.xxh3:
                    raise ChecksumError(f"checksum mismatch in {path}:{ds.name}")
                out[lo - start : hi - start] = block[lo - b.start : hi - b.start]
            else:
                out[lo - start : hi - start] = src[lo - b.start : hi - b.start]
    finally:
        if sources is None:
            for f in own.values():
                f.close()
    return out


class TensorRef:
    """A tensor of a checkpoint not read yet: `read()` all of it, `read((a, b))` rows a..b.

    What a loader that needs only part of a checkpoint (a rank of another world size, the
    weights without the optimizer) holds instead of the bytes.
    """

    def __init__(self, file: Path, name: str, shape: tuple[int, ...], dtype: str) -> None:
        self.file, self.name, self.shape, self.dtype = file, name, shape, dtype

    def __repr__(self) -> str:
        return f"TensorRef({self.file.name}:{self.name}, shape={self.shape}, dtype={self.dtype})"

    def read(self, rows: tuple[int, int] | None = None, verify: bool = True) -> torch.Tensor:
        from .run import CorruptCheckpoint

        try:
            with h5py.File(self.file, "r", locking=False) as f:
                array = read_rows(f[self.name], rows, verify=verify)
        except (OSError, KeyError, ValueError) as err:  # ChecksumError, ShardLayoutError too
            raise CorruptCheckpoint(
                f"checkpoint {self.file} is unreadable or corrupt ({err})"
            ) from None
        return numpy_to_tensor(array, self.dtype)


def read_lazy(group: h5py.Group, *, verify: bool = True) -> dict[str, Any]:
    """Like `read_tree`, with every tensor as a `TensorRef` (arrays and JSON are read)."""
    tree: dict[str, Any] = json.loads(group.attrs["json"]) if "json" in group.attrs else {}
    file = Path(group.file.filename)
    for key, item in group.items():
        if isinstance(item, h5py.Group):
            tree[key] = read_lazy(item, verify=verify)
            continue
        dtype = item.attrs.get("dtype")
        if dtype is None:
            array = read_rows(item, verify=verify)
            tree[key] = array
        else:
            tree[key] = TensorRef(file, item.name, tuple(item.shape), str(dtype))
    return tree


LAZY_GROUPS = ("model", "optim")  # the big ones; the rest is read at once


def load_lazy(run: Any, step: int, groups: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Checkpoint `step` of `run` with its tensors as `TensorRef`s: a loader reads only what
    it needs, when it needs it. Raises CorruptCheckpoint naming the file."""
    from .h5state import read_tree
    from .run import STATE_GROUPS, CorruptCheckpoint

    path = (run.path / run.step_info(step).file).resolve()
    try:
        with h5py.File(path, "r", locking=False) as f:
            return {
                k: read_lazy(f[k]) if k in LAZY_GROUPS else read_tree(f[k])
                for k in groups or STATE_GROUPS
                if k in f
            }
    except (OSError, KeyError, ValueError) as err:
        raise CorruptCheckpoint(f"checkpoint {path} is unreadable or corrupt ({err})") from None


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
    "read_lazy",
    "read_rows",
    "shard_file_name",
    "shard_files",
    "split_sharded",
    "virtual_blocks",
    "write_shard",
]


def commit_sharded(run: Any, state: dict[str, Any], reasons: list[str], tags: list[str], par: Any):
    """Commit the state of every rank as one checkpoint; every rank calls this (a collective).

    `par` is the job's `mmnb.dist.Parallel`. The protocol:
    1. rank 0 says whether the step is committed already (then only its reasons are merged);
    2. every rank writes its shard file (temporary name, fsync, rename) — all at once;
    3. gathering every rank's result at rank 0 is the barrier: rank 0 goes on only when every
       shard is on disk, and removes them all if any rank failed;
    4. rank 0 writes the checkpoint file — replicated state and the virtual datasets — under
       a temporary name, fsyncs and renames it, and replaces the index (`Run.commit`);
    5. every rank receives rank 0's StepInfo (or its error) before it goes on.
    A crash before 4 completes leaves shard files without a checkpoint file: not a checkpoint,
    never listed, removed by the next writer (`Run._reconcile`). Replicated (DDP) state has
    no shard files: rank 0 writes it once.
    """
    from .run import CKPT_DIR, StoreError

    step = int(state["trainer"]["step"])
    if par.decide(lambda: run.is_committed(step)):
        return par.decide(lambda: run.commit(state, reasons, tags))
    plain, sharded = split_sharded(state)
    if not sharded:
        return par.decide(lambda: run.commit(plain, reasons, tags))
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

        def virtual(f: h5py.File) -> int:
            add_virtual(f, step, [entries for entries, _, _ in gathered])
            return sum(size for _, size, _ in gathered)

        return run.commit(plain, reasons, tags, shards=virtual)

    return par.decide(commit)
