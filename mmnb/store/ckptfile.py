"""One checkpoint file, `ckpt/<step>.h5`: writing it, and reading it as untrusted input.

Version 2 (this mmnb writes it) keeps in its root attributes `format_version`, `summary` (the
index entry as JSON), `manifest` (every group with the checksum of its `json` attribute, every
dataset with dtype, shape and checksum, and the summary's checksum) and `manifest_xxh3`. The
run's index keeps `manifest_xxh3` too, so a file moved to another step or run is noticed.

Version 1 files (no manifest) are read through `upgrade_v1`, which builds the manifest from the
file itself; their JSON values were not under a checksum, which cannot be repaired.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from . import h5guard, jsonio, schema, workers
from .h5state import ChecksumError, checksum, read_tree, write_tree
from .image import FileWriter, SparseImage
from .lazy import Pending, resolve_all, wrap

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# "frozen": references to frozen weights a LoRA or DPO stage uses (mmnb.frozen), never copies.
STATE_GROUPS = (
    "model", "optim", "schedule", "scaler", "rng", "data", "trainer", "metrics", "frozen",
)  # fmt: skip


def check_version(version: object, what: str) -> int:
    """The format version of `what`, if this mmnb reads it (ValueError naming both otherwise)."""
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"{what} has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{what} was written in store format version {version}; this mmnb reads versions "
            f"up to {FORMAT_VERSION} (upgrade mmnb)"
        )
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{what} has an unknown format version {version}")
    return version


def write_checkpoint(
    path: Path,
    state: dict[str, Any],
    summary: dict[str, Any],
    extra: Callable[[h5py.File, dict[str, Any]], None] | None = None,
    check: Callable[[], None] | None = None,
) -> str:
    """Write `state` to the new file `path`; return the manifest's checksum.

    HDF5 lays the file out in memory; the bytes go to disk through `image.FileWriter`, so a
    failing disk raises OSError with no HDF5 object left in a broken state. Each tensor's bytes
    start going to disk as soon as HDF5 has placed it, while the rest is laid out and `check()`
    (the caller's check of the state, which may raise) runs; a failure of either removes the
    file. `extra(file, manifest)` adds objects that are no part of `state` (a sharded
    checkpoint's virtual datasets, `store.sharded.add_virtual`) and lists them in the manifest.
    """
    image = SparseImage()
    manifest: dict[str, Any] = {"groups": {}, "datasets": {}}
    writer = FileWriter(path, size_hint=_array_bytes(state))
    try:
        # Every allocation of 512 bytes or more (each tensor's bytes) starts at a multiple of
        # 64: a loaded tensor is a view of the mapped file (`read_checkpoint`), and kernels
        # expect aligned data. Checksums are computed inline: on worker threads (as a load
        # does) saves were measured slower on a 2-vCPU machine.
        with h5py.File(
            image, "w", libver="latest", locking=False, alignment_threshold=512,
            alignment_interval=64,
        ) as f:  # fmt: skip
            written: dict = {}  # shared storage is written once, across groups
            for key in STATE_GROUPS:
                if key in state:
                    manifest["groups"][key] = None
                    write_tree(
                        f.create_group(key), state[key], manifest, sink=writer.put,
                        prefix=key + "/", _written=written,
                    )  # fmt: skip
            if extra is not None:
                extra(f, manifest)
            summary_text = jsonio.dumps(summary)
            manifest["summary"] = checksum(summary_text)
            manifest_text = jsonio.dumps_state(manifest)
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["summary"] = summary_text
            f.attrs["manifest"] = manifest_text
            f.attrs["manifest_xxh3"] = checksum(manifest_text)
        if check is not None:
            check()
        writer.finish(image)
    except BaseException:
        writer.abort()
        raise
    return checksum(manifest_text)


def _array_bytes(tree: dict[str, Any]) -> int:
    """Bytes of the distinct tensors and arrays in `tree`: what the file holds at least."""
    seen, total, stack = set(), 0, [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, torch.Tensor) and node.device.type == "cpu":
            key = (node.data_ptr(), node.nbytes)
            total += 0 if key in seen else node.nbytes
            seen.add(key)
        elif isinstance(node, np.ndarray):
            total += node.nbytes
    return total


def read_checkpoint(
    path: Path,
    config: dict[str, Any],
    groups: tuple[str, ...],
    *,
    verify: bool | str = True,
    expect_step: int | None = None,
    expect_checksum: str | None = None,
    virtual_source: Callable[[str], str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state of `groups`, summary) of the checkpoint at `path`, after every check.

    Raises ValueError/KeyError/OSError (and ChecksumError) on anything wrong; the caller names
    the file. `config` is the config dict of the run that wrote it: it decides what the
    datasets may be. `verify="lazy"`: every check but the tensors' checksums and finiteness,
    which are made when each tensor is first taken out of the state (`store.lazy`).
    """
    lazy = verify == "lazy"
    with h5py.File(path, "r", locking=False) as f:
        # Size and mapping come from the descriptor HDF5 reads, so they are of the same file
        # even if `path` is replaced meanwhile.
        fd = f.id.get_vfd_handle()
        file_size = os.fstat(fd).st_size
        checked = _Checked(f, path, config, groups, expect_step, expect_checksum)
        # Copy-on-write: the arrays are writable and private; pages are shared with the page
        # cache until written. Committed files are never rewritten in place.
        mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) if file_size else None
        state = {
            g: read_tree(
                checked.objects,
                checked.manifest,
                g,
                checked.rule,
                file_size,
                verify=False,
                virtual_source=virtual_source,
                mapping=mapping,
                leaf=Pending if verify else None,
            )
            for g in checked.groups
        }
    for group, values in state.items():
        _check_json_tree(group, values, checked.spec, checked.step)
    if lazy:
        return wrap(state, path), checked.summary
    if verify:
        resolve_all(state)  # every checksum and finiteness check, on worker threads
        return state, checked.summary
    # mmnb never commits non-finite weights or moments: a file holding some (under valid
    # checksums) is crafted, and would only fail later, far from the file (in sampling).
    with workers.pool() as pool:
        name = schema.non_finite(state, mapper=lambda fn, xs: workers.map_batched(pool, fn, xs))
    if name is not None:
        raise ValueError(f"{name} holds non-finite values")
    return state, checked.summary


def layout(
    path: Path,
    config: dict[str, Any],
    group: str,
    *,
    expect_step: int | None = None,
    expect_checksum: str | None = None,
) -> list[tuple[str, schema.Rule, int | None, str]] | None:
    """(name, rule, file offset, checksum) of every dataset directly in `group`, after every
    check `read_checkpoint` makes except reading the bytes: for a zero-copy reader that maps
    the file and verifies the checksums itself. None when a dataset is not contiguous (compact,
    virtual), so the caller falls back to `read_checkpoint`. Offset None: an empty dataset.
    """
    file_size = os.path.getsize(path)
    out = []
    with h5py.File(path, "r", locking=False) as f:
        checked = _Checked(f, path, config, (group,), expect_step, expect_checksum)
        for key, entry in checked.manifest["datasets"].items():
            parent, _, name = key.rpartition("/")
            if parent != group:
                if key.startswith(group + "/"):
                    return None  # nested groups: not a flat group of arrays
                continue
            rule = checked.rule(key, entry)
            ds = checked.objects[key]
            if "shards" in entry:
                return None  # a sharded tensor (`store.sharded`): a load checks its shards
            h5guard.check_dataset(ds, rule.storage, rule.shape, file_size)
            if ds.id.get_create_plist().get_layout() != h5py.h5d.CONTIGUOUS:
                return None
            out.append((name, rule, ds.id.get_offset(), entry["xxh3"]))
    return out


class _Checked:
    """An open checkpoint file after the checks that precede reading any dataset: version,
    manifest and summary checksums, the index's expectations, the schema of the config, and
    the objects under `groups` exactly as the manifest lists them (hard links only)."""

    def __init__(
        self,
        f: h5py.File,
        path: Path,
        config: dict[str, Any],
        groups: tuple[str, ...],
        expect_step: int | None,
        expect_checksum: str | None,
    ) -> None:
        self.spec = spec = schema.model_spec(config)
        version = check_version(
            h5guard.read_attr(f, "format_version", int), f"checkpoint {path.name}"
        )
        summary_text = h5guard.read_attr(f, "summary", str)
        if version == 1:
            manifest, manifest_sum = upgrade_v1(f, summary_text), None
        else:
            manifest_text = h5guard.read_attr(f, "manifest", str)
            manifest_sum = h5guard.read_attr(f, "manifest_xxh3", str)
            if checksum(manifest_text) != manifest_sum:
                raise ChecksumError("checksum mismatch in the manifest")
            manifest = _parse_manifest(manifest_text)
        if expect_checksum is not None and manifest_sum != expect_checksum:
            raise ChecksumError("the file is not the one the run's index lists (manifest checksum)")
        if checksum(summary_text) != manifest["summary"]:
            raise ChecksumError("checksum mismatch in the summary")
        summary = jsonio.loads(summary_text)
        if not isinstance(summary, dict) or not schema._is_int(summary.get("step"), 0):
            raise ValueError("the summary has no valid step")
        self.step = step = summary["step"]
        if expect_step is not None and step != expect_step:
            raise ValueError(f"the file holds step {step}, not step {expect_step}")
        self.manifest, self.summary = manifest, summary
        self.groups = tuple(g for g in groups if g in manifest["groups"])
        schema.check_complete(self.groups, manifest["datasets"], spec)
        self.objects = _objects(f, manifest, self.groups)

    def rule(self, path: str, entry: dict[str, Any]) -> schema.Rule:
        return schema.dataset_rule(path, entry, self.spec, self.step)


def read_summary(path: Path) -> dict[str, Any]:
    """The summary (index entry) of a checkpoint file, checked against its manifest."""
    with h5py.File(path, "r", locking=False) as f:
        version = check_version(
            h5guard.read_attr(f, "format_version", int), f"checkpoint {path.name}"
        )
        summary_text = h5guard.read_attr(f, "summary", str)
        if version == 2:
            manifest_text = h5guard.read_attr(f, "manifest", str)
            if checksum(manifest_text) != h5guard.read_attr(f, "manifest_xxh3", str):
                raise ChecksumError("checksum mismatch in the manifest")
            manifest = _parse_manifest(manifest_text)
            if checksum(summary_text) != manifest["summary"]:
                raise ChecksumError("checksum mismatch in the summary")
            summary = jsonio.loads(summary_text)
            if isinstance(summary, dict):
                summary["checksum"] = checksum(manifest_text)
        else:
            summary = jsonio.loads(summary_text)
    if not isinstance(summary, dict):
        raise ValueError("the summary is not an object")
    return summary


def _objects(
    f: h5py.File, manifest: dict[str, Any], groups: tuple[str, ...]
) -> dict[str, h5py.Group | h5py.Dataset]:
    """{path: object} under `groups`, once the file is found to hold exactly what the manifest
    lists (under those groups, and at the top): no extra object, no link but hard links, no
    cycle (a bounded walk)."""
    listed = set(manifest["groups"]) | set(manifest["datasets"])
    top = {p.split("/")[0] for p in listed}
    for name in f:
        if name not in top:
            raise h5guard.UnsafeFile(f"unexpected object /{name}")
    objects: dict[str, h5py.Group | h5py.Dataset] = {}
    for group in groups:
        found = h5guard.collect(f, group)
        expected = {p for p in listed if p == group or p.startswith(group + "/")}
        if found.keys() != expected:
            extra = sorted(found.keys() - expected) or sorted(expected - found.keys())
            raise h5guard.UnsafeFile(f"/{extra[0]} is not what the manifest lists")
        objects.update(found)
    return objects


def _check_json_tree(group: str, values: dict[str, Any], spec: schema.ModelSpec, step: int) -> None:
    if group == "rng":
        ranks = values.get("ranks", {})  # a distributed run's streams of every rank
        if not isinstance(ranks, dict):
            raise ValueError("rng.ranks is not an object")
        for where, tree in [("rng", values), *((f"rng.ranks.{r}", v) for r, v in ranks.items())]:
            for sub in ("numpy", "python"):
                node = tree.get(sub) if isinstance(tree, dict) else None
                if not isinstance(node, dict):
                    raise ValueError(f"{where}.{sub} is missing")
                schema.check_json(f"rng/{sub}", node, spec, step)
    elif group in ("trainer", "data", "schedule", "optim", "frozen"):
        schema.check_json(group, values, spec, step)


def _parse_manifest(text: str) -> dict[str, Any]:
    manifest = jsonio.loads(text)
    ok = (
        isinstance(manifest, dict)
        and isinstance(manifest.get("groups"), dict)
        and isinstance(manifest.get("datasets"), dict)
        and isinstance(manifest.get("summary"), str)
        and all(v is None or isinstance(v, str) for v in manifest["groups"].values())
        and all(isinstance(v, dict) for v in manifest["datasets"].values())
    )
    if not ok:
        raise ValueError("the manifest is malformed")
    for path in [*manifest["groups"], *manifest["datasets"]]:
        if not isinstance(path, str) or len(path.split("/")) > h5guard.MAX_DEPTH:
            raise ValueError(f"the manifest lists an invalid path {path!r}")
    return manifest


def upgrade_v1(f: h5py.File, summary_text: str) -> dict[str, Any]:
    """The manifest of a version-1 checkpoint, built from the file (depth-limited walk).

    Version 1 had a checksum on every tensor but none on JSON values: they are taken as found.
    """
    manifest: dict[str, Any] = {"groups": {}, "datasets": {}, "summary": checksum(summary_text)}
    for key in STATE_GROUPS:
        if not f.id.links.exists(key.encode()):
            continue
        top = h5guard.open_hard(f, key)
        if not isinstance(top, h5py.Group):
            raise ValueError(f"/{key} is not a group")
        for path, obj in [(key, top), *((f"{key}/{p}", o) for p, o in h5guard.walk(top))]:
            if isinstance(obj, h5py.Group):
                text = (
                    h5guard.read_attr(obj, "json", str) if h5guard.has_attr(obj, "json") else None
                )
                manifest["groups"][path] = None if text is None else checksum(text)
                continue
            entry: dict[str, Any] = {"shape": list(obj.shape or ())}
            entry["xxh3"] = h5guard.read_attr(obj, "xxh3", str)
            if h5guard.has_attr(obj, "dtype"):
                entry["torch"] = h5guard.read_attr(obj, "dtype", str)
            else:
                entry["numpy"] = np.dtype(obj.dtype).name
            manifest["datasets"][path] = entry
    return manifest
