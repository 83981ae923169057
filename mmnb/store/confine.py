"""Confinement: a store is untrusted input, so every path mmnb opens in it lies inside it.

A run is `<store>/<name>/` where `name` is one safe path component; its files are
`run.h5`, `LOCK` and `ckpt/<8 digits>.h5`. Nothing else is ever opened. Every component below
the store folder must be a real directory and the file a regular file: a symlink (the run
folder, `ckpt/`, a checkpoint, `LOCK`), a FIFO, a device or a socket is refused before it is
opened. The store folder itself is the user's choice and may be a symlink.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import stat
from pathlib import Path

from .errors import StoreError, StoreWriteError, describe_os_error

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")
RUN_NAME_RULE = "use letters, digits, '.', '_', '+', '-', starting with a letter or digit (max 100)"


def check_run_name(name: object) -> str:
    """`name` if it is a valid run name (one path component that stays inside the store)."""
    if not isinstance(name, str) or not RUN_NAME.match(name):
        raise StoreError(f"invalid run name {name!r}: {RUN_NAME_RULE}")
    return name


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StoreError(f"cannot read {path}: {describe_os_error(err)}") from None


def real_dir(path: Path, what: str = "folder") -> bool:
    """True if `path` is a directory (not a symlink to one), False if it does not exist."""
    st = _lstat(path)
    if st is None:
        return False
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{what} {path} is {_kind(st.st_mode)}, not a folder; refused")
    return True


def regular_file(path: Path, what: str = "file") -> os.stat_result | None:
    """`path`'s stat if it is a regular file (not a symlink), None if it does not exist."""
    st = _lstat(path)
    if st is None:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{what} {path} is {_kind(st.st_mode)}, not a regular file; refused")
    return st


def store_file(root: Path, run: str, *parts: str, what: str = "file") -> Path:
    """`<root>/<run>/<parts...>`, checked: a valid run name, real folders, a regular file.

    Raises StoreError if a component is a symlink or special file, or the file is missing.
    """
    folder = Path(root) / check_run_name(run)
    path = folder.joinpath(*parts)
    directory = folder
    for part in ("", *parts[:-1]):
        if part in (".", "..") or "/" in part or os.sep in part:
            raise StoreError(f"{what} {path} is not inside run {run!r}; refused")
        directory = directory / part if part else directory
        if not real_dir(directory, "run folder" if part == "" else "folder"):
            raise StoreError(f"{what} {path} does not exist")
    if regular_file(path, what) is None:
        raise StoreError(f"{what} {path} does not exist")
    return path


def open_lock(path: Path, *, create: bool) -> int | None:
    """A file descriptor on the lock file `path`; None if it does not exist and not `create`.

    Opened with O_NOFOLLOW | O_NONBLOCK: a symlink is refused instead of followed, and a FIFO
    cannot block the open; anything but a regular file (with a single link, so writing the
    holder's pid cannot change another file) is refused. Nothing is truncated here: the
    caller writes only once it holds the lock.
    """
    st = regular_file(path, "lock file")  # refuse a FIFO or device before opening it at all
    if st is None and not create:
        return None
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    flags |= os.O_RDWR | os.O_CREAT if create else os.O_RDONLY
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise StoreError(f"lock file {path} is a symlink; refused") from None
        if create:
            raise StoreWriteError(
                f"cannot create the lock file {path}: {describe_os_error(err)}", err.errno
            ) from None
        raise StoreError(f"cannot open the lock file {path}: {describe_os_error(err)}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = _kind(st.st_mode) if not stat.S_ISREG(st.st_mode) else "a hard link"
        raise StoreError(f"lock file {path} is {what}; refused")
    return fd


def virtual_source(root: Path, base: Path, name: str) -> str:
    """A virtual dataset's source file `name` (relative to the folder `base` of the file that
    holds the dataset), checked to be a regular file inside the store; '.' is that same file.

    HDF5 resolves a relative source against the virtual file's folder, so that is where it is
    checked; an absolute name, or one that leaves the store, is refused.
    """
    if name == ".":
        return "."
    if not name or os.path.isabs(name) or "\x00" in name:
        raise StoreError(f"virtual dataset source {name!r} is not a relative path; refused")
    root_abs = os.path.abspath(root)
    target = os.path.normpath(os.path.join(os.path.abspath(base), name))
    if os.path.commonpath([root_abs, target]) != root_abs or target == root_abs:
        raise StoreError(f"virtual dataset source {name!r} lies outside the store; refused")
    parts = Path(target).relative_to(root_abs).parts
    if len(parts) < 2:
        raise StoreError(f"virtual dataset source {name!r} is not in a run folder; refused")
    return str(store_file(Path(root_abs), parts[0], *parts[1:], what="virtual dataset source"))


def lock_run_folder(folder: Path, name: str) -> int:
    """Take `<folder>/LOCK` (non-blocking); return its descriptor. Only the holder writes
    its pid into it, after the lock is held."""
    path = folder / "LOCK"
    fd = open_lock(path, create=True)
    assert fd is not None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StoreError(
                f"run {name!r} is being written by another trainer "
                f"({holder or 'unknown'}); stop it first"
            ) from None
        raise StoreError(f"cannot lock {path}: {err}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
    except OSError as err:
        os.close(fd)
        raise StoreWriteError(f"cannot write {path}: {describe_os_error(err)}", err.errno) from None
    return fd


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree (never following a symlink); gone already is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
