"""`mmnb worker`: runs a store's queued jobs as child processes, restarts what crashes.

One worker per store: it holds `<store>/worker.lock` (`flock`, released by the kernel however the
worker ends, SIGKILL included); a second one refuses with one line naming the first.

Each job runs as `python -m mmnb VERB ARGS` through `mmnb.launch` in its own session, with its
output in `<store>/.jobs/<id>/attempt-<n>/`. Because jobs live in their own sessions and write to
files, a worker killed with SIGKILL loses nothing: its jobs keep training, and the next worker
finds them from the process records in the queue (verified against /proc) and adopts them —
their exit status comes from the `exit.json` they write. A job that died meanwhile is restarted
from its run's newest checkpoint like any crash.

How an attempt ends decides what follows (`_outcome`):
- exit 0: done, unless it stopped because someone asked (a Stop, `queue cancel`): cancelled;
- exit 2 (a user mistake: bad flag, missing file) or an anomaly stop: failed, no restart —
  running it again would fail again;
- anything else (a crash, OOM, a signal, a status nobody saw) and a stalled job (no progress in
  its event stream for `stall_timeout` seconds — a new step, a checkpoint; the heartbeat of a
  stuck loop repeats its step and does not count — killed with SIGKILL, even if SIGSTOPped;
  until its first record, output to its logs — data preparation's progress bar — counts, and it
  gets `STARTUP_GRACE` at least) is
  restarted from the newest checkpoint after `restart_delay * 2**k` seconds (capped at 5 min),
  up to `max_restarts` times; each restart is announced in the run's event stream (a `recover`
  event and a notice) through `$MMNB_RECOVERY`.
SIGINT or SIGTERM to the worker stops it cleanly: its jobs are asked to stop at their next step
(checkpointed) and are queued again, so the next worker resumes them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import launch
from ..events import EventFollower, progress
from . import commands, control
from .queue import Queue, QueuedJob, QueueError, ensure_private, jobs_folder

LOCK = "worker.lock"
MAX_BACKOFF = 300.0
STARTUP_GRACE = 120.0  # seconds an attempt may take to write its first record (imports, data)
CANCEL_GRACE = 60.0  # seconds a job gets to stop by itself before it is killed


class WorkerBusy(QueueError):
    """Another worker holds the store's lock."""


def running_worker(store: Any) -> launch.ProcessRecord | None:
    """The worker that holds `store`'s lock, if one runs."""
    path = Path(getattr(store, "path", store)) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except OSError:
            pass
        try:
            return launch.ProcessRecord.from_dict(json.loads(os.read(fd, 4096) or b"{}"))
        except ValueError:
            return launch.ProcessRecord(pid=0, pgid=0, ticks=None, boot="")
    finally:
        os.close(fd)


def stop_worker(store: Any, timeout: float = 90.0) -> bool:
    """Stop the worker of `store` the clean way (SIGTERM: its jobs stop at their next step,
    checkpointed, and are queued again); False if none runs."""
    record = running_worker(store)
    if record is None or not record.pid:
        return False
    job = launch.Job(record)
    if not job.signal(signal.SIGTERM, group=False):
        return False
    if job.wait(timeout) is None:
        job.kill()
    return True


def start_detached(store: Any, idle_exit: float = 60.0, slots: int = 1) -> launch.Job:
    """Start `mmnb worker` for `store` in its own session (what `%queue` does when none runs);
    it exits after `idle_exit` seconds with nothing to do."""
    folder = jobs_folder(store)
    ensure_private(folder)
    args = ["worker", "--store", str(Path(getattr(store, "path", store)).resolve())]
    args += ["--slots", str(slots), "--exit-when-idle", f"{idle_exit:g}"]
    return launch.start(args, logs=folder / "worker")


@dataclass
class _Active:
    """A job this worker watches: its process, its stream, its progress clock."""

    job: QueuedJob
    process: launch.Job
    attempt: int
    follower: EventFollower | None = None
    last_progress: float = field(default_factory=time.monotonic)
    step: int = -1
    stop_reason: str | None = None
    cancel_sent: float | None = None
    stalled: bool = False
    opened: bool = False  # the attempt's process has written to its stream
    output: int = 0  # bytes of its stdout and stderr logs: growth before `opened` is progress


class Worker:
    """Runs the queue of `store` until stopped (or idle for `idle_exit` seconds)."""

    def __init__(
        self,
        store: Any,
        *,
        slots: int = 1,
        poll: float = 0.2,
        idle_exit: float | None = None,
        log: Any = None,
    ) -> None:
        if slots < 1:
            raise QueueError(f"--slots must be positive, got {slots}")
        self.store_path = Path(getattr(store, "path", store)).resolve()
        self.queue = Queue(self.store_path)
        self.slots, self.poll, self.idle_exit = slots, poll, idle_exit
        self.log = log or (lambda text: None)  # the CLI prints; the library never does
        self.active: dict[int, _Active] = {}
        self._stopping = False
        self._lock_fd: int | None = None

    # ---- the lock ----
    def acquire(self) -> None:
        ensure_private(jobs_folder(self.store_path))
        path = self.store_path / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            other = running_worker(self.store_path)
            who = f" (pid {other.pid})" if other and other.pid else ""
            raise WorkerBusy(
                f"a worker already runs on store {self.store_path}{who}; one worker per store"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(launch.ProcessRecord.of(os.getpid()).to_dict()).encode())
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the last descriptor releases the flock
            self._lock_fd = None

    # ---- the loop ----
    def stop(self, *_: Any) -> None:
        """Stop taking jobs; running ones are stopped at their next step and queued again."""
        self._stopping = True

    def run(self) -> None:
        self.acquire()
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self.stop)
        try:
            self.log(f"worker {os.getpid()} on {self.store_path} ({self.slots} slot(s))")
            self._adopt()
            idle_since = time.monotonic()
            while not self._stopping:
                self.step()
                if self.active or self.queue.runnable():
                    idle_since = time.monotonic()
                elif self.idle_exit is not None and time.monotonic() - idle_since > self.idle_exit:
                    self.log("idle: exiting")
                    break
                time.sleep(self.poll)
            if self._stopping:
                self._shutdown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.queue.close()
            self.release()

    def step(self) -> None:
        """One round: watch running jobs, then start queued ones into free slots."""
        for active in list(self.active.values()):
            self._watch(active)
        used = sum(min(a.job.nproc, self.slots) for a in self.active.values())
        for job in self.queue.runnable():
            need = min(job.nproc, self.slots)
            if used + need > self.slots:
                break  # queue order: a big job is not overtaken by smaller ones behind it
            self._start(job)
            used += need

    # ---- starting and adopting ----
    def _start(self, job: QueuedJob) -> None:
        try:
            verb, tokens = commands.split([job.command.verb, *job.command.argv])
            commands.parser_for(verb).parse_args(tokens)  # the store's queue is not trusted
        except ValueError as err:
            self.queue.end_attempt(job.id, state="failed", exit_code=None, outcome=f"{err}")
            return
        run_exists = job.run is not None and (self.store_path / job.run / "run.h5").is_file()
        argv = job.command.retry_argv(run_exists) if job.attempts else [verb, *tokens]
        attempt = self.queue.next_attempt(job.id)
        logs = self.queue.logs(job.id, attempt)
        ensure_private(logs.parent)
        recovery = None
        if job.attempts:
            text = f"job {job.id} restarted (attempt {attempt}): {job.note or 'it ended early'}"
            recovery = json.dumps({"action": "restart", "attempt": attempt, "text": text})
        cwd = job.command.cwd if job.command.cwd and os.path.isdir(job.command.cwd) else None
        process = launch.start(
            argv, logs=logs, env=commands.job_env(job.id, recovery), cwd=cwd or self.store_path
        )
        self.queue.start_attempt(job.id, argv, process.record.to_dict())
        self.log(f"job {job.id} attempt {attempt}: pid {process.pid}: mmnb {' '.join(argv)}")
        self.active[job.id] = _Active(self.queue.get(job.id), process, attempt)

    def _adopt(self) -> None:
        """Jobs a previous worker left running: watch the live ones, settle the dead ones."""
        for job in self.queue.jobs(["running"]):
            try:
                process = launch.Job.of(job.process or {})
            except ValueError:
                process = launch.Job(launch.ProcessRecord(pid=0, pgid=0, ticks=None, boot=""))
            logs = self.queue.logs(job.id, job.attempts)
            # The record's log folder is not trusted: exit.json is read from the job's own.
            process.record = launch.ProcessRecord(**{**process.record.to_dict(), "logs": str(logs)})
            active = _Active(job, process, job.attempts)
            self.active[job.id] = active
            state = "running" if process.alive() else "gone"
            self.log(f"job {job.id}: adopted from a previous worker (process {state})")

    # ---- watching ----
    def _watch(self, active: _Active) -> None:
        job = active.job
        self._follow(active)
        if not active.opened:
            # Before its first stream record (imports, tokenizing a big dataset, whose progress
            # bar goes to stderr) a job shows it is alive by writing to its logs.
            size = sum(_size(active.process.logs, name) for name in (launch.STDOUT, launch.STDERR))
            if size > active.output:
                active.output, active.last_progress = size, time.monotonic()
        code = active.process.poll()
        if code is None:
            fresh = self.queue.get(job.id)
            if fresh.cancel_requested and active.cancel_sent is None:
                active.cancel_sent = time.monotonic()
                self._ask_stop(job)
            elif active.cancel_sent and time.monotonic() - active.cancel_sent > CANCEL_GRACE:
                active.process.kill()
            elif job.stall_timeout and time.monotonic() - active.last_progress > (
                job.stall_timeout if active.opened else max(job.stall_timeout, STARTUP_GRACE)
            ):
                active.stalled = True
                self.log(f"job {job.id}: no progress for {job.stall_timeout:g}s: killing it")
                active.process.kill()
            return
        for record in active.process.members():  # ranks left behind by a dead agent
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record.pgid, signal.SIGKILL)
        self._follow(active)  # the last records
        del self.active[job.id]
        self._settle(active, code)

    def _follow(self, active: _Active) -> None:
        job = active.job
        if job.run is None:
            return
        if active.follower is None:
            if not (self.store_path / job.run).is_dir():
                return
            active.follower = EventFollower(self.store_path / job.run, from_start=False)
        for event in active.follower.poll():
            if event.info.get("job") not in (None, str(job.id)) and event.kind == "open":
                continue
            active.opened = True
            progressed = event.kind in ("open", "start", "checkpoint", "recover")
            if event.kind in ("step", "heartbeat") and event.step > active.step:
                progressed = True
            active.step = max(active.step, event.step)
            if progressed:
                active.last_progress = time.monotonic()
            if event.kind == "stop":
                active.stop_reason = str(event.info.get("reason"))

    def _ask_stop(self, job: QueuedJob) -> None:
        if job.run is not None and (self.store_path / job.run).is_dir():
            with contextlib.suppress(OSError, ValueError):
                control.send(self.store_path / job.run, "stop")

    # ---- how an attempt ended ----
    def _settle(self, active: _Active, code: int) -> None:
        job = self.queue.get(active.job.id)
        tail = launch.tail_lines(self.queue.logs(job.id, active.attempt) / launch.STDERR, 20)
        final = None
        if job.run is not None:
            p = progress(self.store_path / job.run)
            if p is not None:
                final = {"step": p.step, "total": p.total, "loss": p.loss}
        state, outcome, restart = self._outcome(job, active, code, tail)
        not_before = 0.0
        if restart:
            delay = min(job.restart_delay * 2**job.restarts, MAX_BACKOFF)
            not_before = time.time() + delay
            outcome += f"; restart {job.restarts + 1} of {job.max_restarts} in {delay:g}s"
        self.queue.end_attempt(
            job.id,
            state=state,
            exit_code=None if code == launch.EXIT_LOST else code,
            outcome=outcome,
            stderr_tail=tail,
            final=final,
            not_before=not_before,
            restart=restart,
        )
        self.log(f"job {job.id}: {outcome}")

    def _outcome(
        self, job: QueuedJob, active: _Active, code: int, tail: list[str]
    ) -> tuple[str, str, bool]:
        """(state, one line, restart?) for an attempt that ended with `code`."""
        last = tail[-1] if tail else ""
        if job.cancel_requested:
            return "cancelled", f"cancelled (exit {code})", False
        if self._stopping:
            return "queued", "stopped with the worker; it continues when a worker runs", False
        if active.stalled:
            what = f"stalled (no progress for {job.stall_timeout:g}s), killed"
        elif code == 0:
            if active.stop_reason == "stop":
                return "cancelled", "stopped on request (checkpointed)", False
            return "done", "done", False
        elif code == 2:
            return "failed", f"exit 2: {last}", False
        elif active.stop_reason == "anomaly":
            return "failed", f"exit {code}: {last}", False
        elif code == 130:
            return "cancelled", "interrupted (checkpointed)", False
        elif code == launch.EXIT_LOST:
            what = "its process ended and left no exit status"
        elif code < 0:
            what = f"killed by {signal.Signals(-code).name}"
        else:
            what = f"exit {code}" + (f": {last}" if last else "")
        if job.restarts < job.max_restarts:
            return "queued", what, True
        return (
            "failed",
            what + (f" ({job.max_restarts} restarts used)" if job.max_restarts else ""),
            False,
        )

    def _shutdown(self) -> None:
        """Stop: ask every running job to stop at its next step, wait, queue them again."""
        self.log("stopping: asking running jobs to checkpoint and stop")
        for active in self.active.values():
            self._ask_stop(active.job)
        deadline = time.monotonic() + CANCEL_GRACE
        while self.active and time.monotonic() < deadline:
            for active in list(self.active.values()):
                self._watch(active)
            time.sleep(self.poll)
        for active in list(self.active.values()):
            active.process.kill()
            self._watch(active)


def _size(folder: Path | None, name: str) -> int:
    try:
        return os.stat(folder / name).st_size if folder is not None else 0
    except OSError:
        return 0
