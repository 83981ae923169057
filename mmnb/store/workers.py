"""Worker threads for verifying a loaded checkpoint: checksums and finiteness checks.

XXH3 (xxhash) and torch's reductions release the GIL, so while workers hash or check some
tensors, the calling thread goes on with HDF5's metadata for the next ones. (Saves do not use
them: measured slower there on a 2-vCPU machine; see docs/performance.md.)
A pool lives for one save or load only: no thread outlives the call, and a forked process
(a DataLoader worker) never inherits a pool whose threads it does not have.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any


def _threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


THREADS = _threads()


# Work is handed to the pool in jobs of at least this many bytes: a job per tensor (hundreds
# per checkpoint) costs the calling thread more in hand-offs than the work it moves.
BATCH_BYTES = 16 << 20


def pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="mmnb-store")


class Batched:
    """`fn(item)` for items submitted one by one, run on `pool` in batches of BATCH_BYTES."""

    def __init__(self, pool: Executor, fn: Callable[[Any], Any]) -> None:
        self.pool, self.fn = pool, fn
        self.items: list[tuple[Any, Slot]] = []
        self.bytes = 0

    def submit(self, item: Any, nbytes: int) -> Slot:
        slot = Slot(self)
        self.items.append((item, slot))
        self.bytes += nbytes
        if self.bytes >= BATCH_BYTES:
            self.flush()
        return slot

    def flush(self) -> None:
        if self.items:
            items, self.items, self.bytes = self.items, [], 0
            job = self.pool.submit(lambda: [self.fn(item) for item, _ in items])
            for index, (_, slot) in enumerate(items):
                slot.job, slot.index = job, index


class Slot:
    """The result of one item of a `Batched`."""

    def __init__(self, batched: Batched) -> None:
        self.batched = batched
        self.job: Future[list[Any]] | None = None
        self.index = 0

    def result(self) -> Any:
        if self.job is None:
            self.batched.flush()
        assert self.job is not None
        return self.job.result()[self.index]


def map_batched(pool: Executor, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """[fn(item) for item in items], in one contiguous batch per thread."""
    size = max(1, -(-len(items) // THREADS))
    jobs = [
        pool.submit(lambda part: [fn(item) for item in part], items[i : i + size])
        for i in range(0, len(items), size)
    ]
    return [result for job in jobs for result in job.result()]


__all__ = ["BATCH_BYTES", "THREADS", "Batched", "Slot", "map_batched", "pool"]
