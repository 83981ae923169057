"""IPython connectivity for jobs: %attach, %queue, %pipeline and `--detach` (mmnb.jobs).

Registered by `mmnb.magics.load_ipython_extension` next to %train and friends; like them, each
magic parses its line (with the CLI's own option tables and parsers) and calls the engine.

- `%train … --detach` (and `%resume … --detach`, with or without `--branch`) starts the training
  as a process of its own and returns at once: it survives a kernel restart or shutdown.
- `%attach RUN` shows the live dashboard of a run trained anywhere — a detached or queued job,
  another kernel — fed from the run's event stream; its Stop and Checkpoint-now buttons act
  through the run's control channel. After a restart, `%attach RUN` again. `--wait` blocks until
  the session has ended (Kernel → Interrupt stops the waiting, not the run).
- `%queue [add|ls|cancel|move|clear] …` is `mmnb queue …`; `%queue add` and `%pipeline` start a
  detached worker when none runs. `%queue` alone lists the queue (and, in a kernel, shows the
  history browser's queue tab).
- `%pipeline FILE` queues a TOML pipeline's missing stages (`mmnb pipeline run`).
"""

from __future__ import annotations

import argparse
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import (
    MagicArgumentParser,
    argument,
    magic_arguments,
    parse_argstring,
)

from .cli import user_errors, user_message


def _usage(err: BaseException) -> UsageError:
    return UsageError(user_message(err))


def detach_from_magic(verb: str, args: argparse.Namespace, store: Any) -> Any:
    """`%train/%resume … --detach`: start the command as a detached job; return its handle."""
    from .jobs import commands, detach
    from .jobs.queue import Queue

    if getattr(args, "background", False):
        raise UsageError("--detach and --background: choose one")
    try:
        taken = Queue(store).taken_names() if (store.path / "queue.sqlite").is_file() else set()
        command = commands.from_args(verb, args, store, taken=taken)
        job = detach.detach(store, command)
    except user_errors() as err:
        raise _usage(err) from None
    print(detach.started_line(command, job, "%attach"))
    return job


@magics_class
class JobMagics(Magics):
    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.attachments: list[Any] = []  # followers feeding dashboards of this kernel

    # ---- %attach ----
    @magic_arguments()
    @argument(
        "name", nargs="?", metavar="RUN", help="run (default: a running job's run, else the newest)"
    )
    @argument("--store", help="store folder (default $MMNB_STORE or ./mmnb-runs)")
    @argument("--wait", action="store_true", help="block until its training session has ended")
    @argument("--timeout", type=float, help="with --wait: stop waiting after this many seconds")
    @line_magic
    def attach(self, line: str) -> None:
        """Show the live dashboard of a run trained in another process (detached, queued, another
        kernel) — after a kernel restart too. Stop and Checkpoint now act on it."""
        from .jobs.attach import Attachment, appeared
        from .store import Store

        args = parse_argstring(self.attach, line)
        store = Store(args.store)
        try:
            name = args.name or _default_run(store)
            run = appeared(store, name)
        except user_errors() as err:
            raise _usage(err) from None
        if getattr(self.shell, "kernel", None) is None:
            return self._attach_here(store, run, args)
        from .widgets import Dashboard

        dashboard = Dashboard(run.name).show()
        attachment = Attachment(run, dashboard, keep_following=lambda: _queued(store, run.name))
        dashboard.attach(attachment.remote)  # its buttons act through the control channel
        attachment.replay()
        attachment.start()  # the thread only updates widget traits, never prints
        self.attachments.append(attachment)
        if args.wait:
            dashboard.serve_clicks()
            ended = attachment.wait(args.timeout)
            dashboard.freeze()
            if not ended:
                print(f"stopped waiting after {args.timeout:g}s; run {run.name} goes on")

    def _attach_here(self, store: Any, run: Any, args: argparse.Namespace) -> None:
        """Terminal IPython: where the run stands; with --wait, its progress bar until it
        ends, drawn by this thread (a background thread never prints)."""
        from .events import progress
        from .jobs.attach import Attachment
        from .jobs.watch import progress_line
        from .progress import ConsoleProgress

        if args.wait:
            bar = ConsoleProgress()
            attachment = Attachment(run, bar, keep_following=lambda: _queued(store, run.name))
            attachment.replay()
            try:
                ended = attachment.follow_here(args.timeout)
            finally:
                bar.close()
            if not ended:
                print(f"stopped waiting after {args.timeout:g}s; run {run.name} goes on")
        p = progress(run.path)
        print(progress_line(run.name, p) if p else f"run {run.name}: no event stream yet")

    # ---- %queue ----
    @magic_arguments()
    @argument("words", nargs=argparse.REMAINDER, help="add|ls|cancel|move|clear and arguments")
    @line_magic
    def queue(self, line: str) -> None:
        """The store's job queue, as `mmnb queue`:

        %queue                                    list the jobs (and the queue tab in a kernel)
        %queue add [--after ID] [--max-restarts K] [--stall-timeout S] train|resume|branch ARGS
        %queue cancel ID…    %queue move ID --before ID2    %queue clear
        `%queue add` starts a detached worker when none runs on the store.
        """
        from . import cli_jobs

        words = parse_argstring(self.queue, line).words or ["ls"]
        parser = MagicArgumentParser(prog="%queue")
        cli_jobs._queue_args(parser)
        args = parser.parse_args(words)
        try:
            if args.verb == "add":
                store, job = cli_jobs.add_job(args.store, args)
                print(f"queued job {job.id}: {job.command.text()}")
                started = cli_jobs._ensure_worker(store, args.no_worker)
                if started:
                    print(started)
                return
            if args.verb == "ls" and getattr(self.shell, "kernel", None) is not None:
                from IPython.display import display

                from .widgets.queue import QueueTab  # the table, pipelines, Refresh, Cancel

                display(QueueTab(cli_jobs._store(args.store).path))
                return
            cli_jobs.queue_command(args)
        except user_errors() as err:
            raise _usage(err) from None

    # ---- %pipeline ----
    @magic_arguments()
    @argument("file", metavar="FILE", help="the pipeline's TOML file")
    @argument("--store", help="store folder (default $MMNB_STORE or ./mmnb-runs)")
    @argument("--status", action="store_true", help="only show where each stage stands")
    @argument("--no-worker", action="store_true", help="do not start a worker")
    @argument("--wait", action="store_true", help="block until its jobs have ended")
    @line_magic
    def pipeline(self, line: str) -> None:
        """Queue the stages of a TOML pipeline that are not done yet (`mmnb pipeline run`):
        finished stages are reused, a stopped one continues, an edited one runs again."""
        from . import cli_jobs
        from .jobs import pipeline

        args = parse_argstring(self.pipeline, line)
        try:
            store = cli_jobs._store(args.store).full()
            spec = pipeline.load(args.file)
            if args.status:
                print(pipeline.format_status(pipeline.status(spec, store)))
                return
            actions = pipeline.run(spec, store)
            print(pipeline.format_status(actions, key="action"))
            started = cli_jobs._ensure_worker(store, args.no_worker)
            if started:
                print(started)
            if args.wait:
                cli_jobs.wait_for_jobs(store, [a["job"] for a in actions if a["job"]])
        except user_errors() as err:
            raise _usage(err) from None

    def close(self) -> None:
        for attachment in self.attachments:
            attachment.close()
        self.attachments.clear()


def _default_run(store: Any) -> str:
    from .jobs.queue import Queue

    if (store.path / "queue.sqlite").is_file():
        with Queue(store) as queue:
            running = [j.run for j in queue.jobs(["running"]) if j.run]
        if running:
            return running[0]
    return store.newest().name


def _queued(store: Any, run: str) -> bool:
    from .cli_jobs import _queued as queued

    return queued(store, run)
