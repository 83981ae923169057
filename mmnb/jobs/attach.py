"""Attach a listener to a run trained by another process: its event stream in, control out.

    attachment = Attachment(store.run("a"), dashboard)   # replays the session, then follows it
    dashboard.attach(attachment.remote)                  # Stop / Checkpoint act through files
    attachment.start()

A listener (the widget `Dashboard`, `ConsoleProgress`, anything that takes `train.Event`s) sees
what it would see in the training process: the current session's events are replayed, then new
ones arrive from a thread as the stream grows. `RemoteRun` stands in for the `Run` a listener's
buttons act on: its `trainer` has the thread-safe `stop()` and `request_checkpoint()` of a real
trainer, sent through the run's control channel (`mmnb.jobs.control`) and answered through its
stream.

Replayed steps arrive all at once, so rates measured on arrival would be nonsense: after the
replay of a live session the listener gets the session's `start` event again, at the step it has
reached, which starts its rate clock afresh. A session whose process died without a `stop`
(SIGKILL, OOM) gets a synthetic `stop` with reason `failed`, so nothing shows "training" forever.
The follower keeps going while the queue may restart the run (a queued or running job for it).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..events import SILENCE, Event, EventFollower, _step_info
from . import control

Listener = Callable[[Event], None]
_OWN = ("open", "heartbeat", "close", "control")


APPEAR_TIMEOUT = 120.0  # seconds to wait for a just-started job to create its run


def appeared(store: Any, name: str, timeout: float = APPEAR_TIMEOUT) -> Any:
    """The run `name` of `store`, waiting while a detached or queued job that creates it is
    starting; a StoreError if there is none, a ValueError saying why the job ended first."""
    from ..launch import tail_lines
    from ..store import StoreError
    from . import detach
    from .queue import FILE, Queue

    deadline = time.monotonic() + timeout
    while True:
        try:
            return store.run(name)
        except StoreError:
            job = detach.find(store, name)
            queued = False
            if (store.path / FILE).is_file():
                with Queue(store) as queue:
                    queued = any(j.run == name for j in queue.jobs(["queued", "running"]))
            if not queued and (job is None or not job.alive()):
                if job is not None:  # it ended before creating the run: say why
                    last = tail_lines(job.logs / "stderr.log", 1) if job.logs else []
                    raise ValueError(
                        f"the detached job of run {name!r} ended (exit {job.poll()}) before "
                        f"creating it: {last[0] if last else 'no output'}"
                    ) from None
                raise
            if time.monotonic() > deadline:
                raise ValueError(f"run {name!r} has not appeared after {timeout:g}s") from None
            time.sleep(0.2)


class RemoteTrainer:
    """What a dashboard's buttons need of a trainer, for one in another process."""

    def __init__(self, run_path: Path) -> None:
        self.run_path = run_path
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()

    def stop(self) -> None:
        control.send(self.run_path, "stop")

    def request_checkpoint(self, tags: list[str] = ()) -> Future:
        future: Future = Future()
        with self._lock:
            request = control.send(self.run_path, "checkpoint", tags=list(tags))
            self._pending[request] = future
        return future

    def answer(self, info: dict[str, Any]) -> None:
        """A `control` record from the stream: complete the matching request."""
        with self._lock:
            future = self._pending.pop(str(info.get("id")), None)
        if future is None:
            return
        if info.get("ok"):
            future.set_result(_step_info(info.get("saved")))
        else:
            future.set_exception(RuntimeError(str(info.get("error") or "refused")))

    def fail_pending(self, why: str) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(RuntimeError(why))


class RemoteRun:
    """A `Run` whose training happens elsewhere: reading delegates to the run, control goes
    through `trainer` (a RemoteTrainer)."""

    def __init__(self, run: Any) -> None:
        self._run = run
        self.trainer = RemoteTrainer(run.path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._run, name)

    def __repr__(self) -> str:
        return f"<mmnb RemoteRun {self._run.name!r} at {self._run.path}>"

    def stop(self, wait: bool = False) -> RemoteRun:
        self.trainer.stop()
        return self

    def checkpoint(self, tags: list[str] = (), timeout: float | None = 60.0) -> Any:
        return self.trainer.request_checkpoint(tags).result(timeout)


class Attachment:
    """Feeds `listener` from `run`'s event stream in a thread, until `close()` or the end."""

    def __init__(
        self,
        run: Any,
        listener: Listener,
        *,
        interval: float = 0.2,
        keep_following: Callable[[], bool] | None = None,
    ) -> None:
        self.run = run
        self.remote = RemoteRun(run)
        self.listener = listener
        self.interval = interval
        # Asked when a session has ended: follow on (a worker will restart it)?
        self.keep_following = keep_following or (lambda: False)
        self._follower = EventFollower(run.path)
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.live = False  # a session is in progress (its process runs)
        self.ended = threading.Event()  # set when following stopped on its own
        self._process: Any = None
        self._heard = time.monotonic()  # when the stream last said something
        self._stopped = True  # the current session has said how it ended

    def __repr__(self) -> str:
        return f"<mmnb Attachment {self.run.name} ({'live' if self.live else 'ended'})>"

    # ---- replay ----
    def replay(self) -> None:
        """Feed the current session's events (call before `start`)."""
        events = self._follower.poll()
        if not any(e.kind in ("open", "start") for e in events):
            # No session in the stream (a run from before streams, or one never trained since):
            # say how it stands, from the store, so no button offers to stop it.
            status = self.run.status()
            if status != "training":
                latest = self.run.latest()
                reason = "done" if status == "finished" else "stop"
                self._feed(Event("stop", latest.step if latest else 0, {"reason": reason}))
            return
        opens = [i for i, e in enumerate(events) if e.kind == "open"]
        session = events[opens[-1] :] if opens else events
        start: Event | None = None
        for event in session:
            self._track(event)
            if event.kind == "start":
                start = event
            if event.kind not in _OWN:
                self._feed(event)
        if self._stopped:
            return
        if self._gone():
            self._died()
        elif start is not None:
            # Live: restart the listener's rate clock at the step the session has reached.
            info = dict(start.info)
            steps = [e for e in session if e.kind == "step"]
            now = steps[-1].step if steps else start.step
            info["epoch_step"] = int(info.get("epoch_step", 0)) + (now - start.step)
            self._feed(Event("start", now, info))

    def _gone(self) -> bool:
        """The session's writer has ended without a word (killed): checked against /proc on
        this machine; on another, presumed after `events.SILENCE` seconds of silence."""
        if self._process is None:
            return False
        if self._process.local:
            return not self._process.matches()
        return time.monotonic() - self._heard > SILENCE

    def _track(self, event: Event) -> None:
        from ..launch import ProcessRecord

        self._heard = time.monotonic()
        if event.kind == "open":
            self._stopped, self.live = False, True
            with contextlib.suppress(ValueError):
                self._process = ProcessRecord.from_dict(event.info.get("process"))
        elif event.kind in ("stop", "close"):
            self._stopped = self._stopped or event.kind == "stop"
            if event.kind == "close":
                self.live = False
                if not self._stopped:  # closed without a stop: it failed
                    error = event.info.get("error") or "training ended without a stop"
                    self._feed(Event("stop", event.step, {"reason": "failed", "error": error}))
                    self._stopped = True
        elif event.kind == "control":
            self.remote.trainer.answer(event.info)

    def _died(self) -> None:
        self.live = False
        self._stopped = True
        self._feed(
            Event("stop", 0, {"reason": "failed", "error": "its process ended without a word"})
        )
        self.remote.trainer.fail_pending("the training process ended")

    def _feed(self, event: Event) -> None:
        with contextlib.suppress(Exception):  # a failing listener must not end the follower
            self.listener(event)

    # ---- following ----
    def start(self) -> Attachment:
        self._thread = threading.Thread(target=self._run, name="mmnb-attach", daemon=True)
        self._thread.start()
        return self

    def follow_here(self, timeout: float | None = None) -> bool:
        """Follow in this thread (a terminal's `mmnb watch`: the listener prints, so no
        background thread may call it); True if the session ended, False on `timeout`."""
        if timeout is not None:
            timer = threading.Timer(timeout, self._closed.set)
            timer.daemon = True
            timer.start()
        self._run()
        return not self._closed.is_set()

    def _run(self) -> None:
        quiet = 0
        while not self._closed.wait(self.interval):
            for event in self._follower.poll():
                self._track(event)
                if event.kind not in _OWN:
                    self._feed(event)
            if self.live and self._gone():
                self._died()
            if not self.live:
                quiet += 1
                # Ended: follow on while a worker may start it again (checked now and then).
                if quiet % 10 == 1 and not self.keep_following():
                    break
            else:
                quiet = 0
        self._follower.close()
        self.ended.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until following ends (the session ended for good); True if it did."""
        return self.ended.wait(timeout)

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
