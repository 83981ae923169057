"""The HDF5 run store: immutable per-step checkpoint files behind an atomically replaced index."""

from .h5state import ChecksumError, read_tree, write_tree
from .run import CorruptCheckpoint, Run, StepInfo, StoreError
from .store import Store, default_store_path

__all__ = [
    "ChecksumError",
    "CorruptCheckpoint",
    "Run",
    "StepInfo",
    "Store",
    "StoreError",
    "default_store_path",
    "read_tree",
    "write_tree",
]
