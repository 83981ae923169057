"""Detached training: `mmnb train … --detach`, `%train … --detach` (and resume, branch).

The command is checked now (`commands`), its run named, and it starts as its own process
through `mmnb.launch` — its own session, output in `<store>/.jobs/detached/<run>-<time>/` —
and this process returns at once. The job outlives the kernel or terminal that started it;
its run's event stream (`mmnb.events`) is how anyone follows it (`%attach`, `mmnb watch`), its
control channel how anyone stops it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .. import launch
from . import commands
from .queue import ensure_private, jobs_folder

FOLDER = "detached"


def detach(store: Any, command: commands.JobCommand) -> launch.Job:
    """Start `command` as a detached process of its own; return its handle."""
    folder = jobs_folder(store) / FOLDER
    ensure_private(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = folder / f"{command.run or command.verb}-{stamp}-{time.time_ns() % 10**6:06d}"
    logs.mkdir()
    launch.write_json(logs / "command.json", command.to_dict())
    return launch.start(
        [command.verb, *command.argv], logs=logs, env=commands.job_env(), cwd=command.cwd
    )


def find(store: Any, run: str) -> launch.Job | None:
    """The newest detached job started for `run` (a handle that can wait and tail its logs)."""
    folder = jobs_folder(store) / FOLDER
    if not folder.is_dir() or folder.is_symlink():
        return None
    candidates = sorted(
        (
            p
            for p in folder.iterdir()
            if p.name.startswith(f"{run}-") and p.is_dir() and not p.is_symlink()
        ),
        key=lambda p: p.stat().st_mtime,
    )
    for path in reversed(candidates):
        try:
            job = launch.Job.load(path / launch.RECORD)
        except ValueError:
            continue
        # Read logs and exit status from the folder it was found in, not from the record.
        job.record = launch.ProcessRecord(**{**job.record.to_dict(), "logs": str(path)})
        return job
    return None


def started_line(command: commands.JobCommand, job: launch.Job, follow: str) -> str:
    """What a front-end prints after detaching: the run, the process, how to follow it."""
    logs = Path(job.record.logs or "")
    return (
        f"run {command.run}: {command.verb} runs detached in process {job.pid} (it outlives "
        f"this {'kernel' if follow.startswith('%') else 'terminal'}); "
        f"{follow} {command.run} follows it; logs in {logs}"
    )
