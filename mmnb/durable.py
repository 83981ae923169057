"""Durability by path: what a write does before it counts as done (and before a rename of it
counts)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync(path: str | os.PathLike[str] | Path) -> None:
    """Flush `path` to disk: a file's data, or a folder's entries (after a create or rename)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["fsync"]
