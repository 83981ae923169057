"""Checkpoints written on a background thread while training goes on (`--async-save`).

At a step boundary the trainer hands its `state_dict()` — which references the live weights and
optimizer moments — to `AsyncWriter.submit`. A background thread first copies every tensor into
host buffers that are reused from one checkpoint to the next (`captured`), then writes, fsyncs
and commits the copy through the store's unchanged commit protocol (`done`). Training goes on
meanwhile; the only thing it waits for is `captured`, right before the next `optimizer.step()`
would change the tensors being copied — and the copy takes a fraction of the forward/backward
pass that precedes that step.

Ordering is the trainer's job (mmnb.train): at most one save in flight, commits in step order,
and the end of training, a stop, an interrupt or a rollback waits for the commit in flight.
Nothing here prints or emits; the trainer reports on its own thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

Writer = Callable[[dict[str, Any], list[str], list[str]], Any]  # (state, reasons, tags) -> info

# A state larger than this is saved asynchronously unless told otherwise: below it a blocking
# save takes milliseconds and a background thread would only add a thread switch.
AUTO_BYTES = 64 << 20


class Job:
    """One checkpoint being written: its step, and what became of it."""

    def __init__(self, step: int, reasons: list[str], tags: list[str]) -> None:
        self.step, self.reasons, self.tags = step, reasons, tags
        self.captured = threading.Event()  # the live tensors have been copied
        self.done = threading.Event()  # committed, or failed
        self.result: Any = None
        self.error: BaseException | None = None

    def wait(self) -> Any:
        """The writer's result once committed; re-raises what made the write fail."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class AsyncWriter:
    """Runs `writer` on a background thread for one state at a time."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}  # tree path -> reused host buffer
        self._thread: threading.Thread | None = None

    def submit(
        self, writer: Writer, state: dict[str, Any], reasons: list[str], tags: list[str]
    ) -> Job:
        """Start writing `state`; the caller has waited for the previous job to be done."""
        if self._thread is not None:
            # The caller waited for the previous job's `done`; its thread is just returning.
            self._thread.join()
        job = Job(int(state["trainer"]["step"]), list(reasons), list(tags))
        # Not a daemon: an interpreter shutting down waits for the commit instead of cutting
        # the file short (the commit protocol would make a cut file harmless, but lost).
        self._thread = threading.Thread(
            target=self._run, args=(job, writer, state), name="mmnb-checkpoint", daemon=False
        )
        self._thread.start()
        return job

    def _run(self, job: Job, writer: Writer, state: dict[str, Any]) -> None:
        try:
            copied = self._copy(state, "", {})
        except BaseException as err:
            job.error = err
            job.captured.set()
            job.done.set()
            return
        job.captured.set()
        try:
            job.result = writer(copied, job.reasons, job.tags)
        except BaseException as err:  # handed to the training thread, which re-raises it
            job.error = err
        finally:
            job.done.set()

    def _copy(self, tree: dict[str, Any], prefix: str, seen: dict[tuple, torch.Tensor]) -> dict:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            path = f"{prefix}/{key}"
            if isinstance(value, dict):
                out[key] = self._copy(value, path, seen)
            elif isinstance(value, torch.Tensor):
                # Views of one storage (tied weights) stay one buffer, so the store still
                # writes them once and links the second name.
                identity = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
                if value.numel() and identity in seen:
                    out[key] = seen[identity]
                    continue
                buffer = self._buffer(path, value)
                _copy_into(buffer, value)
                seen[identity] = out[key] = buffer
            elif isinstance(value, np.ndarray):
                out[key] = value.copy()
            else:
                out[key] = value  # plain values built fresh by state_dict()
        return out

    def _buffer(self, path: str, like: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(path)
        if buffer is None or buffer.dtype != like.dtype or buffer.shape != like.shape:
            pin = like.device.type == "cuda"
            buffer = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pin)
            self._buffers[path] = buffer
        return buffer


def _copy_into(buffer: torch.Tensor, value: torch.Tensor) -> None:
    value = value.detach()
    if value.device.type == "cpu" and value.is_contiguous():
        # numpy's copy is single-threaded and releases the GIL: it does not compete with the
        # training thread's OpenMP pool (oversubscribed OpenMP threads spin and slow both).
        np.copyto(_bytes(buffer), _bytes(value))
    else:
        buffer.copy_(value)


def _bytes(tensor: torch.Tensor) -> np.ndarray:
    return tensor.reshape(-1).view(torch.uint8).numpy()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """About what a checkpoint holds: the trained weights and AdamW's two moments of each."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return 3 * sum(p.numel() * p.element_size() for p in params)


__all__ = ["AUTO_BYTES", "AsyncWriter", "Job", "state_bytes"]
