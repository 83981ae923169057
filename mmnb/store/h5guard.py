"""Reading an untrusted HDF5 file without following it anywhere.

HDF5 follows soft and external links, reads raw data from external files (`external=` storage)
and from the sources of virtual datasets, and allocates whatever a dataspace declares. Here
nothing is opened or read before it is checked:

- objects are reached through hard links only, one path component at a time (an external or
  soft link is refused before HDF5 could traverse it);
- an attribute is read only if it is a scalar of the expected class;
- a dataset is read only if its dtype and shape are the expected ones, it has no filter and no
  external storage, and its bytes lie inside the file (contiguous), in its header (compact),
  or in regular files inside the store (virtual); so nothing larger than the file is ever
  allocated;
- a generic walk (only used to upgrade version-1 files) is depth-limited, bounded in size,
  and visits no group twice (a hard-link cycle ends it).

Every refusal raises `UnsafeFile` (a ValueError) naming the object; callers turn it into one
StoreError naming the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from math import prod

import h5py
import numpy as np

_COMPONENT = re.compile(r"^[^/\x00]{1,255}$")
MAX_DEPTH = 8  # state trees are 4 deep (optim/state/<param>/exp_avg)
MAX_NODES = 1_000_000
COMPACT_LIMIT = 64 * 1024  # HDF5's own limit for compact raw data


class UnsafeFile(ValueError):
    """Something in an HDF5 file that mmnb refuses to follow or read."""


def _component(name: str) -> bytes:
    if not isinstance(name, str) or not _COMPONENT.match(name) or name in (".", ".."):
        raise UnsafeFile(f"invalid object name {name!r}")
    return name.encode()


def open_hard(group: h5py.Group, name: str) -> h5py.Group | h5py.Dataset:
    """`group[name]`, only if `name` is a hard link in `group` (no traversal otherwise)."""
    raw = _component(name)
    links = group.id.links
    if not links.exists(raw):
        raise UnsafeFile(f"{_where(group, name)} is missing")
    return _open_link(group, name, raw, links.get_info(raw).type)


def _open_link(group: h5py.Group, name: str, raw: bytes, kind: int) -> h5py.Group | h5py.Dataset:
    """The object `raw` (link type `kind`) of `group` leads to, if it is a hard link."""
    if kind != h5py.h5l.TYPE_HARD:
        what = {h5py.h5l.TYPE_SOFT: "a soft link", h5py.h5l.TYPE_EXTERNAL: "an external link"}
        raise UnsafeFile(
            f"{_where(group, name)} is {what.get(kind, 'a user-defined link')}; refused"
        )
    oid = h5py.h5o.open(group.id, raw)
    if isinstance(oid, h5py.h5g.GroupID):
        return h5py.Group(oid)
    if isinstance(oid, h5py.h5d.DatasetID):
        return h5py.Dataset(oid)
    raise UnsafeFile(f"{_where(group, name)} is a {type(oid).__name__}, not a group or dataset")


def _where(group: h5py.Group, name: str) -> str:
    return f"{group.name.rstrip('/')}/{name}"


def open_path(root: h5py.Group, path: str) -> h5py.Group | h5py.Dataset:
    """The object at `path` ('a/b/c', relative to `root`), through hard links only."""
    obj: h5py.Group | h5py.Dataset = root
    parts = path.split("/") if path else []
    if len(parts) > MAX_DEPTH:
        raise UnsafeFile(f"path {path!r} is deeper than {MAX_DEPTH} levels")
    for part in parts:
        if not isinstance(obj, h5py.Group):
            raise UnsafeFile(f"{obj.name} is a dataset, not a group")
        obj = open_hard(obj, part)
    return obj


def has_attr(obj: h5py.HLObject, name: str) -> bool:
    return bool(h5py.h5a.exists(obj.id, name.encode()))


def read_attr(obj: h5py.HLObject, name: str, kind: type) -> str | int | float:
    """A scalar attribute of class `kind` (str, int or float), read after checking its type."""
    where = f"attribute {name!r} of {obj.name}"
    if not has_attr(obj, name):
        raise UnsafeFile(f"{where} is missing")
    attr = h5py.h5a.open(obj.id, name.encode())
    if attr.get_space().get_simple_extent_type() != h5py.h5s.SCALAR:
        raise UnsafeFile(f"{where} is not a scalar")
    cls = attr.get_type().get_class()
    expected = {
        str: (h5py.h5t.STRING,),
        int: (h5py.h5t.INTEGER,),
        float: (h5py.h5t.FLOAT, h5py.h5t.INTEGER),
    }[kind]
    if cls not in expected:
        raise UnsafeFile(f"{where} has the wrong type (expected {kind.__name__})")
    if kind is not str and attr.get_type().get_size() > 8:
        raise UnsafeFile(f"{where} is wider than 64 bits")
    value = obj.attrs[name]
    if kind is str:
        if isinstance(value, bytes):
            value = value.decode("utf-8")  # UnicodeDecodeError is a ValueError
        if not isinstance(value, str):
            raise UnsafeFile(f"{where} is not text")
        return value
    if kind is int:
        return int(value)
    value = float(value)
    return value


def check_dataset(
    ds: h5py.Dataset,
    dtype: np.dtype,
    shape: tuple[int, ...],
    file_size: int,
    virtual_source: Callable[[str], str] | None = None,
) -> int | None:
    """Raise UnsafeFile unless `ds` is exactly (dtype, shape) with its bytes where they may be.

    Returns the file offset of a non-empty contiguous dataset's bytes (checked to lie inside
    the file's `file_size` bytes), None for any other dataset.
    `virtual_source(file_name)` checks a virtual dataset's source file (it must lie in the
    store and be a regular file) and returns its path; without it virtual datasets are refused.
    """
    where = f"dataset {ds.name}"
    if ds.dtype != dtype:
        raise UnsafeFile(f"{where} has dtype {ds.dtype}, expected {dtype}")
    if ds.shape != shape:
        raise UnsafeFile(f"{where} has shape {ds.shape}, expected {shape}")
    nbytes = prod(shape) * dtype.itemsize
    dcpl = ds.id.get_create_plist()
    if dcpl.get_nfilters():
        raise UnsafeFile(f"{where} is filtered (compressed); refused")
    if dcpl.get_external_count():
        raise UnsafeFile(f"{where} keeps its data in an external file; refused")
    layout = dcpl.get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        if nbytes == 0:
            return None
        offset = ds.id.get_offset()
        if offset is None or ds.id.get_storage_size() != nbytes:
            # Unwritten storage would read as fill values: a silently different state.
            raise UnsafeFile(f"{where} has no stored data of {nbytes} bytes")
        if offset < 0 or offset + nbytes > file_size:
            raise UnsafeFile(f"{where} lies beyond the end of the file")
        return offset
    if layout == h5py.h5d.COMPACT:
        if nbytes > COMPACT_LIMIT:
            raise UnsafeFile(f"{where} is compact but declares {nbytes} bytes")
    elif layout == h5py.h5d.VIRTUAL:
        if virtual_source is None:
            raise UnsafeFile(f"{where} is a virtual dataset; refused here")
        _check_virtual(ds, dcpl, dtype, virtual_source)
    else:
        raise UnsafeFile(f"{where} has an unsupported (chunked) layout")
    return None


def _check_virtual(
    ds: h5py.Dataset, dcpl: h5py.h5p.PropDCID, dtype: np.dtype, source: Callable[[str], str]
) -> None:
    """Every source of a virtual dataset is a plain dataset in a regular file in the store."""
    count = dcpl.get_virtual_count()
    if count > 65536:
        raise UnsafeFile(f"dataset {ds.name} has {count} virtual sources")
    for i in range(count):
        file_name = dcpl.get_virtual_filename(i)
        dset_name = dcpl.get_virtual_dsetname(i)
        if "%" in file_name or "%" in dset_name:
            raise UnsafeFile(f"dataset {ds.name}: printf-style virtual source; refused")
        path = source(file_name)  # raises for anything outside the store
        if path == ".":
            continue  # a source in this same file is checked when it is read itself
        with h5py.File(path, "r", locking=False) as f:
            src = open_path(f, dset_name.strip("/"))
            if not isinstance(src, h5py.Dataset):
                raise UnsafeFile(f"virtual source {file_name}:{dset_name} is not a dataset")
            shape = src.shape if src.shape is not None else ()
            check_dataset(src, dtype, shape, os.path.getsize(path))


def read_array(ds: h5py.Dataset, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """The dataset's data (already checked by `check_dataset`) in a fresh array."""
    out = np.empty(shape, dtype=dtype)
    if out.size:
        ds.read_direct(out)
    return out


def collect(root: h5py.Group, path: str) -> dict[str, h5py.Group | h5py.Dataset]:
    """{path: object} for the group at `path` and everything under it (`walk`'s rules)."""
    group = open_path(root, path)
    if not isinstance(group, h5py.Group):
        raise UnsafeFile(f"/{path} is not a group")
    return {path: group, **{f"{path}/{p}": obj for p, obj in walk(group)}}


def walk(
    group: h5py.Group, *, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES
) -> Iterator[tuple[str, h5py.Group | h5py.Dataset]]:
    """(path, object) for everything under `group`, through hard links only.

    Depth- and size-bounded; a group reached twice (a hard-link cycle or alias) is refused.
    A dataset may be reached twice (tied weights are hard links to one dataset).
    """
    seen: set[tuple[int, int]] = set()
    count = 0

    def visit(g: h5py.Group, prefix: str, depth: int) -> Iterator[tuple[str, object]]:
        nonlocal count
        info = h5py.h5o.get_info(g.id)
        key = (info.fileno, info.addr)
        if key in seen:
            raise UnsafeFile(f"group {g.name} is reached twice (a link cycle); refused")
        seen.add(key)
        if depth > max_depth:
            raise UnsafeFile(f"{g.name} is nested deeper than {max_depth} levels")
        if len(g) > max_nodes - count:
            raise UnsafeFile(f"{g.name} has too many members")
        # Names and link types in one pass over the group (not three HDF5 calls per member).
        links: list[tuple[bytes, int]] = []
        g.id.links.iterate(lambda raw, info: links.append((raw, info.type)), info=True)
        for raw, kind in links:
            count += 1
            name = raw.decode("utf-8")  # UnicodeDecodeError is a ValueError
            _component(name)
            obj = _open_link(g, name, raw, kind)
            path = f"{prefix}{name}"
            yield path, obj
            if isinstance(obj, h5py.Group):
                yield from visit(obj, path + "/", depth + 1)

    yield from visit(group, "", 1)
