"""A nested state dict ⇄ an HDF5 group, bit-exactly, with a checksum on every byte of it.

Mapping: a dict becomes a group; a tensor or numpy array becomes a dataset (attribute `dtype`
holds the torch dtype name, `xxh3` an XXH3-64 checksum of its bytes); every other leaf (numbers,
strings, lists, None) goes into the group's `json` attribute. bf16 has no HDF5 type, so its bits
are stored as uint16 and viewed back. Nothing here can execute code on load.

Writing returns a manifest: every group (with the checksum of its `json` attribute) and every
dataset (torch or numpy dtype, shape, checksum). The manifest is what a reader trusts, once its
own checksum matches: it reads exactly the objects it lists, each checked against it before
anything is allocated (`h5guard`), so the JSON is under a checksum as much as the tensors are.
"""

from __future__ import annotations

import functools
import math
import mmap
from collections.abc import Callable
from typing import Any

import h5py
import numpy as np
import torch
import xxhash

from . import h5guard, jsonio

# torch dtypes whose bits are stored under another numpy type
_BIT_VIEWS = {torch.bfloat16: (torch.int16, np.uint16)}


class ChecksumError(ValueError):
    """Bytes that do not match the checksum written when they were saved."""


def checksum(data: np.ndarray | bytes | str) -> str:
    # XXH3-64 runs at ~18 GB/s here against ~3.4 GB/s for zlib's CRC-32: on a 300 MB state
    # that is the difference between a checkpoint costing the same as torch.save or not.
    if isinstance(data, str):
        data = data.encode("utf-8")
    if isinstance(data, np.ndarray):
        data = as_bytes(data)
    return xxhash.xxh3_64_hexdigest(data)


def as_bytes(array: np.ndarray) -> np.ndarray:
    """The bytes of an array (any shape, empty and 0-d included) as a flat uint8 view."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.dtype in _BIT_VIEWS:
        int_dtype, np_dtype = _BIT_VIEWS[tensor.dtype]
        return tensor.contiguous().view(int_dtype).numpy().view(np_dtype)
    return tensor.contiguous().numpy()  # shares memory: no extra copy of the state


def numpy_to_tensor(array: np.ndarray, dtype_name: str) -> torch.Tensor:
    dtype = getattr(torch, dtype_name)
    if dtype in _BIT_VIEWS:
        int_dtype, _ = _BIT_VIEWS[dtype]
        return torch.from_numpy(array.view(np.int16)).view(dtype)
    return torch.from_numpy(array)


def _new_manifest() -> dict[str, dict[str, Any]]:
    return {"groups": {}, "datasets": {}}


def write_tree(
    group: h5py.Group,
    tree: dict[str, Any],
    manifest: dict[str, dict[str, Any]] | None = None,
    *,
    sink: Callable[[int, np.ndarray], None] | None = None,
    prefix: str = "",
    _written: dict[tuple, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Write `tree` under `group`; return the manifest (filled in place when given).

    `prefix` is the path of `group` in the manifest ('model/'). With `sink`, datasets are only
    allocated (contiguous, early, never filled) and `sink(file offset, array)` is called at
    once, for the caller to write the bytes itself (`image.FileWriter.put`); otherwise HDF5
    writes them.
    A tensor that is a view of one already written (tied embeddings: `lm_head.weight` is
    `model.embed_tokens.weight`) becomes an HDF5 hard link to that dataset, so its bytes are
    stored once and plain h5py still finds it under its own name.
    """
    manifest = _new_manifest() if manifest is None else manifest
    written = {} if _written is None else _written
    leaves: dict[str, Any] = {}
    base = group.name.rstrip("/")
    for key, value in tree.items():
        key = str(key)
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            sub = group.create_group(key)
            manifest["groups"][path] = None
            write_tree(sub, value, manifest, sink=sink, prefix=path + "/", _written=written)
        elif isinstance(value, (torch.Tensor, np.ndarray)):
            is_tensor = isinstance(value, torch.Tensor)
            if is_tensor:
                identity = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
                if value.numel() and identity in written:
                    group[key] = group.file[written[identity]]  # a hard link
                    manifest["datasets"][path] = dict(manifest["datasets"][_rel(written[identity])])
                    continue
                array = tensor_to_numpy(value)
                dtype_name = str(value.dtype).removeprefix("torch.")
            else:
                array = np.ascontiguousarray(value)
            dsid = _create(group, key, array, sink)
            digest = checksum(array)
            _text_attr(dsid, "xxh3", digest)
            entry: dict[str, Any] = {"shape": list(array.shape), "xxh3": digest}
            if is_tensor:
                _text_attr(dsid, "dtype", dtype_name)
                entry["torch"] = dtype_name
                written[identity] = f"{base}/{key}"
            else:
                entry["numpy"] = array.dtype.name
            manifest["datasets"][path] = entry
        else:
            leaves[key] = value
    if leaves:
        text = jsonio.dumps_state(leaves)  # ValueError for a non-finite float: never saved
        group.attrs["json"] = text
        manifest["groups"][prefix.rstrip("/")] = checksum(text)
    return manifest


def _rel(name: str) -> str:
    return name.lstrip("/")


def _create(
    group: h5py.Group, key: str, array: np.ndarray, sink: Callable[[int, np.ndarray], None] | None
) -> h5py.h5d.DatasetID:
    # h5py's low-level API: a third of the time of `create_dataset` and `attrs[...] =`, which
    # for the ~300 tensors of a 26M-parameter state was most of the file's layout time.
    space = h5py.h5s.create_simple(array.shape) if array.ndim else _scalar_space()
    dsid = h5py.h5d.create(
        group.id, key.encode(), _file_type(array.dtype), space,
        dcpl=_unfilled() if sink is not None else None,
    )  # fmt: skip
    offset = dsid.get_offset() if sink is not None else None
    if array.nbytes and offset is not None:
        sink(offset, array)  # the caller writes the bytes at the dataset's offset
    elif array.nbytes:  # HDF5 writes them (no sink, or a scalar with no file offset)
        dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, np.ascontiguousarray(array))
    return dsid


def _text_attr(oid: h5py.h5o.ObjectID, name: str, value: str) -> None:
    """Set a text attribute as h5py's `attrs[name] = value` does (variable-length UTF-8)."""
    attr = h5py.h5a.create(oid, name.encode(), _text_type(), _scalar_space())
    attr.write(np.array(value, dtype=h5py.string_dtype()))


@functools.cache
def _unfilled() -> h5py.h5p.PropDCID:
    """Contiguous, allocated when created (so it has an offset at once), never filled."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


@functools.cache
def _file_type(dtype: np.dtype) -> h5py.h5t.TypeID:
    return h5py.h5t.py_create(dtype, logical=True)


@functools.cache
def _text_type() -> h5py.h5t.TypeID:
    return h5py.h5t.py_create(h5py.string_dtype(), logical=True)


@functools.cache
def _scalar_space() -> h5py.h5s.SpaceID:
    return h5py.h5s.create(h5py.h5s.SCALAR)


def verify_array(path: str, array: np.ndarray, entry: dict[str, Any]) -> None:
    """Raise ChecksumError unless `array` (all of dataset `path`) matches its manifest entry:
    one checksum, or for a sharded tensor (`store.sharded`) one per row block of a shard."""
    if "shards" not in entry:
        if checksum(array) != entry.get("xxh3"):
            raise ChecksumError(f"checksum mismatch in /{path}")
        return
    from .sharded import pinned_blocks

    for block in pinned_blocks(path, entry, array.shape):
        if checksum(array[block.start : block.stop]) != block.xxh3:
            raise ChecksumError(f"checksum mismatch in /{path} (shard {block.file})")


def read_tree(
    objects: dict[str, h5py.Group | h5py.Dataset],
    manifest: dict[str, dict[str, Any]],
    prefix: str,
    rule: Callable[[str, dict[str, Any]], Any],
    file_size: int,
    *,
    verify: bool = True,
    virtual_source: Callable[[str], str] | None = None,
    lazy: Callable[[str, Any, dict[str, Any]], Any] | None = None,
    mapping: mmap.mmap | None = None,
    leaf: Callable[[str, np.ndarray, dict[str, Any], str | None], Any] | None = None,
) -> dict[str, Any]:
    """The state under `prefix` (a top-level group), exactly as `manifest` lists it.

    With `mapping` (the whole file, mapped copy-on-write), a contiguous dataset's array is a
    view of its bytes in the mapping instead of a copy read through HDF5 (zero-copy load);
    other layouts are read as usual.

    `objects` maps paths to the file's objects (`h5guard.collect`, which checked the links).

    `rule(path, entry)` returns the checked (storage dtype, shape, torch dtype) of a dataset
    (raising for anything the config does not allow) before the dataset is opened. With
    `verify`, every dataset's bytes and every `json` attribute are checked against the manifest.
    With `lazy`, a checked tensor dataset is not read: `lazy(path, rule, entry)` stands for it
    (`store.sharded.load_lazy`, for a loader that reads only the rows it holds). With `leaf`,
    `leaf(path, array, entry, torch dtype)` stands for each dataset's unverified array
    (`store.lazy`: verified when first used).
    """
    tree: dict[str, Any] = {}
    groups = manifest["groups"]
    for path in sorted(p for p in groups if p == prefix or p.startswith(prefix + "/")):
        node = _node(tree, path, prefix)
        group = objects.get(path)
        if not isinstance(group, h5py.Group):
            raise h5guard.UnsafeFile(f"{path} is not a group")
        expected = groups[path]
        if expected is None:
            if h5guard.has_attr(group, "json"):
                raise h5guard.UnsafeFile(f"{path} has a json attribute the manifest does not list")
            continue
        text = h5guard.read_attr(group, "json", str)
        if checksum(text) != expected:
            raise ChecksumError(f"checksum mismatch in the json attribute of /{path}")
        values = jsonio.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"the json attribute of /{path} is not an object")
        for key, value in values.items():
            if key in node:
                raise ValueError(f"/{path}/{key} is both a dataset and a json value")
            node[key] = value
    for path in sorted(p for p in manifest["datasets"] if p.startswith(prefix + "/")):
        entry = manifest["datasets"][path]
        parent, _, key = path.rpartition("/")
        if parent not in groups:
            raise ValueError(f"dataset {path} is in a group the manifest does not list")
        r = rule(path, entry)
        ds = objects.get(path)
        if not isinstance(ds, h5py.Dataset):
            raise h5guard.UnsafeFile(f"{path} is not a dataset")
        offset = h5guard.check_dataset(ds, r.storage, r.shape, file_size, virtual_source)
        node = _node(tree, parent, prefix)
        if key in node:
            raise ValueError(f"/{path} is both a dataset and a json value")
        if lazy is not None and r.torch_dtype:
            node[key] = lazy(path, r, entry)
            continue
        # Inside the file (checked above); element-aligned, as torch's kernels expect.
        if mapping is not None and offset is not None and offset % r.storage.itemsize == 0:
            count = math.prod(r.shape)
            array = np.frombuffer(mapping, r.storage, count, offset).reshape(r.shape)
        else:
            array = h5guard.read_array(ds, r.storage, r.shape)  # (a sharded tensor: its shards)
        if leaf is not None:
            node[key] = leaf(path, array, entry, r.torch_dtype)
            continue
        if verify:
            verify_array(path, array, entry)
        node[key] = numpy_to_tensor(array, r.torch_dtype) if r.torch_dtype else array
    return tree


def _node(tree: dict[str, Any], path: str, prefix: str) -> dict[str, Any]:
    node = tree
    rest = path[len(prefix) :].strip("/")
    for part in rest.split("/") if rest else []:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"/{path} is both a group and a value")
        node = child
    return node
