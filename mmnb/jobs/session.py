"""What every training session publishes and listens to, wherever it runs.

`open_session(run, trainer)` is called by `mmnb.api` for every train/resume/branch: it adds an
`EventWriter` (the run's live event stream, `mmnb.events`) to the trainer's listeners, with a
heartbeat carrying the trainer's step and plan, and a control `Inbox` polled by the writer's
thread. So any run — trained in a kernel, a terminal, a detached job or the worker — can be
followed (`%attach`, `mmnb watch`, `mmnb queue ls`) and stopped or checkpointed from another
process. Only rank 0 of a distributed run writes (see `EventWriter`).

The worker tells a restarted job why it was restarted through `$MMNB_RECOVERY` (JSON): the
session writes it as a `recover` event and a `notice`, so the dashboard and the loss plot show
each recovery.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ..events import EventWriter
from ..launch import EXIT_FILE_ENV
from .control import Inbox

JOB_ENV = "MMNB_JOB"  # the queue job a process runs for (set by the worker)
RECOVERY_ENV = "MMNB_RECOVERY"  # why the worker (re)started it, as JSON


def _logs() -> str | None:
    """The log folder of this process when mmnb.launch started it (stdout.log, stderr.log)."""
    exit_file = os.environ.get(EXIT_FILE_ENV)
    return os.path.dirname(exit_file) if exit_file else None


def open_session(run: Any, trainer: Any) -> EventWriter:
    """Start publishing `trainer`'s events for `run`; close the returned writer at the end."""
    writer = EventWriter(
        run.path,
        progress=lambda: (trainer.step, trainer.plan.end),
        meta={"run": run.name, "job": os.environ.get(JOB_ENV), "logs": _logs()},
    )
    writer.poll = Inbox(run.path, trainer, writer).poll  # polled from now on, answers to it
    trainer.listeners.append(writer)
    recovery = os.environ.pop(RECOVERY_ENV, None)  # once: the first session of the process
    if recovery:
        try:
            info = json.loads(recovery)
        except ValueError:
            info = None
        if isinstance(info, dict) and isinstance(info.get("text"), str):
            info = {k: v for k, v in info.items() if k not in ("kind", "step")}
            # In the run's history too: the browser marks it on the loss plot.
            entry = {"kind": "restart", "step": trainer.step, "time": time.time(), **info}
            history = run.info().get("history", [])
            run.update_attrs(history=[*history, entry])
            trainer.emit("recover", **info)
            trainer.emit("notice", text=info["text"])
    return writer
