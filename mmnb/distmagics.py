"""IPython connectivity for distributed training: `%train … --nproc N`, `%resume … --nproc N`.

The kernel never joins the process group. It starts the same torchrun job the CLI would
(`mmnb.launch`, its own process group, output in `<store>/.jobs/kernel/<run>-<time>/`) and
blocks the cell while it runs:

- progress: rank 0's events from the run's live event stream (`mmnb.events`, followed by
  `mmnb.jobs.attach.Attachment`) feed the dashboard (or the notebook/console progress where no
  widgets render) — never the job's output;
- Kernel → Interrupt and the dashboard's Stop send SIGINT to the group (torchrun's agent and
  every rank); the ranks agree at the next optimizer-step boundary, checkpoint it together and
  exit; the cell then says where, and re-raises KeyboardInterrupt so "Run All" stops here;
- a job that fails shows its exit status and the last lines of every failing rank's stderr
  (torchrun's `--tee` prefixes each rank's lines, and writes them per rank under `ranks/`).

The job outlives a kernel restart (its own session): `%attach RUN` follows it again.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import time
from typing import Any

from IPython.core.error import UsageError

from .cli import user_errors, user_message

KERNEL_JOBS = "kernel"  # <store>/.jobs/kernel/<run>-<time>/: logs of the jobs kernels start
TAIL = 12  # stderr lines shown per failing rank
_RANK_LINE = re.compile(r"^\[default(\d+)\]:(.*)$")
_FAILED_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)")


class GroupStop:
    """What a dashboard's Stop and Checkpoint buttons act on for a torchrun job: Stop is SIGINT
    to the whole group, Checkpoint goes through the run's control channel (rank 0 asks, every
    rank writes at the next step boundary)."""

    def __init__(self, job: Any, remote: Any) -> None:
        self.job, self.remote = job, remote
        self.trainer = self  # the dashboard calls run.trainer.stop()/request_checkpoint()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.remote, name)

    def stop(self, wait: bool = False) -> GroupStop:
        self.job.signal(signal.SIGINT)
        return self

    def request_checkpoint(self, tags: list[str] = ()) -> Any:
        return self.remote.trainer.request_checkpoint(tags)


def train_group(
    magics: Any, verb: str, args: argparse.Namespace, store: Any, name: str | None
) -> Any:
    """`%train/%resume … --nproc N` for `mmnb.magics`: the display, the job, what the cell says.

    `args` are as the CLI's parser of `mmnb VERB` has them (the magic maps %resume's own)."""
    from .display import NotebookProgress
    from .progress import ConsoleProgress

    dashboard = magics._dashboard(name)
    in_place = magics._updates_in_place() and dashboard is None
    listener: Any = dashboard or NotebookProgress(show=in_place, run=name)
    console = None if (dashboard is not None or in_place) else ConsoleProgress()

    def feed(event: Any) -> None:
        listener(event)
        if console is not None:
            console(event)

    try:
        run = run_group(verb, args, store, feed, dashboard)
    except KeyboardInterrupt as err:
        if dashboard is not None:
            dashboard.freeze()
        if console is not None:
            console.close()
        print(interrupted_line(store, name_of(verb, args, store)))
        err._mmnb_short_traceback = True  # type: ignore[attr-defined]  # magics._short_tb
        raise
    except BaseException as err:
        if dashboard is not None:
            dashboard.discard() if dashboard.state == "waiting" else dashboard.fail(err)
        if console is not None:
            console.close()
        raise
    if console is not None:
        console.close()
    if dashboard is not None:
        dashboard.freeze()
    return run


def name_of(verb: str, args: argparse.Namespace, store: Any) -> str:
    """The run a job of `mmnb VERB args` writes (what `commands.from_args` named)."""
    return args.new_name if verb == "branch" else args.name


def run_group(
    verb: str,
    args: argparse.Namespace,
    store: Any,
    listener: Any,
    dashboard: Any | None,
) -> Any:
    """Start `mmnb VERB` (parsed `args`, as the CLI's parser has them) as a torchrun job of
    `args.nproc` processes, follow rank 0's events into `listener` until it ends; return the
    run. Raises KeyboardInterrupt after an interrupt (the group has checkpointed), UsageError
    for a mistake or a failed job (with the failing ranks' last stderr lines)."""
    from . import launch
    from .dist import worker_argv
    from .jobs import commands
    from .jobs.attach import Attachment
    from .jobs.queue import ensure_private, jobs_folder
    from .store import StoreError

    if getattr(args, "background", False):
        raise UsageError("--nproc trains in processes of their own; --background is not needed")
    if args.nproc < 1:
        raise UsageError(f"--nproc must be positive, got {args.nproc}")
    try:
        command = commands.from_args(verb, args, store)
    except user_errors() as err:
        raise UsageError(user_message(err)) from None
    # from_args named the run: the magic reports on it (and on an interrupt, where it stopped).
    if verb == "branch":
        args.new_name = command.run
    else:
        args.name = command.run
    job: Any = None
    running = lambda: job is not None and job.poll() is None  # noqa: E731  # follow while it runs
    attachment = None
    try:  # a run that exists already: follow only the session this job starts
        attachment = Attachment(store.run(command.run), listener, keep_following=running)
        attachment.skip()
    except StoreError:
        pass
    folder = jobs_folder(store) / KERNEL_JOBS
    ensure_private(folder)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}"
    logs = folder / f"{command.run or verb}-{stamp}"
    logs.mkdir()
    job = launch.start(
        worker_argv([command.verb, *command.argv]),
        logs=logs,
        nproc=args.nproc,
        max_restarts=args.max_restarts or 0,
        agent_args=["--tee", "3", "--log-dir", str(logs / "ranks")],
        env=commands.job_env(),
        cwd=command.cwd,
    )
    interrupted = following = False
    try:
        if attachment is None:
            run = _appeared(store, command.run, job)
            if run is not None:
                attachment = Attachment(run, listener, keep_following=running)
                attachment.replay()
        if attachment is not None:
            if dashboard is not None:
                dashboard.attach(GroupStop(job, attachment.remote))
                dashboard.serve_clicks()
            attachment.start()
            following = True
        while True:
            try:
                code = job.wait()
                break
            except KeyboardInterrupt:
                # Kernel → Interrupt: the group stops at the next boundary, with a checkpoint;
                # wait for that (a second interrupt only repeats the request).
                interrupted = True
                job.signal(signal.SIGINT)
    except KeyboardInterrupt:  # while waiting for the run to appear, or before following it
        job.signal(signal.SIGINT)
        job.wait()
        # The run may have appeared (and trained) meanwhile: its stream says how far.
        if attachment is None:
            with contextlib.suppress(StoreError):
                Attachment(store.run(command.run), listener).replay()
        elif not following:
            attachment.start()  # the job has ended: it feeds the rest of the stream and stops
        raise
    finally:
        if attachment is not None:
            attachment.ended.wait(2.0)  # the last events (stop, close) reach the display
            attachment.close()
    if interrupted:
        raise KeyboardInterrupt
    if code != 0:
        raise UsageError(failure_text(command.run, job, code))
    return store.run(command.run)


def _appeared(store: Any, name: str, job: Any) -> Any:
    """The run once the job has created it (None if the job ended first)."""
    from .store import StoreError

    while True:
        try:
            return store.run(name)
        except StoreError:
            if job.poll() is not None:
                return None
            time.sleep(0.1)


def failure_text(run: str, job: Any, code: int) -> str:
    """The job's exit status and the last stderr lines of each rank torchrun says failed."""
    lines = job.tail(400)
    failed = sorted({int(m.group(2)) for line in lines if (m := _FAILED_RANK.match(line))})
    by_rank: dict[int, list[str]] = {}
    for line in lines:
        m = _RANK_LINE.match(line)
        if m:
            by_rank.setdefault(int(m.group(1)), []).append(m.group(2))
    parts = [f"the torchrun job of run {run} failed (exit {code}); logs in {job.logs}"]
    for rank in failed or sorted(by_rank):
        tail = [t for t in by_rank.get(rank, []) if t.strip()][-TAIL:]
        if tail:
            parts.append(f"rank {rank}, last lines of its stderr:")
            parts += [f"  {t}" for t in tail]
    if len(parts) == 1:  # no rank said anything: torchrun's own last words
        parts += [f"  {t}" for t in lines[-TAIL:]]
    return "\n".join(parts)


def interrupted_line(store: Any, name: str) -> str:
    """Where the interrupted group's checkpoint is (what %train prints for one process)."""
    run = store.run(name)
    latest = run.latest()
    if latest is None:
        return f"interrupted before run {name} saved anything"
    return (
        f"interrupted: step {latest.step} of run {name} is checkpointed in {run.run_file} "
        f"(%resume {name} --nproc N continues it)"
    )


__all__ = ["GroupStop", "failure_text", "interrupted_line", "run_group", "train_group"]
