"""The live event stream of a run: `<run>/events.jsonl`, written while it trains, read by anyone.

The trainer tells front-ends what happens through `Event`s (start, step, epoch, checkpoint,
notice, stop, recover). In its own process they reach listeners directly; to every other
process — a dashboard in another kernel (`%attach`), `mmnb queue ls`, `mmnb watch`, the worker's
stall detector — they travel through this file. `EventWriter` is the listener that writes it;
`EventFollower` reads it back as the same `Event` objects.

Why JSON lines and not an HDF5 table: appending a line is one `write()` to an `O_APPEND` file,
and a process killed halfway leaves at most one torn last line, which readers skip and the next
writer terminates. HDF5 has no journaling (a writer killed mid-write can leave the whole file
unreadable), and SWMR would tie readers to one writer's library version. Losing the stream never
loses anything that matters: the truth (weights, metrics, checkpoints) is in the store; the
stream is progress.

Records, one JSON object per line:

    {"v": 1, "t": <unix time>, "kind": "step", "step": 12, "info": {"loss": 3.1, ...}}

besides the trainer's kinds, the writer adds `open` (a session begins: the process record —
pid, process group, start ticks, boot id — the run and the queue job, so any process can find
and verify the writer), `heartbeat` (every `heartbeat` seconds: the current step even between
logged steps, the plan's total and the process record again, so a reader of the file's tail
needs nothing older), `control` (the answer to a command from `mmnb.jobs.control`) and `close`
(the session ended; `error` when training failed). A session killed by a signal has no `close`:
readers check the process record.

Bounded size: past `max_bytes` the file is renamed `events.1.jsonl` (replacing the previous
one) and a new one begins, so a run keeps at most two files. Followers notice the rename and
finish the old file first.

Cheap: the listener only appends to a deque; a thread encodes and writes every
`flush_interval` seconds (benchmarks/bench_jobs.py measures the cost against training).
Only rank 0 of a distributed run writes (`$RANK`), and background threads never print.

The store is untrusted input: a line that is not a well-formed record (malformed JSON, wrong
types, over `MAX_LINE` bytes) is skipped, never raised; the file is opened without following a
symbolic link and only if it is a regular file.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .launch import ProcessRecord
from .store.jsonio import finite_or_none

STREAM = "events.jsonl"
ROTATED = "events.1.jsonl"
VERSION = 1
MAX_BYTES = 4 * 1024 * 1024  # rotate past this size (two files at most)
MAX_LINE = 64 * 1024  # a longer line is not a record
SILENCE = 60.0  # a writer on another machine whose stream is silent this long is presumed gone
_CHUNK = 64 * 1024
TRAINER_KINDS = ("start", "step", "epoch", "checkpoint", "notice", "stop", "recover")
STREAM_KINDS = ("open", "heartbeat", "control", "close")


@dataclass
class Event:
    """What the trainer tells front-ends. It never prints; they render."""

    kind: str  # prepare | start | step | epoch | checkpoint | notice | stop | recover (+ stream kinds)
    step: int  # optimizer steps completed
    info: dict[str, Any] = field(default_factory=dict)
    time: float | None = None  # Unix time the stream recorded it (None in process)


def _rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


# ---- encoding ----
def _jsonable(value: Any) -> Any:
    # Standard JSON only: a non-finite float (a skipped step's loss) is written as null.
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return finite_or_none(dataclasses.asdict(value))
    if hasattr(value, "item"):  # numpy / torch scalars
        return finite_or_none(value.item())
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def encode(event: Event, t: float) -> bytes:
    record = {"v": VERSION, "t": t, "kind": event.kind, "step": event.step, "info": event.info}
    text = json.dumps(
        finite_or_none(record), default=_jsonable, separators=(",", ":"), allow_nan=False
    )
    return (text + "\n").encode()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Fields a reader relies on, per kind: name -> check. A record failing one is skipped.
_REQUIRED: dict[str, dict[str, Callable[[Any], bool]]] = {
    "start": {"total": _integer},
    "step": {"loss": _number, "lr": _number, "tokens": _integer},
    "epoch": {"epoch": _integer},
    "notice": {"text": lambda v: isinstance(v, str)},
    "stop": {"reason": lambda v: isinstance(v, str)},
}


def decode(line: bytes | str) -> Event | None:
    """The event of one line, or None when the line is not a well-formed record."""
    if len(line) > MAX_LINE:
        return None
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    kind, step, info, t = (
        record.get("kind"),
        record.get("step"),
        record.get("info"),
        record.get("t"),
    )
    if not isinstance(kind, str) or not 0 < len(kind) <= 32 or not kind.isidentifier():
        return None
    if not _integer(step) or step < 0 or not isinstance(info, dict) or not _number(t):
        return None
    for name, check in _REQUIRED.get(kind, {}).items():
        if not check(info.get(name)):
            return None
    if kind == "checkpoint":
        info = dict(info, saved=_step_info(info.get("saved")))
    return Event(kind, step, info, float(t))


def _step_info(data: Any) -> Any:
    """A checkpoint event's `saved` as a StepInfo, or None when it is not one."""
    from .store.run import StepInfo  # h5py only for readers that meet a checkpoint

    if not isinstance(data, dict):
        return None
    names = {f.name for f in dataclasses.fields(StepInfo)}
    kept = {k: v for k, v in data.items() if k in names}
    if not _integer(kept.get("step")) or not isinstance(kept.get("run"), str):
        return None
    if not isinstance(kept.get("file"), str) or not isinstance(kept.get("reasons"), list):
        return None
    if kept.get("loss") is not None and not _number(kept["loss"]):
        return None
    try:
        return StepInfo(**kept)
    except TypeError:
        return None


# ---- safe opening ----
def _open_regular(path: Path) -> int | None:
    """An fd for reading `path` if it is a regular file reached without a final symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


# ---- writing ----
class EventWriter:
    """A trainer listener that appends its events to `<folder>/events.jsonl`.

        writer = EventWriter(run.path, progress=lambda: (trainer.step, trainer.plan.end))
        trainer.listeners.append(writer)
        ...
        writer.close()

    `progress` (called from the writer's thread) gives the heartbeat's (step, total); `poll`
    is called every `flush_interval` seconds from the same thread (the control channel uses
    it). `meta` is added to the `open` record (run name, queue job, …).
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        progress: Callable[[], tuple[int, int]] | None = None,
        poll: Callable[[], None] | None = None,
        meta: dict[str, Any] | None = None,
        flush_interval: float = 0.2,
        heartbeat: float = 2.0,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.path = Path(folder) / STREAM
        self.progress, self.poll = progress, poll
        self.flush_interval, self.heartbeat, self.max_bytes = flush_interval, heartbeat, max_bytes
        self.enabled = _rank_zero()
        self.process = ProcessRecord.of(os.getpid(), argv=[])
        self._pending: collections.deque[tuple[float, Event]] = collections.deque()
        self._lock = threading.Lock()  # one flusher at a time (thread, close)
        self._wake = threading.Event()
        self._closed = False
        self._fd: int | None = None
        self._size = 0
        self._beat = 0.0
        self.errors = 0  # writes that failed (full disk…): progress is lost, training goes on
        if not self.enabled:
            return
        self._open_file_safely()
        open_info = {"process": self.process.to_dict(), "host": socket.gethostname()}
        open_info.update(meta or {})
        step = progress()[0] if progress else 0
        self.write("open", step, **open_info)
        self.flush()  # a reader learns at once who writes
        self._thread = threading.Thread(target=self._run, name="mmnb-events", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<mmnb EventWriter {self.path}{' (closed)' if self._closed else ''}>"

    # ---- the listener ----
    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        self._pending.append((time.time(), event))  # deque.append is atomic: no lock here
        if self._closed:  # e.g. %checkpoint of an idle run after its session ended
            self.flush()

    def write(self, kind: str, step: int, **info: Any) -> None:
        """Queue a record of the stream's own (`open`, `control`, `recover`, …)."""
        self(Event(kind, step, info))

    # ---- the thread ----
    def _run(self) -> None:
        while not self._closed:
            now = time.time()
            if now - self._beat >= self.heartbeat:
                self._heartbeat(now)
            self.flush()
            self._poll()
            self._wake.wait(self.flush_interval)

    def _poll(self) -> None:
        if self.poll is not None:
            try:
                self.poll()
            except Exception as err:  # a broken control file must not end training
                self.write("notice", self._step(), text=f"control channel: {err}")

    def _step(self) -> int:
        if self.progress is None:
            return 0
        try:
            return int(self.progress()[0])
        except Exception:
            return 0

    def _heartbeat(self, now: float) -> None:
        self._beat = now
        step, total = (0, 0)
        if self.progress is not None:
            with contextlib.suppress(Exception):
                step, total = (int(x) for x in self.progress())
        self._pending.append(
            (now, Event("heartbeat", step, {"total": total, "process": self.process.to_dict()}))
        )

    def flush(self) -> None:
        """Write every queued record now (the thread does this every `flush_interval`)."""
        with self._lock:
            lines = []
            while self._pending:
                t, event = self._pending.popleft()
                try:
                    lines.append(encode(event, t))
                except (TypeError, ValueError):
                    self.errors += 1
            if lines:
                self._append(b"".join(lines))
            if self._closed and self._fd is not None:  # a late event after the session ended
                os.close(self._fd)
                self._fd = None

    def _open_file(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        size = os.fstat(fd).st_size
        if size:
            # A writer killed mid-line left a torn record: end it, so it is one skipped line.
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(fd, b"\n")
                    size += 1
        self._fd, self._size = fd, size

    def _open_file_safely(self) -> None:
        # A stream that cannot be written (a read-only folder, a symlink where the file should
        # be) costs the progress, never the training: the error is counted, nothing raised.
        try:
            self._open_file()
        except OSError:
            self.errors += 1

    def _append(self, data: bytes) -> None:
        try:
            if self._fd is None:
                self._open_file()
            if self._size + len(data) > self.max_bytes and self._size:
                os.close(self._fd)
                os.replace(self.path, self.path.with_name(ROTATED))
                self._open_file()
            os.write(self._fd, data)
            self._size += len(data)
        except OSError:
            self.errors += 1

    def close(self, error: BaseException | None = None) -> None:
        """End the session: stop the thread, write what is queued and a `close` record."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._poll()  # a request that came meanwhile is answered, not left hanging
        text = None if error is None else f"{type(error).__name__}: {error}"
        self._pending.append((time.time(), Event("close", self._step(), {"error": text})))
        self.flush()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


# ---- reading ----
class EventFollower:
    """Read a run's stream as it grows: `poll()` returns the new events, `follow()` yields them.

    From the start (the rotated file first) by default, or only what comes after now with
    `from_start=False`. Malformed lines are skipped; a torn last line waits for its newline.
    """

    def __init__(self, folder: str | os.PathLike[str], *, from_start: bool = True) -> None:
        self.folder = Path(folder)
        self.path = self.folder / STREAM
        self._fd: int | None = None
        self._ino: int | None = None
        self._buffer = b""
        self.skipped = 0  # malformed lines seen
        self._backlog: list[Event] = []
        if from_start:
            old = _open_regular(self.folder / ROTATED)
            if old is not None:
                self._backlog = self._read_all(old)
                os.close(old)
        else:
            self._open(seek_end=True)

    def __repr__(self) -> str:
        return f"<mmnb EventFollower {self.path}>"

    def _open(self, seek_end: bool = False) -> bool:
        fd = _open_regular(self.path)
        if fd is None:
            return False
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._ino, self._buffer = fd, os.fstat(fd).st_ino, b""
        if seek_end:
            os.lseek(fd, 0, os.SEEK_END)
        return True

    def _read_all(self, fd: int) -> list[Event]:
        events = []
        while chunk := os.read(fd, _CHUNK):
            events += self._lines(chunk)
        return events

    def _lines(self, chunk: bytes) -> list[Event]:
        data = self._buffer + chunk
        *lines, self._buffer = data.split(b"\n")
        if len(self._buffer) > MAX_LINE:  # a runaway line: drop it, keep reading after it
            self._buffer = b""
            self.skipped += 1
        events = []
        for line in lines:
            if not line.strip():
                continue
            event = decode(line)
            if event is None:
                self.skipped += 1
            else:
                events.append(event)
        return events

    def poll(self) -> list[Event]:
        """The complete records written since the last call (empty when there are none)."""
        events, self._backlog = self._backlog, []
        if self._fd is None and not self._open():
            return events
        events += self._read_all(self._fd)
        try:
            current = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return events
        if current.st_ino != self._ino:  # rotated: the old file is finished, go on in the new
            self._buffer = b""
            if self._open():
                events += self._read_all(self._fd)
        elif current.st_size < os.lseek(self._fd, 0, os.SEEK_CUR):  # replaced by a shorter one
            os.lseek(self._fd, 0, os.SEEK_SET)
            self._buffer = b""
        return events

    def follow(
        self,
        until: Callable[[Event], bool] | None = None,
        *,
        interval: float = 0.2,
        timeout: float | None = None,
        idle: Callable[[], bool] | None = None,
    ) -> Iterator[Event]:
        """Yield events as they arrive; stop after one for which `until` is true, when
        `timeout` seconds passed, or when `idle()` (asked between polls) says to."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for event in self.poll():
                yield event
                if until is not None and until(event):
                    return
            if deadline is not None and time.monotonic() >= deadline:
                return
            if idle is not None and idle():
                yield from self.poll()
                return
            time.sleep(interval)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_events(folder: str | os.PathLike[str]) -> list[Event]:
    """Every readable event of a run's stream, oldest first."""
    follower = EventFollower(folder)
    try:
        return follower.poll()
    finally:
        follower.close()


# ---- the state of a run at a glance (`queue ls`, `mmnb watch`) ----
@dataclass
class Progress:
    """What the tail of a stream says about a run's newest session."""

    step: int = 0
    total: int = 0
    loss: float | None = None
    tokens: int = 0
    tokens_per_s: float | None = None
    steps_per_s: float | None = None
    state: str = "starting"  # starting | training | a stop reason | failed | ended
    updated: float | None = None  # Unix time of the newest record
    process: ProcessRecord | None = None
    recoveries: int = 0  # recover events seen in the tail
    error: str | None = None  # what a `close` record said

    @property
    def eta(self) -> float | None:
        """Seconds to the plan's end at the recent rate; None when unknown or not training."""
        if self.state != "training" or not self.steps_per_s or not self.total:
            return None
        return max(self.total - self.step, 0) / self.steps_per_s

    def alive(self) -> bool | None:
        """Whether the writer still runs: checked on this machine; for another machine's
        process, whether its stream spoke in the last `SILENCE` seconds (None: unknown)."""
        if self.process is None:
            return None
        if self.process.local:
            return self.process.matches()
        return self.updated is not None and time.time() - self.updated < SILENCE


_MARKERS = (b'"kind":"open"', b'"kind":"heartbeat"', b'"kind":"start"')


def progress(folder: str | os.PathLike[str], max_bytes: int = 16 * _CHUNK) -> Progress | None:
    """The newest session's progress from the stream's tail; None without a stream.

    Reads the newest 16 KiB (recent steps, for the rate), then older chunks only as far back as
    the newest record that carries the plan's total and the process (`open`, `heartbeat` or
    `start`: found by a byte search, decoding only that line), at most `max_bytes` in all."""
    fd = _open_regular(Path(folder) / STREAM)
    if fd is None:
        return None
    try:
        end = os.fstat(fd).st_size
        newest: list[Event] = []
        marker: list[Event] = []
        carry = b""  # the cut-off start of the chunk read before
        first = True
        while end > 0 and not marker and os.fstat(fd).st_size - end < max_bytes:
            start = max(0, end - (_CHUNK // 4 if first else _CHUNK))
            os.lseek(fd, start, os.SEEK_SET)
            data = os.read(fd, end - start) + carry
            end = start
            lines = data.split(b"\n")
            carry = lines.pop(0) if start > 0 else b""
            if first:
                newest = [e for e in map(decode, filter(bytes.strip, lines)) if e is not None]
                first = False
                if any(e.kind in ("open", "heartbeat", "start") for e in newest):
                    break
                continue
            for line in reversed(lines):
                if any(m in line for m in _MARKERS) and (event := decode(line)) is not None:
                    marker = [event]
                    break
    finally:
        os.close(fd)
    return summarize(marker + newest)


def summarize(events: list[Event]) -> Progress:
    """Fold events (oldest first) into the progress of the newest session among them."""
    p = Progress()
    first_step: Event | None = None
    last_step: Event | None = None
    for e in events:
        info = e.info
        if e.kind == "open":  # a new session; the last loss seen stays the last known one
            p = Progress(step=e.step, loss=p.loss, tokens=p.tokens)
            first_step = last_step = None
            _set_process(p, info)
        elif e.kind == "heartbeat":
            p.step = max(p.step, e.step)
            if _integer(info.get("total")) and info["total"] > 0:
                p.total = info["total"]
            _set_process(p, info)
        elif e.kind == "start":
            p.state, p.step, p.total = "training", e.step, info["total"]
            first_step = last_step = None
        elif e.kind == "step":
            p.step, p.loss, p.tokens = e.step, float(info["loss"]), info["tokens"]
            if p.state == "starting":
                p.state = "training"
            first_step = first_step or e
            last_step = e
        elif e.kind == "stop":
            p.state = info["reason"]
        elif e.kind == "recover":
            p.recoveries += 1
        elif e.kind == "close":
            if isinstance(info.get("error"), str):
                p.state, p.error = "failed", info["error"]
            elif p.state in ("starting", "training"):
                p.state = "ended"
        if e.time is not None:
            p.updated = e.time
    if first_step is not None and last_step is not None and last_step.time != first_step.time:
        dt = last_step.time - first_step.time
        if dt > 0 and last_step.step > first_step.step:
            p.steps_per_s = (last_step.step - first_step.step) / dt
            tokens = last_step.info["tokens"] - first_step.info["tokens"]
            p.tokens_per_s = tokens / dt if tokens >= 0 else None
    return p


def _set_process(p: Progress, info: dict[str, Any]) -> None:
    with contextlib.suppress(ValueError):
        if "process" in info:
            p.process = ProcessRecord.from_dict(info["process"])
