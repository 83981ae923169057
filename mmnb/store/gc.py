"""Garbage in a store: what interrupted writers, corruption and killed runs leave behind.

`plan(store)` says what would be removed and why, reading only; `collect(store, plan)` removes
it under the store lock, re-checking each item first. Nothing a run lists, nothing of a run
being written, and no committed checkpoint that can still be read is ever garbage: an intact
checkpoint that no index lists is a commit that died before its index was updated, and is
added back to the index (by opening the run for writing), not deleted.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import confine
from .errors import StoreError, reason
from .run import PARSE_ERRORS, Run, _ckpt_step, _is_tmp, _unlisted_checkpoint
from .runfile import CKPT_DIR, RUN_FILE
from .store import STORE_FILES, Store, pid_alive, tmp_pid


@dataclass
class Garbage:
    """One thing `mmnb gc` removes: a file or folder, or stale index entries of a run."""

    path: Path
    why: str
    bytes: int = 0
    run: str | None = None  # for "repair index": the run whose index is rewritten

    @property
    def action(self) -> str:
        return "repair index" if self.run is not None else "remove"


def _size(path: Path) -> int:
    if path.is_symlink() or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def plan(store: Store) -> tuple[list[Garbage], list[str]]:
    """(what gc would remove or repair, and why; runs it could not look at, and why)."""
    items: list[Garbage] = []
    notes: list[str] = []
    if not store.path.is_dir():
        return items, notes
    for entry in sorted(store.path.iterdir()):
        pid = tmp_pid(entry.name)
        if pid is not None and not pid_alive(pid):
            items.append(Garbage(entry, f"an interrupted run creation (process {pid} is gone)"))
    for entry in sorted(store.path.iterdir()):
        if not confine.RUN_NAME.match(entry.name) or entry.name in STORE_FILES:
            continue
        try:
            if not confine.real_dir(entry, "run folder"):
                continue
            items += _run_garbage(store, entry, notes)
        except StoreError as err:
            notes.append(f"{err}; skipped")
    for item in items:
        item.bytes = _size(item.path) if item.action == "remove" else 0
    return items, notes


def _run_garbage(store: Store, folder: Path, notes: list[str]) -> list[Garbage]:
    run = Run(store, folder.name)
    if run.is_locked():
        notes.append(f"run {run.name} is being written; skipped")
        return []
    ckpt = folder / CKPT_DIR
    if confine.regular_file(folder / RUN_FILE, "run file") is None:
        files = (
            [p for p in ckpt.iterdir() if _ckpt_step(p.name) is not None] if ckpt.is_dir() else []
        )
        if files:
            notes.append(f"{folder} holds checkpoints but no run file; left alone")
            return []
        return [Garbage(folder, "a run folder without a run file or checkpoints")]
    try:
        steps = run.steps()
        parent = run.parent
    except StoreError as err:
        notes.append(f"{err}; skipped")
        return []
    on_disk = {p.name: p for p in ckpt.iterdir()} if confine.real_dir(ckpt, "folder") else {}
    if not steps and parent is None and not any(_ckpt_step(n) is not None for n in on_disk):
        return [Garbage(folder, "a run that never committed a checkpoint (stopped before step 0)")]
    items = []
    for path in sorted([*folder.iterdir(), *on_disk.values()]):
        if _is_tmp(path.name):
            items.append(Garbage(path, "a temporary file of an interrupted write"))
        elif path.name.endswith(".h5.corrupt"):
            items.append(Garbage(path, "a corrupt checkpoint, moved aside when it was replaced"))
    listed = {s.step for s in steps if s.run == run.name}
    for name, path in sorted(on_disk.items()):
        step = _ckpt_step(name)
        if step is None or step in listed:
            continue
        try:
            _unlisted_checkpoint(path, step, run.name)
        except (StoreError, *PARSE_ERRORS) as err:
            items.append(Garbage(path, f"an unreadable checkpoint no index lists ({reason(err)})"))
    missing = []
    for info in steps:
        try:
            run.checkpoint_path(info)
        except StoreError:
            missing.append(info.step)
    if missing:
        items.append(
            Garbage(
                folder / RUN_FILE,
                f"its index lists step {', '.join(map(str, missing))} whose file is gone",
                run=run.name,
            )
        )
    return items


def collect(store: Store, items: list[Garbage]) -> list[Garbage]:
    """Remove (or repair) `items`, each checked again under the store lock; return those done."""
    done = []
    with store.locked():
        fresh, _ = plan(store)
        current = {(i.path, i.action) for i in fresh}
        for item in items:
            if (item.path, item.action) not in current:
                continue  # no longer garbage (a writer came back, the process was alive…)
            if item.run is not None:
                run = Run(store, item.run)
                with warnings.catch_warnings():  # reported as this item already
                    warnings.simplefilter("ignore")
                    run.open_writer()  # reconciling drops the entries whose file is gone
                run.close_writer()
            elif item.path.is_dir() and not item.path.is_symlink():
                shutil.rmtree(item.path)
            else:
                item.path.unlink(missing_ok=True)
            done.append(dataclasses.replace(item))
    return done
