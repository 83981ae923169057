"""A store: a folder of runs (default ./mmnb-runs, or $MMNB_STORE)."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

from . import confine
from .errors import StoreError
from .run import (
    CKPT_DIR,
    FORMAT_VERSION,
    RUN_FILE,
    Run,
    StepInfo,
    checkpoint_file,
    write_run_file,
)

# Files of the store's own with names a run could have: the job queue (mmnb.jobs.queue) and
# the worker's lock. Never listed as runs.
STORE_FILES = frozenset(
    {"queue.sqlite", "queue.sqlite-wal", "queue.sqlite-shm", "queue.sqlite-journal", "worker.lock"}
)


def default_store_path() -> Path:
    return Path(os.environ.get("MMNB_STORE") or "mmnb-runs")


class Store:
    """`Store(path)` opens (without creating) a folder of runs."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else default_store_path()

    def __repr__(self) -> str:
        return f"<mmnb.Store {str(self.path)!r}: {len(self.runs())} runs>"

    def runs(self) -> list[Run]:
        """The runs of the store, by name. A folder that is no run (no valid name, no run file)
        is not listed; one that would lead outside the store (a symlink) is skipped with a
        warning naming it."""
        if not self.path.is_dir():
            return []
        runs = []
        for entry in sorted(self.path.iterdir()):
            if not confine.RUN_NAME.match(entry.name) or entry.name in STORE_FILES:
                continue  # the store's own files (.lock, temporary folders, queue), not runs
            try:
                if confine.real_dir(entry, "run folder") and confine.regular_file(
                    entry / RUN_FILE, "run file"
                ):
                    runs.append(Run(self, entry.name))
            except StoreError as err:
                warnings.warn(f"{err}; skipping it", stacklevel=2)
        return runs

    def run(self, name: str) -> Run:
        confine.check_run_name(name)
        try:
            confine.store_file(self.path, name, RUN_FILE, what="run file")
        except StoreError as err:
            if "does not exist" not in str(err):
                raise
            have = ", ".join(r.name for r in self.runs()) or "none"
            raise StoreError(f"no run named {name!r} in store {self.path} (runs: {have})") from None
        return Run(self, name)

    def newest(self) -> Run:
        """The run whose index changed last."""
        runs = self.runs()
        if not runs:
            raise StoreError(f"store {self.path} has no runs")
        return max(runs, key=lambda r: r.run_file.stat().st_mtime)

    def new_name(self, prefix: str = "run") -> str:
        taken = {r.name for r in self.runs()}
        n = 1
        while f"{prefix}-{n:03d}" in taken:
            n += 1
        return f"{prefix}-{n:03d}"

    def branch_points(self, name: str) -> set[int]:
        """Steps of run `name` that another run branched from."""
        return {r.parent[1] for r in self.runs() if r.parent and r.parent[0] == name}

    def create_run(
        self,
        name: str,
        config: dict[str, Any],
        tokenizer_json: str,
        *,
        parent: tuple[str, int] | None = None,
        stage: dict[str, Any] | None = None,
        lineage: dict[str, Any] | None = None,
    ) -> Run:
        """Create `<store>/<name>/` with its run file; fails if the name is taken.

        A branch's index starts with links to its parent's checkpoints up to the branch step:
        the history is shared, never copied.
        """
        confine.check_run_name(name)
        folder = self.path / name
        if os.path.lexists(folder):
            raise StoreError(f"run {name!r} already exists in store {self.path}")
        inherited: list[StepInfo] = []
        if parent is not None:
            source = self.run(parent[0])
            source.step_info(parent[1])  # the branch point must exist
            for info in source.steps():
                if info.step <= parent[1]:
                    source.checkpoint_path(info)  # confined and present
                    rel = checkpoint_file(name, info.step, info.run)
                    inherited.append(StepInfo(**{**info.__dict__, "file": rel}))
        (folder / CKPT_DIR).mkdir(parents=True)
        attrs = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "config": json.dumps(config),
            "parent": json.dumps({"run": parent[0], "step": parent[1]} if parent else None),
            "stage": json.dumps(stage or {"start": 0, "reset_data": False}),
            "history": json.dumps([]),
            "lineage": json.dumps(lineage or {}),
            "tokenizer": tokenizer_json,
            "created": time.time(),
        }
        write_run_file(folder, attrs, inherited)
        return Run(self, name)
