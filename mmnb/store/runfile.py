"""A run's index file, `run.h5`: its metadata and the list of committed checkpoints.

Root attributes (JSON strings unless noted): `format_version` (int), `name` (text), `config`,
`parent`, `stage`, `history`, `tokenizer` (text), `created` (float), `index`, and in version 2
`xxh3`: the checksum of all the others, so every byte of the index is covered. `/steps/<step>`
are external links to the checkpoint files, for plain h5py users; mmnb never follows them (the
checkpoint of an entry is always `<store>/<entry.run>/ckpt/<step>.h5`).

The file is laid out by HDF5 in memory and written by mmnb (`image`), under a temporary name,
fsynced and renamed: a reader sees the old index or the new one, and a full disk leaves the old.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py

from ..durable import fsync
from . import confine, h5guard, jsonio
from .ckptfile import FORMAT_VERSION, check_version
from .h5state import ChecksumError, checksum
from .image import SparseImage, discard, write_file

RUN_FILE = "run.h5"
CKPT_DIR = "ckpt"
MAX_LIST = 1000  # reasons/tags of one checkpoint


@dataclass
class StepInfo:
    """Metadata of one committed checkpoint; listing a run reads only these."""

    step: int
    file: str  # path of the checkpoint file, relative to this run's folder
    run: str  # the run that wrote it (a branch inherits its parent's early steps)
    reasons: list[str]
    epoch: int = 0
    position: int = 0
    tokens: int = 0
    loss: float | None = None
    lr: float | None = None
    elapsed: float = 0.0
    bytes: int = 0
    created: float = 0.0
    tags: list[str] = dataclasses.field(default_factory=list)
    checksum: str | None = None  # the checkpoint's manifest checksum (None: a version-1 file)

    @property
    def inherited(self) -> bool:
        return self.file.startswith("..")


def step_name(step: int) -> str:
    return f"{step:08d}"  # zero-padded so names sort numerically


def checkpoint_file(run: str, step: int, owner: str) -> str:
    """The index's `file` of `step` written by run `owner`, relative to run `run`'s folder.

    The only places a checkpoint can be: this run's `ckpt/` or another run's in the same store.
    """
    name = f"{CKPT_DIR}/{step_name(step)}.h5"
    return name if owner == run else f"../{owner}/{name}"


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _texts(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= MAX_LIST and all(isinstance(x, str) for x in v)


_ENTRY_FIELDS = {
    "step": _int,
    "file": lambda v: isinstance(v, str),
    "run": lambda v: isinstance(v, str) and bool(confine.RUN_NAME.match(v)),
    "reasons": _texts,
    "epoch": _int,
    "position": _int,
    "tokens": _int,
    "loss": lambda v: v is None or _num(v),
    "lr": lambda v: v is None or _num(v),
    "elapsed": _num,
    "bytes": _int,
    "created": _num,
    "tags": _texts,
    "checksum": lambda v: v is None or isinstance(v, str),
}
_REQUIRED = ("step", "file", "run", "reasons")


def step_info(entry: Any) -> StepInfo:
    """A validated StepInfo from an index entry or checkpoint summary (ValueError otherwise)."""
    if not isinstance(entry, dict):
        raise ValueError("an index entry is not an object")
    for key, value in entry.items():
        if key not in _ENTRY_FIELDS:
            raise ValueError(f"an index entry has an unknown key {key!r}")
        if not _ENTRY_FIELDS[key](value):
            raise ValueError(f"an index entry has an invalid {key}: {value!r}")
    for key in _REQUIRED:
        if key not in entry:
            raise ValueError(f"an index entry has no {key}")
    return StepInfo(**entry)


# Root attributes: name → (HDF5 class, JSON-decoded?)
_ATTRS: dict[str, tuple[type, bool]] = {
    "format_version": (int, False),
    "name": (str, False),
    "config": (str, True),
    "parent": (str, True),
    "stage": (str, True),
    "history": (str, True),
    "lineage": (str, True),  # where the weights came from (`--init-from`), {} otherwise
    "tokenizer": (str, False),
    "created": (float, False),
    "index": (str, True),
}


_OPTIONAL = {"lineage"}  # absent from runs written before it existed


def _canonical(raw: dict[str, Any]) -> str:
    return jsonio.dumps_state([[k, raw[k]] for k in sorted(raw) if k != "xxh3"])


def read_run_file(path: Path, name: str) -> tuple[dict[str, Any], list[StepInfo]]:
    """(metadata, index) of the run file `path` of run `name`, after every check."""
    with h5py.File(path, "r", locking=False) as f:
        version = check_version(h5guard.read_attr(f, "format_version", int), f"run file {path}")
        known = set(_ATTRS) | ({"xxh3"} if version >= 2 else set())
        unknown = sorted(set(f.attrs.keys()) - known)
        if unknown:
            raise ValueError(f"unexpected attribute {unknown[0]!r}")
        raw = {
            key: h5guard.read_attr(f, key, kind)
            for key, (kind, _) in _ATTRS.items()
            if key not in _OPTIONAL or h5guard.has_attr(f, key)
        }
        if version >= 2 and checksum(_canonical(raw)) != h5guard.read_attr(f, "xxh3", str):
            raise ChecksumError("checksum mismatch in the run's metadata and index")
    meta = {k: jsonio.loads(v) if _ATTRS[k][1] else v for k, v in raw.items() if k != "index"}
    meta.setdefault("lineage", {})
    if meta["name"] != name:
        raise ValueError(f"it names run {meta['name']!r}, not {name!r}")
    _check_meta(meta)
    entries = jsonio.loads(raw["index"])
    if not isinstance(entries, list):
        raise ValueError("the index is not a list")
    index = [step_info(e) for e in entries]
    steps = [s.step for s in index]
    if len(set(steps)) != len(steps):
        raise ValueError("the index lists a step twice")
    for info in index:
        expected = checkpoint_file(name, info.step, info.run)
        if info.file != expected:
            raise ValueError(f"step {info.step} is listed at {info.file!r}, not {expected!r}")
    index.sort(key=lambda s: s.step)
    return meta, index


def _check_meta(meta: dict[str, Any]) -> None:
    if not isinstance(meta["config"], dict):
        raise ValueError("config is not an object")
    parent = meta["parent"]
    if parent is not None and not (
        isinstance(parent, dict)
        and set(parent) == {"run", "step"}
        and isinstance(parent["run"], str)
        and confine.RUN_NAME.match(parent["run"])
        and _int(parent["step"])
    ):
        raise ValueError(f"invalid parent {parent!r}")
    stage = meta["stage"]
    if not (
        isinstance(stage, dict)
        and _int(stage.get("start"))
        and isinstance(stage.get("reset_data"), bool)
    ):
        raise ValueError(f"invalid stage {stage!r}")
    if not isinstance(meta["lineage"], dict):
        raise ValueError("lineage is not an object")
    if not isinstance(meta["history"], list) or not all(
        isinstance(h, dict) for h in meta["history"]
    ):
        raise ValueError("history is not a list of objects")


def write_run_file(folder: Path, meta: dict[str, Any], index: list[StepInfo]) -> None:
    """Write `<folder>/run.h5` atomically: temp file, fsync, rename, fsync the folder.

    Raises OSError (the old file intact, the temporary one removed) if the disk refuses.
    """
    raw: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": meta["name"],
        "config": jsonio.dumps_state(meta["config"]),
        "parent": jsonio.dumps_state(meta["parent"]),
        "stage": jsonio.dumps_state(meta["stage"]),
        # a record of what happened (a recovery's non-finite loss): null, never NaN
        "history": jsonio.dumps(meta["history"]),
        "lineage": jsonio.dumps(meta.get("lineage") or {}),
        "tokenizer": meta["tokenizer"],
        "created": float(meta["created"]),
        # measurements (a skipped step's loss) may be non-finite: null in JSON
        "index": jsonio.dumps([dataclasses.asdict(s) for s in index]),
    }
    raw["xxh3"] = checksum(_canonical(raw))
    image = SparseImage()
    # libver="latest" allows attributes over 64 KiB (a tokenizer.json is larger).
    with h5py.File(image, "w", libver="latest", locking=False) as f:
        for key, value in raw.items():
            f.attrs[key] = value
        steps = f.create_group("steps")
        for info in index:
            steps[step_name(info.step)] = h5py.ExternalLink(info.file, "/")
    final = folder / RUN_FILE
    tmp = folder / f".{RUN_FILE}.{os.getpid()}.tmp"
    discard(tmp)
    try:
        write_file(tmp, image, [])
        os.replace(tmp, final)
        fsync(folder)
    except BaseException:
        discard(tmp)
        raise
