"""One run in a store: its index file, its immutable checkpoint files, its writer lock.

Layout of `<store>/<run>/` (docs/store-format.md has the whole story):

    run.h5              index, replaced atomically on every commit: run metadata (config,
                        parent, tokenizer), the list of committed checkpoints, a checksum
    ckpt/00000120.h5    one file per committed checkpoint; written under a temporary name,
                        fsynced, renamed; never opened for writing again
    LOCK                flock()ed by the one writer

The checkpoint files are the truth: a commit that died between the rename and the index
replacement is recovered by the next writer (`_reconcile`). Everything read is untrusted:
paths are confined to the store (`confine`), files are checked before use (`ckptfile`,
`runfile`), and every failure is one StoreError naming the file.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..durable import fsync
from . import confine, schema
from .ckptfile import STATE_GROUPS, read_checkpoint, read_summary, write_checkpoint
from .confine import lock_run_folder, remove_path
from .errors import CorruptCheckpoint, StoreError, StoreWriteError, describe_os_error, reason
from .image import discard
from .runfile import (
    CKPT_DIR,
    RUN_FILE,
    StepInfo,
    checkpoint_file,
    read_run_file,
    step_info,
    step_name,
    write_run_file,
)
from .sharded import SHARD_FILE, shard_files, shard_source

if TYPE_CHECKING:
    from .store import Store

__all__ = ["Run", "StepInfo", "STATE_GROUPS", "RUN_FILE", "CKPT_DIR", "checkpoint_file"]

# What a damaged or crafted file can make h5py, json or our checks raise while reading.
PARSE_ERRORS = (
    OSError,
    KeyError,
    ValueError,
    TypeError,
    RuntimeError,
    AttributeError,
    IndexError,
    OverflowError,
    RecursionError,
)


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


class Run:
    """A handle on `<store>/<name>/`. Reading never takes the lock; writing needs `open_writer`."""

    def __init__(self, store: Store, name: str) -> None:
        self.store, self.name = store, confine.check_run_name(name)
        self.path = store.path / name
        self.trainer: Any = None  # the live Trainer when this process trains the run
        self.thread: threading.Thread | None = None  # background training, if any
        self.error: BaseException | None = None  # what ended background training, if it failed
        self._lock_fd: int | None = None
        self._index: list[StepInfo] | None = None  # the writer's in-memory index
        self._cache: tuple[tuple[int, int, int], dict[str, Any], list[StepInfo]] | None = None
        self._moved_aside: set[int] = set()  # corrupt steps a sharded commit moved aside

    def __repr__(self) -> str:
        return f"<mmnb.Run {self.name!r} at {self.path}>"

    # One line in a notebook (Out[n]) instead of the raw repr; the words live in describe.py.
    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        from ..describe import run_line

        printer.text(run_line(self))

    def _repr_html_(self) -> str:
        from html import escape

        from ..describe import run_line

        return f"<code>{escape(run_line(self))}</code>"

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    # ---- metadata (no tensor is read) ----
    def _read(self) -> tuple[dict[str, Any], list[StepInfo]]:
        """(metadata, index) of run.h5, checked; cached until the file is replaced."""
        path = confine.store_file(self.store.path, self.name, RUN_FILE, what="run file")
        try:
            st = os.stat(path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._cache is not None and self._cache[0] == stamp:
                return self._cache[1], list(self._cache[2])
            meta, index = read_run_file(path, self.name)
            schema.check_config(meta["config"])
        except PARSE_ERRORS as err:
            raise StoreError(f"run file {path} is unreadable or corrupt ({reason(err)})") from None
        self._cache = (stamp, meta, index)
        return meta, list(index)

    def _meta(self) -> dict[str, Any]:
        return self._read()[0]

    def config_dict(self) -> dict[str, Any]:
        return self._meta()["config"]

    @property
    def parent(self) -> tuple[str, int] | None:
        p = self._meta()["parent"]
        return (p["run"], int(p["step"])) if p else None

    def info(self) -> dict[str, Any]:
        """Run-level attributes decoded: config, parent, stage, history, lineage, created."""
        meta = self._meta()
        keys = ("config", "parent", "stage", "history", "lineage", "created")
        return {k: meta[k] for k in keys}

    def tokenizer_json(self) -> str:
        return self._meta()["tokenizer"]

    def steps(self) -> list[StepInfo]:
        """Committed checkpoints, oldest first, including a branch's inherited ones."""
        if self._index is not None:
            return list(self._index)
        return self._read()[1]

    def step_info(self, step: int) -> StepInfo:
        for info in self.steps():
            if info.step == step:
                return info
        have = ", ".join(str(s.step) for s in self.steps()) or "none"
        raise StoreError(f"run {self.name!r} has no checkpoint at step {step} (it has: {have})")

    def latest(self) -> StepInfo | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def metrics(self, step: int | None = None) -> dict[str, np.ndarray]:
        """The per-step metrics log up to `step` (newest checkpoint by default)."""
        info = self.step_info(step) if step is not None else self.latest()
        if info is None:
            return {}
        return self._load_file(info, True, ("metrics",))["metrics"]

    def status(self) -> str:
        if self.is_locked():
            return "training"
        last = self.latest()
        if last is None:
            return "empty"
        if "end" in last.reasons:
            return "finished"
        return "interrupted" if "interrupt" in last.reasons else "stopped"

    def is_locked(self) -> bool:
        if self._lock_fd is not None:
            return True
        fd = confine.open_lock(self.path / "LOCK", create=False)
        if fd is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)

    # ---- the training session of this process (engine objects, set by mmnb.api) ----
    @property
    def training(self) -> bool:
        """True while this process trains the run in a background thread."""
        return self.thread is not None and self.thread.is_alive()

    def start_thread(self, target: Callable[[], None]) -> None:
        def body() -> None:
            try:
                target()
            except BaseException as err:  # kept for wait(); a thread has no one to raise to
                self.error = err

        self.error = None
        self.thread = threading.Thread(target=body, name=f"mmnb-train-{self.name}", daemon=True)
        self.thread.start()

    def wait(self, timeout: float | None = None) -> Run:
        """Wait for background training to end; re-raise what made it fail."""
        if self.thread is not None:
            self.thread.join(timeout)
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return self

    def stop(self, wait: bool = True) -> Run:
        """Stop training at the next optimizer-step boundary, with a checkpoint."""
        self._live().stop()
        return self.wait() if wait else self

    def checkpoint(self, tags: list[str] = (), timeout: float | None = None) -> StepInfo:
        """Checkpoint now: at the next step boundary while training in the background,
        immediately when idle (the live trainer is at a boundary)."""
        trainer = self._live()
        future = trainer.request_checkpoint(tags) if self.training else None
        if future is not None:
            return future.result(timeout)
        if self.thread is not None:
            self.thread.join()  # training just ended: let it release the writer lock
        self.open_writer()
        try:
            return trainer.checkpoint(["requested"], tags=tags)
        finally:
            self.close_writer()

    def _live(self) -> Any:
        if self.trainer is None:
            raise StoreError(f"run {self.name!r} is not loaded in this process; resume it first")
        return self.trainer

    # ---- full state ----
    def load(
        self,
        step: int | None = None,
        *,
        verify: bool | str = True,
        groups: tuple[str, ...] = STATE_GROUPS,
    ) -> dict[str, Any]:
        """The full state of a checkpoint (newest readable one when `step` is None).

        `verify=True`: every checksum and finiteness check is made before `load` returns.
        `verify="lazy"`: the same checks, each tensor's when it is first taken out of the state
        (`store.lazy`: groups with tensors are read-only `LazyDict`s; a corrupt tensor raises
        CorruptCheckpoint at that access). `verify=False`: no checksums (structure and
        finiteness are still checked). With `step=None` a corrupt checkpoint is skipped with a
        warning naming its file, and the next older one is tried (lazily: only for what the
        load itself checks).
        """
        if step is not None:
            return self._load_file(self.step_info(step), verify, groups)
        return self.load_newest(verify=verify, groups=groups)[0]

    def load_newest(
        self, *, verify: bool | str = True, groups: tuple[str, ...] = STATE_GROUPS
    ) -> tuple[dict[str, Any], list[int]]:
        """(state of the newest intact checkpoint, the newer steps skipped as corrupt)."""
        skipped: list[int] = []
        for info in reversed(self.steps()):
            try:
                return self._load_file(info, verify, groups), skipped
            except CorruptCheckpoint as err:
                warnings.warn(f"{err}; trying an older checkpoint", stacklevel=3)
                skipped.append(info.step)
        raise StoreError(f"run {self.name!r} has no readable checkpoint")

    def checkpoint_path(self, info: StepInfo) -> Path:
        """The checked path of a listed checkpoint: inside the store, a regular file reached
        through real folders. Raises CorruptCheckpoint otherwise (missing file included)."""
        expected = checkpoint_file(self.name, info.step, info.run)
        if info.file != expected:
            raise CorruptCheckpoint(
                f"index {self.run_file} lists step {info.step} at {info.file!r}, "
                f"not at {expected!r}; refused"
            )
        try:
            return confine.store_file(
                self.store.path, info.run, CKPT_DIR, f"{step_name(info.step)}.h5", what="checkpoint"
            )
        except StoreError as err:
            raise CorruptCheckpoint(str(err)) from None

    def _load_file(
        self, info: StepInfo, verify: bool | str, groups: tuple[str, ...] = STATE_GROUPS
    ) -> dict[str, Any]:
        path = self.checkpoint_path(info)
        config = self._owner_config(info)
        try:
            state, summary = read_checkpoint(
                path,
                config,
                groups,
                verify=verify,
                expect_step=info.step,
                expect_checksum=info.checksum,
                virtual_source=lambda name: shard_source(
                    self.store.path, path.parent, name, info.step
                ),
            )
            if summary.get("run") != info.run:
                raise ValueError(f"it was written by run {summary.get('run')!r}, not {info.run!r}")
        except StoreError as err:
            raise CorruptCheckpoint(f"checkpoint {path}: {err}") from None
        except FileNotFoundError:  # deleted since it was listed (retention in another process)
            raise CorruptCheckpoint(f"checkpoint {path} does not exist") from None
        except PARSE_ERRORS as err:
            raise CorruptCheckpoint(
                f"checkpoint {path} is unreadable or corrupt ({reason(err)})"
            ) from None
        return state

    def mapped(self, step: int, group: str = "model") -> dict[str, Any] | None:
        """Zero-copy, read-only views of `group`'s arrays of checkpoint `step` (checked like a
        load; `mmnb.store.mapped`), or None when the file's layout does not allow it."""
        from .mapped import mapped_group

        info = self.step_info(step)
        path = self.checkpoint_path(info)
        return mapped_group(
            path,
            group,
            self._owner_config(info),
            expect_step=info.step,
            expect_checksum=info.checksum,
        )

    def _owner_config(self, info: StepInfo) -> dict[str, Any]:
        # What a checkpoint may hold is decided by the config of the run that wrote it (a
        # branch may add LoRA adapters or another objective to its parent's model).
        if info.run == self.name:
            return self.config_dict()
        return self.store.run(info.run).config_dict()

    def verify(self, step: int) -> None:
        """Raise CorruptCheckpoint unless every byte of `step` matches its checksums."""
        self._load_file(self.step_info(step), verify=True)

    # ---- writing ----
    def open_writer(self) -> None:
        """Take the run's writer lock (non-blocking) and recover an interrupted commit."""
        if self._lock_fd is not None:
            return
        confine.store_file(self.store.path, self.name, RUN_FILE, what="run file")
        confine.real_dir(self.path / CKPT_DIR, "checkpoint folder")
        self._lock_fd = lock_run_folder(self.path, self.name)
        try:
            self._reconcile()
        except BaseException:
            self.close_writer()
            raise

    def close_writer(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
            self._index = None

    def _reconcile(self) -> None:
        """Make the index agree with the committed files (a crash may sit between the two);
        remove what interrupted writers left (temporary files)."""
        on_disk = self._read()[1]
        index = [s for s in on_disk if self._present(s)]
        known = {s.step for s in index}
        for folder in (self.path, self.path / CKPT_DIR):
            for entry in sorted(folder.iterdir()):
                if _is_tmp(entry.name):  # a commit that never finished; we hold the lock
                    remove_path(entry)
        ckpt = self.path / CKPT_DIR
        for entry in sorted(ckpt.iterdir()):
            shard = SHARD_FILE.match(entry.name)
            if shard is not None and not os.path.lexists(ckpt / f"{shard.group(1)}.h5"):
                remove_path(entry)  # a shard of a sharded commit that never finished
        for entry in sorted(ckpt.iterdir()):
            match = _ckpt_step(entry.name)
            if match is None or match in known:
                continue
            try:
                info = _unlisted_checkpoint(entry, match, self.name)
            except (StoreError, *PARSE_ERRORS) as err:
                warnings.warn(
                    f"checkpoint {entry} is unreadable ({reason(err)}); ignoring it", stacklevel=3
                )
                continue
            index.append(dataclasses.replace(info, bytes=entry.stat().st_size))
        index.sort(key=lambda s: s.step)
        self._index = index
        if index != on_disk:
            # Only a repair rewrites the index: opening a run (e.g. a resume that then fails
            # on user input) must leave it untouched, or it would become the store's newest.
            self._write_run_file()

    def _present(self, info: StepInfo) -> bool:
        try:
            self.checkpoint_path(info)
            return True
        except CorruptCheckpoint as err:
            warnings.warn(f"{err}; removed from the index", stacklevel=4)
            return False

    def commit(
        self,
        state: dict[str, Any],
        reasons: list[str],
        tags: list[str] = (),
        notify: Callable[[str], None] | None = None,
        *,
        shards: Callable[[Any, dict[str, Any]], int] | None = None,
    ) -> StepInfo:
        """Write `state` as the checkpoint of its step; return its StepInfo.

        A step that is already committed is never rewritten while its file is intact (a
        deterministic resume from an older step recomputes the same state): its reasons are
        merged into the index instead. A corrupt one is moved aside (`<step>.h5.corrupt`) and
        replaced (`notify` is told; by default a warning). A failing disk raises
        StoreWriteError and leaves the store as it was. `shards(file, manifest)` (a sharded
        checkpoint, `store.sharded`) adds the virtual datasets over the rank files, already on
        disk, to the file and its manifest, and returns the shards' bytes.
        """
        if self._lock_fd is None:
            raise StoreError(f"run {self.name!r} is not open for writing")
        step = int(state["trainer"]["step"])
        index = self._index or []
        old = next((info for info in index if info.step == step), None)
        reasons = [r for r in reasons if r != "repair"]  # a repair keeps the file's own reasons
        if old is not None:
            merged_reasons = sorted(set(old.reasons) | set(reasons))
            merged_tags = sorted(set(old.tags) | set(tags))
            if old.run != self.name or self._intact(old):
                old.reasons, old.tags = merged_reasons, merged_tags
                self._write_index(f"the index of step {step}")
                return old
            schema.check_finite(state, step)  # before anything is moved aside
            if step not in self._moved_aside:  # (a sharded commit moved it before its shards)
                self._quarantine(old, notify)
            self._moved_aside.discard(step)
            index.remove(old)
            reasons, tags = merged_reasons, merged_tags
        metrics = state["metrics"]
        info = StepInfo(
            step=step,
            file=checkpoint_file(self.name, step, self.name),
            run=self.name,
            reasons=list(reasons),
            tags=list(tags),
            epoch=int(state["trainer"]["epoch"]),
            position=int(state["data"]["position"]),
            tokens=int(state["trainer"]["tokens"]),
            loss=_finite_or_none(metrics["loss"]),
            lr=_finite_or_none(metrics["lr"]),
            elapsed=float(state["trainer"]["elapsed"]),
            created=time.time(),
        )
        final = self.path / info.file
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        summary = dataclasses.asdict(info)
        del summary["checksum"]  # the file's own checksum cannot be inside it
        shard_bytes: list[int] = []
        extra = None if shards is None else (lambda f, m: shard_bytes.append(shards(f, m)))
        try:
            # No non-finite weight or moment is ever committed: checked while the bytes go out.
            check = lambda: schema.check_finite(state, step)  # noqa: E731
            info.checksum = write_checkpoint(tmp, state, summary, extra=extra, check=check)
            info.bytes = tmp.stat().st_size + sum(shard_bytes)
            os.replace(tmp, final)
            fsync(final.parent)
        except OSError as err:
            discard(tmp)
            raise self._write_error(err, f"step {step} to {final}", index) from None
        except BaseException:
            discard(tmp)
            raise
        index.append(info)
        index.sort(key=lambda s: s.step)
        self._index = index
        self._write_index(f"the index after step {step}")
        return info

    def settled(self, step: int, notify: Callable[[str], None] | None = None) -> bool:
        """Before the shards of `step` are written (`store.sharded.commit_sharded`): True when
        it is committed and intact, so only its reasons are merged; a committed but corrupt one
        is moved aside now, with its shards, so the new shards do not replace its files."""
        old = next((info for info in self._index or [] if info.step == step), None)
        if old is None:
            return False
        if old.run != self.name or self._intact(old):
            return True
        self._quarantine(old, notify)
        self._moved_aside.add(step)
        return False

    def _intact(self, info: StepInfo) -> bool:
        try:
            self._load_file(info, verify=True)
            return True
        except CorruptCheckpoint:
            return False

    def _quarantine(self, info: StepInfo, notify: Callable[[str], None] | None) -> None:
        """Move a corrupt committed file aside (kept for inspection; `mmnb gc` removes it)."""
        path = self.path / info.file
        try:
            for old in [path, *shard_files(path.parent, info.step)]:
                if os.path.lexists(old):
                    os.replace(old, old.with_name(old.name + ".corrupt"))
            fsync(path.parent)
        except OSError as err:
            raise self._write_error(err, f"step {info.step} to {path}", self._index or []) from None
        text = f"checkpoint {path} was corrupt; moved to {path.name}.corrupt and rewritten"
        (notify or (lambda t: warnings.warn(t, stacklevel=5)))(text)

    def _write_error(self, err: OSError, what: str, index: list[StepInfo]) -> StoreWriteError:
        newest = max((s.step for s in index), default=None)
        tail = (
            "there is no checkpoint yet"
            if newest is None
            else f"the newest checkpoint is step {newest}"
        )
        return StoreWriteError(f"{describe_os_error(err)} while writing {what}; {tail}", err.errno)

    def _write_index(self, what: str) -> None:
        try:
            self._write_run_file()
        except OSError as err:
            raise self._write_error(err, f"{what} to {self.run_file}", self._index or []) from None

    def update_attrs(self, **values: Any) -> None:
        """Replace run-level metadata (config after an extension, history)."""
        self._write_index_with(values)

    def _write_index_with(self, updates: dict[str, Any]) -> None:
        try:
            self._write_run_file(updates)
        except OSError as err:
            raise self._write_error(err, f"{self.run_file}", self._index or []) from None

    def delete(self, step: int) -> None:
        """Remove one checkpoint of this run: first from the index, then its file. Refused if
        another run (at any depth) lists it or branched from it."""
        if self._lock_fd is None:
            raise StoreError(f"run {self.name!r} is not open for writing")
        info = self.step_info(step)
        if info.inherited:
            raise StoreError(f"step {step} belongs to run {info.run!r}, not to {self.name!r}")
        with self.store.locked():
            users = self.store.references(exclude=self.name).get((self.name, step))
            if users:
                raise StoreError(
                    f"step {step} of run {self.name!r} is in the history of run "
                    f"{', '.join(sorted(set(users)))}; not deleted"
                )
            self._delete([step])

    def prune(
        self,
        keep_last: int,
        keep_every: int,
        protect: set[int],
        notify: Callable[[str], None] | None = None,
    ) -> list[int]:
        """Retention: keep the newest `keep_last` own checkpoints and every `keep_every`-th step.

        Never deletes the newest checkpoint, a step in `protect`, or a checkpoint that any other
        run of the store lists in its history or branched from (at any depth). Runs under the
        store lock, so a branch made meanwhile is either seen here or sees the deletion. If a
        run of the store cannot be read, nothing is deleted (`notify` is told why).
        """
        if not keep_last and not keep_every:
            return []
        own = [s.step for s in self.steps() if not s.inherited]
        keep = set(own[-max(keep_last, 1) :]) | protect
        if keep_every:
            keep |= {s for s in own if s % keep_every == 0}
        doomed = [s for s in own if s not in keep]
        if not doomed:
            return []
        with self.store.locked():
            try:
                refs = self.store.references(exclude=self.name)
            except StoreError as err:
                text = f"retention skipped: {err} (its history cannot be protected)"
                (notify or (lambda t: warnings.warn(t, stacklevel=4)))(text)
                return []
            doomed = [s for s in doomed if (self.name, s) not in refs]
            self._delete(doomed)
        return doomed

    def _delete(self, steps: list[int]) -> None:
        """Drop `steps` (own checkpoints) from the index, then remove their files."""
        if not steps:
            return
        gone = set(steps)
        paths = [(s.step, self.path / s.file) for s in self.steps() if s.step in gone]
        self._index = [s for s in (self._index or []) if s.step not in gone]
        self._write_index(f"the index without step {', '.join(map(str, steps))}")
        for step, path in paths:
            path.unlink(missing_ok=True)
            for shard in shard_files(path.parent, step):  # a sharded checkpoint's rank files
                shard.unlink(missing_ok=True)

    def discard(self) -> None:
        """Remove this run entirely: only while its writer holds it and nothing was committed
        (a run whose first checkpoint failed), so that its name can be used again."""
        if self._lock_fd is None or any(not s.inherited for s in self.steps()):
            self.close_writer()
            return
        folder = self.path
        self.close_writer()
        remove_path(folder)

    def _write_run_file(self, updates: dict[str, Any] | None = None) -> None:
        meta = dict(self._meta())
        meta.update(updates or {})
        write_run_file(self.path, meta, self._index or [])
        self._cache = None


def _ckpt_step(name: str) -> int | None:
    """The step of a committed checkpoint's file name ('00000120.h5' → 120), else None."""
    if len(name) == 11 and name.endswith(".h5") and name[:8].isdigit():
        return int(name[:8])
    return None


def _unlisted_checkpoint(path: Path, step: int, run: str) -> StepInfo:
    """What a checkpoint file no index lists says it is, if it is step `step` of `run`;
    raises (StoreError or a PARSE_ERROR) for anything else."""
    confine.regular_file(path, "checkpoint")
    info = step_info(read_summary(path))
    if info.step != step or info.run != run:
        raise ValueError(f"it holds step {info.step} of run {info.run!r}")
    return info


def _finite_or_none(values: np.ndarray) -> float | None:
    if not len(values):
        return None
    value = float(values[-1])
    return value if np.isfinite(value) else None
