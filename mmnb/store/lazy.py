"""A checkpoint's state whose tensors are verified when first used: `Run.load(verify="lazy")`.

The load itself makes every check that needs no tensor bytes (manifest and summary checksums,
the index's expectations, the schema of the run's config, hard links only, every dataset's
dtype, shape and extent inside the file, the JSON values) and maps the file; a tensor's bytes
are read, checked against their checksum and (weights and optimizer moments) for finiteness
the first time it is taken out of the state. Nothing unverified is ever handed out: a mismatch
raises `CorruptCheckpoint` naming the file, at that access. A reader that uses a few tensors
reads only those; one that uses all of them reads every byte once, as an up-front load does.

Groups holding tensors are `LazyDict`s: read-only mappings (`state["model"][name]`,
`.items()`, `dict(...)`, `Module.load_state_dict(...)` all verify what they return). `copy()`
and `to_dict()` verify everything below on worker threads and give plain dicts, so
`Optimizer.load_state_dict`, which starts with `state_dict.copy()`, works too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import workers
from .errors import CorruptCheckpoint, reason
from .h5state import ChecksumError, numpy_to_tensor, verify_array
from .schema import _finite


class Pending:
    """A dataset's bytes, not yet verified (a view of the mapped file, or read by HDF5)."""

    __slots__ = ("path", "array", "entry", "torch_dtype", "finite")

    def __init__(
        self, path: str, array: np.ndarray, entry: dict[str, Any], torch_dtype: str | None
    ) -> None:
        self.path, self.array, self.entry, self.torch_dtype = path, array, entry, torch_dtype
        # mmnb never commits a non-finite weight or moment (`schema.non_finite`)
        self.finite = path.startswith("model/") or path.startswith("optim/state/")

    def resolve(self) -> Any:
        """The verified tensor (or array); ChecksumError/ValueError if the bytes are wrong."""
        verify_array(self.path, self.array, self.entry)
        value = numpy_to_tensor(self.array, self.torch_dtype) if self.torch_dtype else self.array
        if self.finite and not _finite(value):
            raise ValueError(f"{self.path.replace('/', '.')} holds non-finite values")
        return value


class _Source:
    """What the `LazyDict`s of one load share: the file (for messages) and one lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()

    def resolve(self, pending: Pending) -> Any:
        try:
            return pending.resolve()
        except (ChecksumError, ValueError) as err:
            raise self.corrupt(err) from None

    def corrupt(self, err: BaseException) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"checkpoint {self.path} is unreadable or corrupt ({reason(err)})")


class LazyDict(Mapping):
    """A read-only mapping whose tensors are verified the first time they are taken out."""

    def __init__(self, items: dict[str, Any], source: _Source) -> None:
        self._items = items
        self._source = source

    def __getitem__(self, key: str) -> Any:
        value = self._items[key]
        if isinstance(value, Pending):
            with self._source.lock:
                value = self._items[key]
                if isinstance(value, Pending):
                    value = self._items[key] = self._source.resolve(value)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def unverified(self) -> int:
        """How many tensors below this node have not been verified yet."""
        return sum(
            1 if isinstance(v, Pending) else v.unverified() if isinstance(v, LazyDict) else 0
            for v in self._items.values()
        )

    def to_dict(self) -> dict[str, Any]:
        """Everything below, verified (on worker threads), as plain nested dicts."""
        with self._source.lock:
            try:
                resolve_all(self._items)
            except (ChecksumError, ValueError) as err:
                raise self._source.corrupt(err) from None
        return self._plain()

    copy = to_dict  # `Optimizer.load_state_dict` shallow-copies what it is given

    def _plain(self) -> dict[str, Any]:
        return {k: v._plain() if isinstance(v, LazyDict) else v for k, v in self._items.items()}

    def __repr__(self) -> str:
        return f"<LazyDict of {len(self)} entries, {self.unverified()} tensors not yet verified>"


def resolve_all(tree: dict[str, Any]) -> None:
    """Verify every `Pending` below `tree` (dicts and `LazyDict`s) on worker threads and put
    its value in its place; then raise the first failure (ChecksumError or ValueError), in
    reading order, if any. The rest stay verified."""
    todo: list[tuple[dict[str, Any], str, Pending]] = []
    stack: list[dict[str, Any]] = [tree]
    while stack:
        node = stack.pop()
        items = node._items if isinstance(node, LazyDict) else node
        for key, value in items.items():
            if isinstance(value, Pending):
                todo.append((items, key, value))
            elif isinstance(value, (dict, LazyDict)):
                stack.append(value)
    if not todo:
        return
    todo.sort(key=lambda job: job[2].path)
    with workers.pool() as pool:
        done = workers.map_batched(pool, _attempt, [pending for _, _, pending in todo])
    first: BaseException | None = None
    for (items, key, _), (value, error) in zip(todo, done, strict=True):
        if error is None:
            items[key] = value
        first = first or error
    if first is not None:
        raise first


def _attempt(pending: Pending) -> tuple[Any, BaseException | None]:
    try:
        return pending.resolve(), None
    except (ChecksumError, ValueError) as err:
        return None, err


def wrap(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """`state` with every dict that holds a `Pending` (at any depth) as a `LazyDict`."""
    source = _Source(path)
    return {group: _convert(values, source) for group, values in state.items()}


def _convert(node: Any, source: _Source) -> Any:
    # (Not a closure calling itself: that is a reference cycle, which would keep the source,
    # and so the file's mapping, alive until the garbage collector runs.)
    if not isinstance(node, dict):
        return node
    items = {k: _convert(v, source) for k, v in node.items()}
    if any(isinstance(v, (Pending, LazyDict)) for v in items.values()):
        return LazyDict(items, source)
    return items


def resolved(state: Mapping[str, Any]) -> dict[str, Any]:
    """A state from `Run.load` as plain dicts, every tensor verified (a no-op when eager)."""
    return {k: v.to_dict() if isinstance(v, LazyDict) else v for k, v in state.items()}


__all__ = ["LazyDict", "resolved"]
