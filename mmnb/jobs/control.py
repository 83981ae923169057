"""The control channel of a training process: command files in `<run>/control/`.

    control.send(run.path, "stop")                      # stop at the next step, checkpointed
    control.send(run.path, "checkpoint", tags=["x"])    # checkpoint at the next step boundary

Why files and not signals: a command file says which command, carries arguments (tags) and an
id the answer refers to; it waits — not lost, not half-handled — while the process is busy or
even SIGSTOPped, and is applied at an optimizer-step boundary through the trainer's own
thread-safe `stop()` / `request_checkpoint()`; it cannot hit a reused pid; it works for a
torchrun group (rank 0 reads it; the trainer makes ranks agree) and across hosts that share the
store. Signals remain for what they do well: SIGINT interrupts (checkpoint of the last completed
step, exit 130), SIGKILL ends a group (`mmnb.launch.Job`).

The training process polls the folder from its event-stream thread (`Inbox`, every
`EventWriter.flush_interval`); the answer is a `control` record in the event stream with the
request's id (and, for a checkpoint, the `StepInfo` saved). A request is a JSON file written
atomically (temporary name, rename); files are read defensively (a regular file under 4 KiB, a
known verb, string tags) and removed once read. Requests older than the session are answered
`expired`: a Stop sent to a job that was not running must not stop tomorrow's restart.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

FOLDER = "control"
VERBS = ("stop", "checkpoint")
_MAX_FILE = 4096
_MAX_TAGS = 16


def _folder(run_path: str | os.PathLike[str], create: bool) -> int | None:
    """A descriptor of `<run>/control`, a real folder inside the run (never a symlink): the
    store is untrusted, and requests are written, read and removed only through it."""
    folder = Path(run_path) / FOLDER
    if create:
        try:
            folder.mkdir()
        except FileExistsError:
            pass
    try:
        return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        if create:
            raise ValueError(f"{folder} is not a folder of the run; refused") from None
        return None


def send(run_path: str | os.PathLike[str], verb: str, *, tags: list[str] = ()) -> str:
    """Ask the process training the run at `run_path` to `verb`; return the request id."""
    if verb not in VERBS:
        raise ValueError(f"unknown control command {verb!r}; use one of {', '.join(VERBS)}")
    tags = [str(t) for t in tags]
    request_id = f"{time.time_ns():x}-{os.getpid()}"
    data = {"id": request_id, "verb": verb, "tags": tags, "time": time.time(), "pid": os.getpid()}
    fd = _folder(run_path, create=True)
    try:
        tmp, final = f".{request_id}.tmp", f"{request_id}.json"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=fd)
        try:
            os.write(out, json.dumps(data).encode())
        finally:
            os.close(out)
        os.replace(tmp, final, src_dir_fd=fd, dst_dir_fd=fd)  # whole or not at all
    finally:
        os.close(fd)
    return request_id


def _read(name: str, dir_fd: int) -> dict[str, Any] | None:
    """A request, or None when the file is not one (checked, never trusted)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_FILE:
            return None
        data = json.loads(os.read(fd, _MAX_FILE))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not isinstance(data, dict) or data.get("verb") not in VERBS:
        return None
    tags = data.get("tags", [])
    if not isinstance(tags, list) or len(tags) > _MAX_TAGS:
        return None
    if not all(isinstance(t, str) and 0 < len(t) <= 64 for t in tags):
        return None
    if not isinstance(data.get("time"), (int, float)):
        return None
    return {"id": name[: -len(".json")], "verb": data["verb"], "tags": tags,
            "time": float(data["time"])}  # fmt: skip


class Inbox:
    """Reads the run's control folder for a live trainer (called by the stream's thread)."""

    def __init__(self, run_path: str | os.PathLike[str], trainer: Any, writer: Any = None) -> None:
        self.run_path = Path(run_path)
        self.trainer, self.writer = trainer, writer
        self.opened = time.time()

    def poll(self) -> None:
        fd = _folder(self.run_path, create=False)
        if fd is None:
            return
        try:
            names = sorted(os.listdir(fd))
            for name in names:
                if name.startswith(".") or not name.endswith(".json"):
                    continue
                request = _read(name, fd)
                try:
                    os.unlink(name, dir_fd=fd)  # the entry in this folder, never a link's target
                except OSError:
                    pass
                if request is None:
                    self._answer(
                        name[: -len(".json")], "?", ok=False, error="not a control request"
                    )
                elif request["time"] < self.opened:
                    self._answer(request["id"], request["verb"], ok=False, error="expired")
                else:
                    self._apply(request)
        finally:
            os.close(fd)

    def _apply(self, request: dict[str, Any]) -> None:
        request_id, verb = request["id"], request["verb"]
        if verb == "stop":
            self.trainer.stop()
            self._answer(request_id, verb, ok=True)
            return
        future = self.trainer.request_checkpoint(request["tags"])
        if future is None:
            self._answer(request_id, verb, ok=False, error="the run is not training")
            return

        def done(f: Any) -> None:
            error = f.exception()
            if error is not None:
                self._answer(request_id, verb, ok=False, error=str(error))
            else:
                self._answer(request_id, verb, ok=True, saved=f.result())

        future.add_done_callback(done)

    def _answer(self, request_id: str, verb: str, **info: Any) -> None:
        if self.writer is not None:
            self.writer.write("control", int(self.trainer.step), id=request_id, verb=verb, **info)
