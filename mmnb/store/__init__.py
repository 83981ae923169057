"""The HDF5 run store: immutable per-step checkpoint files behind an atomically replaced index.

A store is untrusted input: see docs/store-format.md, "Threat model".
"""

from .ckptfile import FORMAT_VERSION
from .confine import check_run_name
from .errors import CorruptCheckpoint, StoreError, StoreWriteError
from .h5state import ChecksumError, read_tree, write_tree
from .run import Run
from .runfile import StepInfo
from .store import Store, default_store_path

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
