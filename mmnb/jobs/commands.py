"""A job's command: `mmnb train|resume|branch ARGS`, checked at once, with its run named.

Detached jobs and queued jobs run exactly what a terminal would (`python -m mmnb VERB ARGS`),
so both are checked with the CLI's own parser when they are created — a bad flag is one line
then, not a failed job later — and rewritten to a canonical argument list: the run a `train`
or `branch` creates is named now (so `%attach NAME` and the queue know it before it exists),
and the store is an absolute path (the job may start elsewhere).

`retry_argv()` is what a restart runs: `resume RUN` with the session options of the original
once the run exists (a train or branch that already created its run must not create it again),
the original command otherwise.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VERBS = ("train", "resume", "branch")
# Flags that only decide how a job is started, never passed to the job's own command line.
LAUNCH_DESTS = ("detach", "background", "status", "stop", "help")
# Options a restart passes on to `mmnb resume` (they shape a session, not the trajectory).
RESUME_DESTS = (
    *("store", "device", "save_every", "stop_at", "time_budget", "keep_last", "keep_every"),
    "async_save",
    *("log_every", "on_anomaly", "spike_factor", "max_rollbacks", "rollback_lr_scale"),
    *("no_sample", "max_new_tokens", "temperature", "top_p", "sample_seed"),
)


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(f"mmnb {self.prog.split()[-1]}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        raise ValueError(message or f"mmnb {self.prog}: exit {status}")


def parser_for(verb: str) -> argparse.ArgumentParser:
    """The CLI's parser of `mmnb VERB`, raising ValueError instead of exiting."""
    from .. import cli

    cli.build_parser()  # registers every command module
    if verb not in VERBS or verb not in cli.COMMANDS:
        raise ValueError(f"a job runs one of {', '.join(VERBS)}, not {verb!r}")
    parser = _RaisingParser(prog=f"mmnb {verb}", add_help=False)
    cli.COMMANDS[verb].configure(parser)
    return parser


def to_argv(parser: argparse.ArgumentParser, args: argparse.Namespace, skip=()) -> list[str]:
    """The arguments that make `parser` parse back to `args` (defaults left out)."""
    positional: list[str] = []
    options: list[str] = []
    for action in parser._actions:
        dest = action.dest
        if dest in skip or dest in LAUNCH_DESTS or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if not action.option_strings:
            if value is not None:
                positional.append(str(value))
            continue
        if value is None or value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            options.append(flag if value else "--no-" + flag[2:])
        elif action.nargs == 0:  # store_true / store_const
            options.append(flag)
        elif isinstance(value, list):
            for item in value:
                options += [flag, str(item)]
        else:
            options += [flag, str(value)]
    return positional + options


@dataclass
class JobCommand:
    """`mmnb VERB ARGV`, checked; `run` is the run it writes (None: decided when it runs)."""

    verb: str
    argv: list[str]
    run: str | None
    nproc: int = 1
    session: list[str] = field(default_factory=list)  # what a restart passes to `resume`
    extends: bool = False  # a resume with --epochs/--more-epochs
    cwd: str | None = None  # where it was asked for: relative paths (--data …) mean the same

    def to_dict(self) -> dict[str, Any]:
        return {
            "verb": self.verb,
            "argv": self.argv,
            "run": self.run,
            "nproc": self.nproc,
            "session": self.session,
            "extends": self.extends,
            "cwd": self.cwd,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobCommand:
        return cls(
            verb=str(data["verb"]),
            argv=[str(a) for a in data["argv"]],
            run=None if data.get("run") is None else str(data["run"]),
            nproc=int(data.get("nproc", 1)),
            session=[str(a) for a in data.get("session", [])],
            extends=bool(data.get("extends", False)),
            cwd=None if data.get("cwd") is None else str(data["cwd"]),
        )

    def text(self) -> str:
        return " ".join(["mmnb", self.verb, *self.argv])

    def retry_argv(self, run_exists: bool) -> list[str]:
        """The command line of a restart (see the module's docstring)."""
        if run_exists and self.run is not None and self.verb != "resume":
            return ["resume", self.run, *self.session]
        return [self.verb, *self.argv]


def parse(
    verb: str,
    tokens: Sequence[str],
    store: Any,
    *,
    taken: set[str] = frozenset(),
) -> JobCommand:
    """Check `mmnb VERB TOKENS` and make it a JobCommand for `store`; `taken` holds run names
    that queued jobs will create (a new name avoids them too)."""
    return from_args(verb, parser_for(verb).parse_args(list(tokens)), store, taken=taken)


def from_args(
    verb: str, args: argparse.Namespace, store: Any, *, taken: set[str] = frozenset()
) -> JobCommand:
    """A JobCommand from the parsed arguments of `mmnb VERB` (the CLI's `--detach`)."""
    from ..store.confine import check_run_name

    parser = parser_for(verb)
    args = argparse.Namespace(**vars(args))
    args.store = str(Path(store.path).resolve())
    existing = run_names(Path(store.path))
    names = existing | set(taken)

    def free(name: str) -> None:
        if name in existing:
            raise ValueError(f"run {name!r} already exists in store {store.path}")
        if name in taken:
            raise ValueError(f"run {name!r} is already the run of a queued job")

    run: str | None
    if verb == "train":
        if args.name and getattr(args, "run_flag", None) and args.name != args.run_flag:
            raise ValueError(f"two run names given: {args.name!r} and {args.run_flag!r}")
        run = args.name or getattr(args, "run_flag", None) or _new_name(names, "run")
        args.name, args.run_flag = run, None
        check_run_name(run)
        free(run)
    elif verb == "branch":
        check_run_name(args.name)
        run = args.new_name or _new_name(names, f"{args.name}-b")
        args.new_name = run
        check_run_name(run)
        free(run)
    else:
        if args.name is None:
            from ..store import Store, StoreError

            try:
                args.name = Store(store.path).newest().name
            except StoreError:
                raise ValueError("give the run to resume (the store has none yet)") from None
        check_run_name(args.name)
        run = args.name
    _check_values(verb, args)
    argv = to_argv(parser, args)
    session = to_argv(parser, argparse.Namespace(**_only(args, RESUME_DESTS)))
    extends = verb == "resume" and (args.epochs is not None or args.more_epochs is not None)
    nproc = int(getattr(args, "nproc", None) or 1)
    return JobCommand(verb, argv, run, nproc, session, extends=extends, cwd=os.getcwd())


def _check_values(verb: str, args: argparse.Namespace) -> None:
    """The values a job's config will be built from, checked now by the one validator (the
    flag is named; `mmnb.validate`). A branch's overrides are checked against its parent when
    it runs: the parent may not exist yet."""
    from ..config import parse_duration, resolve
    from ..options import INIT_OPTIONS, RUN_OPTIONS, SESSION_OPTIONS, collect

    values = collect(args, SESSION_OPTIONS)
    if "time_budget" in values:
        values["time_budget"] = parse_duration(values["time_budget"])
    if verb == "train" and getattr(args, "init_from", None) is None:
        values.update(collect(args, RUN_OPTIONS + INIT_OPTIONS))
        resolve(values.pop("preset", None) or "tiny", **values)
    else:
        resolve("tiny", **values)


def run_names(folder: Path) -> set[str]:
    """Names of the runs in a store folder, without opening any of them."""
    from ..store.confine import RUN_NAME

    if not folder.is_dir():
        return set()
    return {
        p.name
        for p in folder.iterdir()
        if RUN_NAME.match(p.name) and not p.is_symlink() and (p / "run.h5").is_file()
    }


def _only(args: argparse.Namespace, dests: Sequence[str]) -> dict[str, Any]:
    return {d: getattr(args, d) for d in dests if hasattr(args, d)}


def _new_name(taken: set[str], prefix: str) -> str:
    n = 1
    while f"{prefix}-{n:03d}" in taken:
        n += 1
    return f"{prefix}-{n:03d}"


def split(line: Sequence[str]) -> tuple[str, list[str]]:
    """`['train', 'a', '--epochs', '2']` → ('train', ['a', '--epochs', '2'])."""
    if not line:
        raise ValueError(f"give the command to run: {' | '.join(VERBS)} and its arguments")
    verb, *rest = line
    if verb not in VERBS:
        raise ValueError(f"a job runs one of {', '.join(VERBS)}, not {verb!r}")
    return verb, list(rest)


def job_env(job_id: int | str | None = None, recovery: str | None = None) -> dict[str, str]:
    """Environment of a job process: who it runs for, and why it was (re)started."""
    from .session import JOB_ENV, RECOVERY_ENV

    env = {"PYTHONUNBUFFERED": "1"}
    if job_id is not None:
        env[JOB_ENV] = str(job_id)
    if recovery is not None:
        env[RECOVERY_ENV] = recovery
    return env
