"""Worker threads for verifying a loaded checkpoint: checksums and finiteness checks.

XXH3 (xxhash) and torch's reductions release the GIL, so the workers hash and check tensors in
parallel (`store.lazy.resolve_all`). (Saves hash inline and write on their own threads:
`image.FileWriter`; see docs/performance.md.)
A pool lives for one save or load only: no thread outlives the call, and a forked process
(a DataLoader worker) never inherits a pool whose threads it does not have.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any


def _threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


THREADS = _threads()


def pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="mmnb-store")


def map_batched(pool: Executor, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """[fn(item) for item in items], in one contiguous batch per thread."""
    size = max(1, -(-len(items) // THREADS))
    jobs = [
        pool.submit(lambda part: [fn(item) for item in part], items[i : i + size])
        for i in range(0, len(items), size)
    ]
    return [result for job in jobs for result in job.result()]


__all__ = ["THREADS", "map_batched", "pool"]
