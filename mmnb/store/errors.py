"""The store's exceptions: every failure is one `StoreError` whose message names the file."""

from __future__ import annotations

import errno
import os

# What a user is told for the write failures a full, read-only or limited disk produces.
_WRITE_ERRORS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


class StoreError(Exception):
    """A user-facing store problem (unknown run or step, lock held, corrupt or unsafe file)."""


class CorruptCheckpoint(StoreError):
    """A checkpoint file that is unreadable, fails a checksum or does not match its run."""


class StoreWriteError(StoreError):
    """Writing to the store failed (disk full, quota, file size limit, read-only, denied).

    The store is as it was before the write: the previous checkpoints and the index are intact
    and the temporary file is gone.
    """

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


def describe_os_error(err: OSError) -> str:
    """'disk full', 'read-only file system', … for an OSError from a write."""
    if err.errno in _WRITE_ERRORS:
        return _WRITE_ERRORS[err.errno]
    return err.strerror or os.strerror(err.errno or 0) or str(err)


def reason(err: BaseException) -> str:
    """The first line of an exception's message, short enough for a one-line error."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
