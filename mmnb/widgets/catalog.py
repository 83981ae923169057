"""What the history browser knows about a store: runs, their checkpoints and lineage.

Everything comes from the run indexes (no tensor is read) and is cached per run until its
`run.h5` changes (every commit replaces it atomically, so its inode and mtime change). A
slider move therefore reads nothing from disk; a refresh re-reads only the runs that changed.
Metrics (the newest checkpoint's `metrics` group) are read on first use, once per change.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..store import Run, StepInfo, Store, StoreError


@dataclass
class RunEntry:
    """One run as of the last read of its index."""

    run: Run
    parent: tuple[str, int] | None
    stage_start: int  # where the run's own steps begin (its branch step; 0 for a root)
    steps: list[StepInfo]
    config: dict[str, Any]
    created: float
    stamp: tuple[int, int]  # (mtime_ns, inode) of run.h5 when read
    status: str = ""
    by_step: dict[int, StepInfo] = field(default_factory=dict)
    _metrics: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        self.by_step = {s.step: s for s in self.steps}

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def train_config(self) -> dict[str, Any]:
        return self.config.get("train", {})

    def metrics(self) -> dict[str, np.ndarray]:
        """The per-step log up to the newest checkpoint (a branch's includes its parent's
        history up to the branch step); read once per index change."""
        if self._metrics is None:
            self._metrics = self.run.metrics() if self.steps else {}
        return self._metrics

    def value_at(self, key: str, step: int) -> float | None:
        """The logged `key` (loss, lr, …) of optimizer step `step`, if logged."""
        metrics = self.metrics()
        steps = metrics.get("step")
        if steps is None or not len(steps):
            return None
        i = int(np.searchsorted(steps, step))
        if i < len(steps) and steps[i] == step:
            return float(metrics[key][i])
        return None


def _stamp(run: Run) -> tuple[int, int]:
    st = os.stat(run.run_file)
    return st.st_mtime_ns, st.st_ino


def _status(run: Run, steps: list[StepInfo]) -> str:
    # Run.status() from the cached index: the lock can be taken without the index changing,
    # so it is checked on every refresh, but the index is not re-read for it.
    if run.is_locked():
        return "training"
    if not steps:
        return "empty"
    if all(s.inherited for s in steps):
        return "not started"  # a branch created with start=False
    reasons = steps[-1].reasons
    return (
        "finished" if "end" in reasons else "interrupted" if "interrupt" in reasons else "stopped"
    )


class Catalog:
    """The runs of a store, their tree, and per-run caches."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.entries: dict[str, RunEntry] = {}
        self.problems: list[str] = []  # runs skipped at the last refresh, and why

    def refresh(self) -> None:
        """Re-read the runs whose index changed; drop runs that are gone. A damaged run is
        skipped (listed in `problems`); the others are shown."""
        seen = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs = self.store.runs()
        problems = [str(w.message) for w in caught]
        for run in runs:
            try:
                stamp = _stamp(run)
            except FileNotFoundError:  # removed between listing and stat
                continue
            try:
                entry = self.entries.get(run.name)
                if entry is None or entry.stamp != stamp:
                    entry = self._read(run, stamp)
                entry.status = _status(run, entry.steps)
            except StoreError as err:
                problems.append(f"{err}; skipping run {run.name}")
                continue
            seen[run.name] = entry
        self.entries = seen
        self.problems = problems

    def _read(self, run: Run, stamp: tuple[int, int]) -> RunEntry:
        info = run.info()
        parent = info.get("parent")
        stage = info.get("stage") or {}
        return RunEntry(
            run=run,
            parent=(parent["run"], int(parent["step"])) if parent else None,
            stage_start=int(stage.get("start", 0)),
            steps=run.steps(),
            config=info.get("config", {}),
            created=float(info.get("created", 0.0)),
            stamp=stamp,
        )

    def __getitem__(self, name: str) -> RunEntry:
        return self.entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return [name for _, name in self.tree()]

    def children(self, name: str) -> list[RunEntry]:
        kids = [e for e in self.entries.values() if e.parent and e.parent[0] == name]
        return sorted(kids, key=lambda e: (e.parent[1], e.created, e.name))  # type: ignore[index]

    def branch_points(self, name: str) -> set[int]:
        return {e.parent[1] for e in self.children(name)}  # type: ignore[index]

    def tree(self) -> list[tuple[int, str]]:
        """(depth, name) depth-first: roots by creation time, branches under their parent,
        ordered by branch step. A run whose parent is missing is shown as a root."""
        roots = [
            e for e in self.entries.values() if e.parent is None or e.parent[0] not in self.entries
        ]
        out: list[tuple[int, str]] = []

        def walk(entry: RunEntry, depth: int) -> None:
            out.append((depth, entry.name))
            for child in self.children(entry.name):
                walk(child, depth + 1)

        for root in sorted(roots, key=lambda e: (e.created, e.name)):
            walk(root, 0)
        return out

    def label(self, name: str, depth: int) -> str:
        """A tree line: indentation with non-breaking spaces (a <select> collapses spaces)."""
        entry = self.entries[name]
        own = sum(1 for s in entry.steps if not s.inherited)
        parts = [name]
        if entry.parent:
            parts.append(f"from {entry.parent[0]}@{entry.parent[1]}")
        last = entry.steps[-1].step if entry.steps else None
        parts.append(f"{own} ckpts" + (f" to step {last}" if last is not None else ""))
        parts.append(entry.status)
        indent = "\u00a0\u00a0\u00a0" * (depth - 1) + "\u2514\u00a0" if depth else ""
        return indent + " · ".join(parts)
