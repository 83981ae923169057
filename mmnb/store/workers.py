"""Worker threads for the byte-level work on a checkpoint: checksums, finiteness checks, writes.

XXH3 (xxhash), torch's reductions and `os.pwrite` release the GIL, so while workers hash,
check or write one tensor, the calling thread goes on with HDF5's metadata for the next one.
A pool lives for one save or load only: no thread outlives the call, and a forked process
(a DataLoader worker) never inherits a pool whose threads it does not have.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor


def _threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


THREADS = _threads()


def pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="mmnb-store")


__all__ = ["THREADS", "pool"]
