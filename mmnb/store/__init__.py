"""The HDF5 run store: immutable per-step checkpoint files behind an atomically replaced index.

A store is untrusted input: see docs/store-format.md, "Threat model".

Names are imported on first use (PEP 562): `mmnb.store.confine` and `mmnb.store.errors` are
read by front-ends that must answer fast (`mmnb queue ls`) without loading h5py and torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .ckptfile import FORMAT_VERSION
    from .confine import check_run_name
    from .errors import CorruptCheckpoint, StoreError, StoreWriteError
    from .h5state import ChecksumError, read_tree, write_tree
    from .run import Run
    from .runfile import StepInfo
    from .store import Store, default_store_path

_LAZY = {
    "FORMAT_VERSION": ".ckptfile",
    "check_run_name": ".confine",
    "CorruptCheckpoint": ".errors",
    "StoreError": ".errors",
    "StoreWriteError": ".errors",
    "ChecksumError": ".h5state",
    "read_tree": ".h5state",
    "write_tree": ".h5state",
    "Run": ".run",
    "StepInfo": ".runfile",
    "Store": ".store",
    "default_store_path": ".store",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mmnb.store' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "FORMAT_VERSION",
    "ChecksumError",
    "CorruptCheckpoint",
    "Run",
    "StepInfo",
    "Store",
    "StoreError",
    "StoreWriteError",
    "check_run_name",
    "default_store_path",
    "read_tree",
    "write_tree",
]
