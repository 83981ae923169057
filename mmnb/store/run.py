"""One run in a store: its index file, its immutable checkpoint files, its writer lock.

Layout of `<store>/<run>/` (docs/store-format.md has the whole story):

    run.h5              index, replaced atomically on every commit: root attributes (format
                        version, config, parent, tokenizer), /steps/<step> external links to
                        the checkpoint files, /index (JSON summary of every step)
    ckpt/00000120.h5    one file per committed checkpoint; written under a temporary name,
                        fsynced, renamed; never opened for writing again
    LOCK                flock()ed by the one writer

The checkpoint files are the truth: a commit that died between the rename and the index
replacement is recovered by the next writer (`_reconcile`).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import re
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from . import confine
from .errors import CorruptCheckpoint, StoreError, StoreWriteError, describe_os_error
from .h5state import ChecksumError, read_tree, write_tree

if TYPE_CHECKING:
    from .store import Store

FORMAT_VERSION = 1
RUN_FILE = "run.h5"
CKPT_DIR = "ckpt"
_CKPT_NAME = re.compile(r"^(\d{8})\.h5$")
# "frozen": references to frozen weights a LoRA or DPO stage uses (mmnb.frozen), never copies.
STATE_GROUPS = (
    "model", "optim", "schedule", "scaler", "rng", "data", "trainer", "metrics", "frozen",
)  # fmt: skip


@dataclass
class StepInfo:
    """Metadata of one committed checkpoint; listing a run reads only these."""

    step: int
    file: str  # path of the checkpoint file, relative to this run's folder
    run: str  # the run that wrote it (a branch inherits its parent's early steps)
    reasons: list[str]
    epoch: int = 0
    position: int = 0
    tokens: int = 0
    loss: float | None = None
    lr: float | None = None
    elapsed: float = 0.0
    bytes: int = 0
    created: float = 0.0
    tags: list[str] = dataclasses.field(default_factory=list)

    @property
    def inherited(self) -> bool:
        return self.file.startswith("..")


def step_name(step: int) -> str:
    return f"{step:08d}"  # zero-padded so names sort numerically


def checkpoint_file(run: str, step: int, owner: str) -> str:
    """The index's `file` of `step` written by run `owner`, relative to run `run`'s folder.

    The only places a checkpoint can be: this run's `ckpt/` or another run's in the same store.
    """
    name = f"{CKPT_DIR}/{step_name(step)}.h5"
    return name if owner == run else f"../{owner}/{name}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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
    def _attrs(self) -> dict[str, Any]:
        try:
            with h5py.File(self.run_file, "r", locking=False) as f:
                return {k: f.attrs[k] for k in f.attrs if k != "index"}
        except OSError as err:
            raise StoreError(f"cannot read {self.run_file}: {err}") from None

    def config_dict(self) -> dict[str, Any]:
        return json.loads(self._attrs()["config"])

    @property
    def parent(self) -> tuple[str, int] | None:
        p = json.loads(self._attrs().get("parent", "null"))
        return (p["run"], int(p["step"])) if p else None

    def info(self) -> dict[str, Any]:
        """Run-level attributes decoded: config, parent, stage, history, lineage, created."""
        attrs = self._attrs()
        keys = ("config", "parent", "stage", "history", "lineage")
        return {k: json.loads(attrs[k]) for k in keys if k in attrs} | {
            "created": float(attrs.get("created", 0.0))
        }

    def tokenizer_json(self) -> str:
        return str(self._attrs()["tokenizer"])

    def steps(self) -> list[StepInfo]:
        """Committed checkpoints, oldest first, including a branch's inherited ones."""
        if self._index is not None:
            return list(self._index)
        try:
            with h5py.File(self.run_file, "r", locking=False) as f:
                entries = json.loads(f.attrs["index"])
        except (OSError, KeyError) as err:
            raise StoreError(f"cannot read the index of {self.run_file}: {err}") from None
        return [StepInfo(**e) for e in entries]

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
        verify: bool = True,
        groups: tuple[str, ...] = STATE_GROUPS,
    ) -> dict[str, Any]:
        """The full state of a checkpoint (newest readable one when `step` is None).

        Checksums are verified. With `step=None` a corrupt checkpoint is skipped with a
        warning naming its file, and the next older one is tried.
        """
        if step is not None:
            return self._load_file(self.step_info(step), verify, groups)
        for info in reversed(self.steps()):
            try:
                return self._load_file(info, verify, groups)
            except CorruptCheckpoint as err:
                warnings.warn(f"{err}; trying an older checkpoint", stacklevel=2)
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
                self.store.path,
                info.run,
                CKPT_DIR,
                f"{step_name(info.step)}.h5",
                what="checkpoint",
            )
        except StoreError as err:
            raise CorruptCheckpoint(str(err)) from None

    def _load_file(
        self, info: StepInfo, verify: bool, groups: tuple[str, ...] = STATE_GROUPS
    ) -> dict[str, Any]:
        path = self.checkpoint_path(info)
        try:
            with h5py.File(path, "r", locking=False) as f:
                state = {k: read_tree(f[k], verify=verify) for k in groups if k in f}
        except (OSError, KeyError, ChecksumError, ValueError) as err:
            raise CorruptCheckpoint(f"checkpoint {path} is unreadable or corrupt ({err})") from None
        return state

    def verify(self, step: int) -> None:
        """Raise CorruptCheckpoint unless every array of `step` matches its checksum."""
        self._load_file(self.step_info(step), verify=True)

    # ---- writing ----
    def open_writer(self) -> None:
        """Take the run's writer lock (non-blocking) and recover an interrupted commit."""
        if self._lock_fd is not None:
            return
        confine.store_file(self.store.path, self.name, RUN_FILE, what="run file")
        fd = confine.open_lock(self.path / "LOCK", create=True)
        assert fd is not None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StoreError(
                    f"run {self.name!r} is being written by another trainer "
                    f"({holder or 'unknown'}); stop it first"
                ) from None
            raise StoreError(f"cannot lock {self.path / 'LOCK'}: {err}") from None
        try:  # only the holder of the lock rewrites its content
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        except OSError as err:
            os.close(fd)
            raise StoreWriteError(
                f"cannot write {self.path / 'LOCK'}: {describe_os_error(err)}", err.errno
            ) from None
        self._lock_fd = fd
        self._reconcile()

    def close_writer(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
            self._index = None

    def _reconcile(self) -> None:
        """Make the index agree with the committed files (a crash may sit between the two)."""
        on_disk = self.steps()
        index = [s for s in on_disk if self._present(s)]
        known = {s.file for s in index}
        ckpt = self.path / CKPT_DIR
        for entry in sorted(ckpt.iterdir()):
            if entry.name.startswith("."):  # a temporary file of a commit that never finished
                entry.unlink()
            elif _CKPT_NAME.match(entry.name) and f"{CKPT_DIR}/{entry.name}" not in known:
                try:
                    with h5py.File(entry, "r", locking=False) as f:
                        index.append(StepInfo(**json.loads(f.attrs["summary"])))
                except (OSError, KeyError) as err:
                    warnings.warn(
                        f"checkpoint {entry} is unreadable ({err}); ignoring it", stacklevel=2
                    )
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
            warnings.warn(f"{err}; removed from the index", stacklevel=3)
            return False

    def commit(self, state: dict[str, Any], reasons: list[str], tags: list[str] = ()) -> StepInfo:
        """Write `state` as the checkpoint of its step; return its StepInfo.

        A step that is already committed is never rewritten (a deterministic resume from an
        older step recomputes the same state): its reasons are merged into the index instead.
        """
        if self._lock_fd is None:
            raise StoreError(f"run {self.name!r} is not open for writing")
        step = int(state["trainer"]["step"])
        index = self._index or []
        for info in index:
            if info.step == step:
                info.reasons = sorted(set(info.reasons) | set(reasons))
                info.tags = sorted(set(info.tags) | set(tags))
                self._write_run_file()
                return info
        metrics = state["metrics"]
        info = StepInfo(
            step=step,
            file=f"{CKPT_DIR}/{step_name(step)}.h5",
            run=self.name,
            reasons=list(reasons),
            tags=list(tags),
            epoch=int(state["trainer"]["epoch"]),
            position=int(state["data"]["position"]),
            tokens=int(state["trainer"]["tokens"]),
            loss=float(metrics["loss"][-1]) if len(metrics["loss"]) else None,
            lr=float(metrics["lr"][-1]) if len(metrics["lr"]) else None,
            elapsed=float(state["trainer"]["elapsed"]),
            created=time.time(),
        )
        final = self.path / info.file
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        try:
            with h5py.File(tmp, "w", libver="latest", locking=False) as f:
                written: dict = {}  # shared storage is written once, across groups
                for key in STATE_GROUPS:
                    if key in state:
                        write_tree(f.create_group(key), state[key], written)
                f.attrs["format_version"] = FORMAT_VERSION
                f.attrs["summary"] = json.dumps(dataclasses.asdict(info))
            _fsync_file(tmp)
            info.bytes = tmp.stat().st_size
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        index.append(info)
        index.sort(key=lambda s: s.step)
        self._index = index
        self._write_run_file()
        return info

    def update_attrs(self, **values: Any) -> None:
        """Replace run-level JSON attributes (config after an extension, history)."""
        self._write_run_file(updates={k: json.dumps(v) for k, v in values.items()})

    def delete(self, step: int) -> None:
        """Remove one checkpoint: first from the index, then its file."""
        if self._lock_fd is None:
            raise StoreError(f"run {self.name!r} is not open for writing")
        info = self.step_info(step)
        if info.inherited:
            raise StoreError(f"step {step} belongs to run {info.run!r}, not to {self.name!r}")
        if step in self.store.branch_points(self.name):
            raise StoreError(f"step {step} of run {self.name!r} is a branch point; not deleted")
        path = self.checkpoint_path(info)
        self._index = [s for s in (self._index or []) if s.step != step]
        self._write_run_file()
        path.unlink(missing_ok=True)

    def prune(self, keep_last: int, keep_every: int, protect: set[int]) -> list[int]:
        """Retention: keep the newest `keep_last` own checkpoints and every `keep_every`-th step.

        Never deletes the newest checkpoint, a branch point or a step in `protect`.
        """
        if not keep_last and not keep_every:
            return []
        own = [s.step for s in self.steps() if not s.inherited]
        keep = set(own[-max(keep_last, 1) :]) | protect | self.store.branch_points(self.name)
        if keep_every:
            keep |= {s for s in own if s % keep_every == 0}
        doomed = [s for s in own if s not in keep]
        for step in doomed:
            self.delete(step)
        return doomed

    def _write_run_file(self, updates: dict[str, str] | None = None) -> None:
        attrs = self._attrs()
        attrs.update(updates or {})
        write_run_file(self.path, attrs, self._index or [])


def write_run_file(folder: Path, attrs: dict[str, Any], index: list[StepInfo]) -> None:
    """Write `<folder>/run.h5` atomically: temp file, fsync, rename, fsync the folder."""
    final = folder / RUN_FILE
    tmp = folder / f".{RUN_FILE}.{os.getpid()}.tmp"
    try:
        # libver="latest" allows attributes over 64 KiB (a tokenizer.json is larger).
        with h5py.File(tmp, "w", libver="latest", locking=False) as f:
            for key, value in attrs.items():
                f.attrs[key] = value
            steps = f.create_group("steps")
            for info in index:
                steps[step_name(info.step)] = h5py.ExternalLink(info.file, "/")
            f.attrs["index"] = json.dumps([dataclasses.asdict(s) for s in index])
        _fsync_file(tmp)
        os.replace(tmp, final)
        _fsync_dir(folder)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
