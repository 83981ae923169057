"""A store: a folder of runs (default ./mmnb-runs, or $MMNB_STORE).

Besides its runs, a store folder holds `.lock`: the store-level lock that creating a run
(a branch lists its parent's checkpoints) and deleting checkpoints take, so that a branch
never lists a checkpoint that retention is deleting, and `.<name>.<pid>.tmp/` folders of run
creations in progress (a run appears by one atomic rename, complete with its index).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..durable import fsync
from . import confine
from .confine import lock_run_folder, remove_path
from .errors import StoreError, StoreWriteError, describe_os_error, reason
from .run import CKPT_DIR, RUN_FILE, Run, StepInfo, checkpoint_file
from .runfile import write_run_file

STORE_LOCK = ".lock"
LOCK_TIMEOUT = 60.0  # the store lock is held for milliseconds (index reads, renames, unlinks)

# Files of the store's own with names a run could have: the job queue (mmnb.jobs.queue) and
# the worker's lock. Never listed as runs.
STORE_FILES = frozenset(
    {"queue.sqlite", "queue.sqlite-wal", "queue.sqlite-shm", "queue.sqlite-journal", "worker.lock"}
)


def default_store_path() -> Path:
    return Path(os.environ.get("MMNB_STORE") or "mmnb-runs")


def tmp_pid(name: str) -> int | None:
    """The pid in a temporary name `.<anything>.<pid>.tmp`, else None."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    pid = name[: -len(".tmp")].rpartition(".")[2]
    return int(pid) if pid.isdigit() else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        """Steps of run `name` that another (readable) run branched from."""
        points = set()
        for run in self.runs():
            try:
                parent = run.parent
            except StoreError:
                continue
            if parent and parent[0] == name:
                points.add(parent[1])
        return points

    # ---- lineage ----
    def references(self, exclude: str | None = None) -> dict[tuple[str, int], list[str]]:
        """(owner run, step) → the runs that list that checkpoint in their index or branched
        from it, at any depth (a grandchild lists its grandparent's files too).

        Raises StoreError if a run cannot be read: then nobody can tell what it needs, and
        nothing may be deleted.
        """
        refs: dict[tuple[str, int], list[str]] = {}
        for run in self.runs():
            if run.name == exclude:
                continue
            for info in run.steps():
                refs.setdefault((info.run, info.step), []).append(run.name)
            parent = run.parent
            if parent is not None:
                refs.setdefault(parent, []).append(run.name)
        return refs

    @contextlib.contextmanager
    def locked(self, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """Hold the store-level lock (creating runs, deleting checkpoints). Not reentrant."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreWriteError(
                f"cannot create the store {self.path}: {describe_os_error(err)}", err.errno
            ) from None
        fd = confine.open_lock(self.path / STORE_LOCK, create=True)
        assert fd is not None
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StoreError(
                            f"the store lock {self.path / STORE_LOCK} has been held by another "
                            f"process for {timeout:.0f} s"
                        ) from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(fd)  # releases the lock

    # ---- creating runs ----
    def create_run(
        self,
        name: str,
        config: dict[str, Any],
        tokenizer_json: str,
        *,
        parent: tuple[str, int] | None = None,
        stage: dict[str, Any] | None = None,
        writer: bool = False,
        lineage: dict[str, Any] | None = None,
    ) -> Run:
        """Create `<store>/<name>/` with its run file; fails if the name is taken.

        A branch's index starts with its parent's checkpoints up to the branch step: the
        history is shared, never copied. The run appears complete or not at all (built in a
        temporary folder, then renamed). With `writer`, the returned run already holds its
        writer lock, so nobody sees it unlocked before its first checkpoint. A root run that
        a killed process left without any checkpoint is replaced.
        """
        confine.check_run_name(name)
        meta = {
            "name": name,
            "config": config,
            "parent": {"run": parent[0], "step": parent[1]} if parent else None,
            "stage": stage or {"start": 0, "reset_data": False},
            "history": [],
            "lineage": lineage or {},
            "tokenizer": tokenizer_json,
            "created": time.time(),
        }
        with self.locked():
            self._remove_stale_tmp()
            folder = self.path / name
            if os.path.lexists(folder):
                if not self._abandoned(name):
                    raise StoreError(f"run {name!r} already exists in store {self.path}")
                remove_path(folder)
            inherited: list[StepInfo] = []
            if parent is not None:
                source = self.run(parent[0])
                source.step_info(parent[1])  # the branch point must exist
                for info in source.steps():
                    if info.step <= parent[1]:
                        source.checkpoint_path(info)  # confined and present, under the lock
                        rel = checkpoint_file(name, info.step, info.run)
                        inherited.append(dataclasses.replace(info, file=rel))
            tmp = self.path / f".{name}.{os.getpid()}.tmp"
            fd = None
            try:
                remove_path(tmp)
                (tmp / CKPT_DIR).mkdir(parents=True)
                write_run_file(tmp, meta, inherited)
                fd = lock_run_folder(tmp, name) if writer else None
                os.rename(tmp, folder)
                fsync(self.path)
            except OSError as err:
                if fd is not None:
                    os.close(fd)
                remove_path(tmp)
                raise StoreWriteError(
                    f"{describe_os_error(err)} while creating run {name!r} in {self.path}",
                    err.errno,
                ) from None
        run = Run(self, name)
        if fd is not None:
            run._lock_fd, run._index = fd, inherited
        return run

    def _abandoned(self, name: str) -> bool:
        """A root run with no checkpoint and no writer: its creator died before step 0."""
        run = Run(self, name)
        try:
            if run.is_locked() or run.parent is not None:
                return False
            return not run.steps() and not any((run.path / CKPT_DIR).iterdir())
        except (StoreError, OSError):
            return False

    def _remove_stale_tmp(self) -> None:
        """Remove the temporary folders of run creations whose process is gone."""
        for entry in self.path.iterdir():
            pid = tmp_pid(entry.name)
            if pid is not None and pid != os.getpid() and not pid_alive(pid):
                try:
                    remove_path(entry)
                except OSError as err:
                    warnings.warn(f"cannot remove {entry}: {reason(err)}", stacklevel=3)
