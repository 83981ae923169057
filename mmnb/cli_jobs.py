"""`mmnb queue`, `mmnb worker`, `mmnb pipeline`, `mmnb watch`, and `--detach` (mmnb.jobs).

mmnb queue add [--after ID] [--max-restarts K] [--stall-timeout S] train|resume|branch ARGS
mmnb queue ls [--json]          jobs with step/total, loss, tok/s, ETA, attempts
mmnb queue cancel ID…           a queued job (and what waits for it); a running one stops
mmnb queue move ID --before ID2 | --first
mmnb queue clear                forget ended jobs (their runs stay)
mmnb worker [--slots N]         run the queue (one worker per store)
mmnb pipeline run FILE          queue a TOML pipeline's missing stages
mmnb pipeline status FILE
mmnb watch [RUN]                live progress of a run trained anywhere

Registered with `mmnb.cli` through `@command`; nothing heavy is imported before a handler runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from .cli import command

STORE_HELP = "store folder (default $MMNB_STORE or ./mmnb-runs)"


class _StorePath:
    """A store folder for commands that never open a run (`queue ls` answers without h5py
    or torch); `.full()` is the `mmnb.Store` when one is needed."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path or os.environ.get("MMNB_STORE") or "mmnb-runs").expanduser()

    def full(self) -> Any:
        from .store import Store

        return Store(self.path)


def _store(path: str | None) -> _StorePath:
    return _StorePath(path)


def _ensure_worker(store: Any, no_worker: bool) -> str | None:
    """Start a detached worker when none runs (unless asked not to); the line to print."""
    from .jobs.worker import running_worker, start_detached

    if running_worker(store) is not None:
        return None
    if no_worker:
        return f"no worker runs on {store.path}: start one with `mmnb worker --store {store.path}`"
    job = start_detached(store)
    return f"started a worker (process {job.pid}; it exits after 60 s with nothing to do)"


# ---- --detach ----
def detach_command(args: argparse.Namespace) -> int:
    """`mmnb train|resume|branch … --detach`: start it as a process of its own and return."""
    from .jobs import commands, detach
    from .jobs.queue import Queue

    store = _store(args.store)
    taken = Queue(store).taken_names() if (store.path / "queue.sqlite").is_file() else set()
    job_command = commands.from_args(args.command, args, store, taken=taken)
    job = detach.detach(store, job_command)
    print(detach.started_line(job_command, job, "mmnb watch"))
    return 0


# ---- queue ----
def _queue_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    add = sub.add_parser("add", help="queue a train, resume or branch command")
    job_options(add)
    add.add_argument("--store", help=STORE_HELP)
    add.add_argument("--no-worker", action="store_true", help="do not start a worker")
    add.add_argument("job", nargs=argparse.REMAINDER, metavar="train|resume|branch ARGS")
    ls = sub.add_parser("ls", help="list the jobs with their progress")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("--store", help=STORE_HELP)
    cancel = sub.add_parser("cancel", help="cancel jobs (a running one stops, checkpointed)")
    cancel.add_argument("ids", nargs="+", type=int, metavar="ID")
    cancel.add_argument("--store", help=STORE_HELP)
    move = sub.add_parser("move", help="reorder a queued job")
    move.add_argument("id", type=int, metavar="ID")
    where = move.add_mutually_exclusive_group(required=True)
    where.add_argument("--before", type=int, metavar="ID2", help="put it before job ID2")
    where.add_argument("--first", action="store_true", help="put it first")
    move.add_argument("--store", help=STORE_HELP)
    clear = sub.add_parser("clear", help="forget ended jobs (their runs stay)")
    clear.add_argument("--store", help=STORE_HELP)


def job_options(p: argparse.ArgumentParser) -> None:
    """The queue's options of a job (shared by `mmnb queue add` and `%queue add`)."""
    p.add_argument(
        "--after", type=int, action="append", default=[], metavar="ID", help="wait for job ID"
    )
    p.add_argument(
        "--max-restarts", type=int, default=0, help="restart a crashed job up to K times"
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        help="restart the job when its stream shows no progress for this many seconds",
    )
    p.add_argument(
        "--restart-delay", type=float, default=2.0, help="first back-off before a restart (s)"
    )


def add_job(store_path: str | None, args: argparse.Namespace) -> tuple[Any, Any]:
    """Parse and queue `args.job`; return (store, queued job). Shared with `%queue add`."""
    from .jobs import commands
    from .jobs.queue import Queue

    verb, tokens = commands.split(args.job)
    own = commands.parser_for(verb).parse_args(tokens).store  # the command's own --store
    if store_path and own and Path(store_path).resolve() != Path(own).resolve():
        raise ValueError(f"two stores given: --store {store_path} and the command's {own}")
    store = _store(store_path or own)
    queue = Queue(store)
    job_command = commands.parse(verb, tokens, store, taken=queue.taken_names())
    job = queue.add(
        job_command,
        after=args.after,
        max_restarts=args.max_restarts,
        stall_timeout=args.stall_timeout,
        restart_delay=args.restart_delay,
    )
    return store, job


@command("queue", "the job queue of a store: add, ls, cancel, move, clear", _queue_args)
def queue_command(args: argparse.Namespace) -> int:
    from .jobs.queue import Queue
    from .jobs.watch import format_jobs, job_rows
    from .store import jsonio

    if args.verb == "add":
        store, job = add_job(args.store, args)
        print(f"queued job {job.id}: {job.command.text()}")
        line = _ensure_worker(store, args.no_worker)
        if line:
            print(line)
        return 0
    store = _store(args.store)
    if args.verb == "ls" and not (store.path / "queue.sqlite").is_file():
        print("[]" if args.json else "the queue is empty")
        return 0
    with Queue(store) as queue:
        if args.verb == "ls":
            rows = job_rows(queue)
            print(jsonio.dumps(rows, indent=2) if args.json else format_jobs(rows))
        elif args.verb == "cancel":
            for job_id in args.ids:
                job = queue.cancel(job_id)
                print(
                    f"job {job.id}: stopping at its next step (checkpointed)"
                    if job.state == "running"
                    else f"job {job.id}: {job.state}"
                )
                if job.state == "running":
                    _stop_now(store, job)
        elif args.verb == "move":
            queue.move(args.id, before=args.before, first=args.first)
            print(format_jobs([r for r in job_rows(queue) if r["state"] == "queued"]))
        else:
            print(f"forgot {queue.clear()} ended job(s)")
    return 0


def _stop_now(store: Any, job: Any) -> None:
    """Ask a running job's process to stop (the worker records the end, or the next one)."""
    from .jobs import control

    if job.run is not None and (store.path / job.run).is_dir():
        control.send(store.path / job.run, "stop")


# ---- worker ----
def _worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--slots", type=int, default=1, help="processes to run at once (default 1)")
    p.add_argument(
        "--exit-when-idle",
        type=float,
        metavar="SECONDS",
        help="exit after this long with nothing to run (default: run until stopped)",
    )
    p.add_argument("--poll", type=float, default=0.2, help=argparse.SUPPRESS)
    p.add_argument(
        "--stop",
        action="store_true",
        help="stop the store's worker (its jobs checkpoint and wait in the queue)",
    )


@command("worker", "run the store's queued jobs (one worker per store)", _worker_args)
def worker_command(args: argparse.Namespace) -> int:
    from .jobs.worker import Worker, stop_worker

    if args.stop:
        stopped = stop_worker(_store(args.store))
        print("worker stopped" if stopped else "no worker runs on this store")
        return 0

    def log(text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)

    Worker(
        _store(args.store).path,
        slots=args.slots,
        poll=args.poll,
        idle_exit=args.exit_when_idle,
        log=log,
    ).run()
    return 0


# ---- pipeline ----
def _pipeline_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    run = sub.add_parser("run", help="queue the stages that are not done yet")
    run.add_argument("file", metavar="FILE", help="the pipeline's TOML file")
    run.add_argument("--store", help=STORE_HELP)
    run.add_argument("--no-worker", action="store_true", help="do not start a worker")
    run.add_argument("--wait", action="store_true", help="wait until its jobs have ended")
    status = sub.add_parser("status", help="where each stage stands")
    status.add_argument("file", metavar="FILE")
    status.add_argument("--store", help=STORE_HELP)


@command("pipeline", "staged training from a TOML file: run, status", _pipeline_args)
def pipeline_command(args: argparse.Namespace) -> int:
    from .jobs import pipeline

    store = _store(args.store).full()
    spec = pipeline.load(args.file)
    if args.verb == "status":
        print(pipeline.format_status(pipeline.status(spec, store)))
        return 0
    actions = pipeline.run(spec, store)
    print(pipeline.format_status(actions, key="action"))
    line = _ensure_worker(store, args.no_worker)
    if line:
        print(line)
    if args.wait:
        return wait_for_jobs(store, [a["job"] for a in actions if a["job"] is not None])
    return 0


def wait_for_jobs(store: Any, ids: list[int], poll: float = 0.5) -> int:
    """Wait until the jobs `ids` have ended; 0 when all are done, 1 otherwise."""
    from .jobs.queue import ENDED, Queue

    with Queue(store) as queue:
        while True:
            jobs = [queue.get(i) for i in ids]
            if all(j.state in ENDED for j in jobs):
                break
            time.sleep(poll)
    for job in jobs:
        print(f"job {job.id} ({job.run}): {job.state}" + (f": {job.note}" if job.note else ""))
    return 0 if all(j.state == "done" for j in jobs) else 1


# ---- watch ----
def _watch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", metavar="RUN", help="run (default: a running job's run)")
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--once", action="store_true", help="print where it stands and exit")


@command("watch", "live progress of a run trained anywhere (its event stream)", _watch_args)
def watch_command(args: argparse.Namespace) -> int:
    from .events import progress
    from .jobs.attach import Attachment, appeared
    from .jobs.watch import progress_line
    from .progress import ConsoleProgress

    store = _store(args.store).full()
    name = args.name or _default_watch(store)
    run = appeared(store, name)  # a job just started may not have created it yet
    if args.once:
        p = progress(run.path)
        print(progress_line(run.name, p) if p else f"run {run.name}: no event stream yet")
        return 0
    bar = ConsoleProgress()
    attachment = Attachment(run, bar, keep_following=lambda: _queued(store, run.name))
    attachment.replay()
    try:
        attachment.follow_here()
    except KeyboardInterrupt:
        print("stopped watching (the run goes on)", file=sys.stderr)
        return 130
    finally:
        bar.close()
    p = progress(run.path)
    if p is not None:
        print(progress_line(run.name, p))
    return 0


def _default_watch(store: Any) -> str:
    from .jobs.queue import Queue

    if (store.path / "queue.sqlite").is_file():
        with Queue(store) as queue:
            running = [j for j in queue.jobs(["running"]) if j.run]
        if running:
            return running[0].run
    return store.newest().name


def _queued(store: Any, run: str) -> bool:
    """Does a queued or running job still write `run` (so a watcher should wait for it)?"""
    from .jobs.queue import Queue

    if not (store.path / "queue.sqlite").is_file():
        return False
    with Queue(store) as queue:
        return any(j.run == run for j in queue.jobs(["queued", "running"]))
