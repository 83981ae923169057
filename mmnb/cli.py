"""`mmnb` on the command line: parse, call the Python API, render events. Nothing else.

mmnb train [RUN] [options]     new run (tiny preset on the bundled corpus by default)
mmnb resume [RUN] [--step N] [--epochs E | --more-epochs K]
mmnb branch RUN [--step N] [--name NEW] [overrides]
mmnb runs [--json]
mmnb generate [RUN] [--step N] [--prompt TEXT]
mmnb export RUN[@STEP] --format minimind|hf|safetensors --out PATH

Fast to answer: torch, h5py and the engine are imported inside the handlers, never at import
time, so `mmnb --help`, `mmnb train --help` and a mistyped flag take a fraction of a second.

Adding a subcommand: in its own small module, decorate a handler with `@command(name, help,
configure)` — `configure(parser)` adds its arguments, the handler gets the parsed arguments
and returns the exit code — and add the module's name to `COMMAND_MODULES`. Import heavy
modules inside the handler. A mistake the user can fix is raised as `ValueError`/`StoreError`
(`mmnb.validate.InvalidInput` names the flag): `main` prints it as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .options import (
    COMMON_OPTIONS,
    DIST_OPTIONS,
    INIT_OPTIONS,
    JOB_OPTIONS,
    RUN_OPTIONS,
    SAMPLE_OPTIONS,
    SESSION_OPTIONS,
    TRAIN_OPTIONS,
    Option,
    add_options,
    collect,
    flag_name,
)
from .validate import InvalidInput

if TYPE_CHECKING:
    from .store import Run

Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]  # adds the command's arguments
    handler: Handler


COMMANDS: dict[str, Command] = {}  # in the order `mmnb --help` lists them
# Modules that register more subcommands with @command when imported (kept torch-free at import).
COMMAND_MODULES: tuple[str, ...] = ("mmnb.cli_export", "mmnb.cli_jobs", "mmnb.cli_gc")


def command(
    name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]
) -> Callable[[Handler], Handler]:
    """Register `mmnb NAME`: its parser set-up and its handler, in one place."""

    def register(handler: Handler) -> Handler:
        COMMANDS[name] = Command(name, help, configure, handler)
        return handler

    return register


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message tells the user what to fix: one line, no traceback."""
    from .store import StoreError  # h5py: imported only once a command has failed

    return (ValueError, StoreError, FileNotFoundError)


def run_failures() -> tuple[type[BaseException], ...]:
    """Training that started and could not go on (disk full, non-finite loss): exit 1."""
    from .store import StoreWriteError
    from .train import NonFiniteError

    return (StoreWriteError, NonFiniteError)


def user_message(err: BaseException) -> str:
    """The one line for a user error; a refused value names the flag the user typed."""
    return err.render(flag_name) if isinstance(err, InvalidInput) else str(err)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line naming the problem; `--help` has the usage.
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = _Parser(
        prog="mmnb", description="Train MiniMind-style LLMs with exactly resumable checkpoints."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        cmd_parser = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(cmd_parser)
        cmd_parser.set_defaults(handler=cmd.handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if argv is None:  # the console (not a caller's process): a warning is one line, as errors
        warnings.showwarning = _one_line_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command is None:  # `mmnb` alone, or `mmnb --epochs 2`: train
        argv = ["train", *argv]
        args = parser.parse_args(argv)
    training = args.command in ("train", "resume", "branch")
    if training and getattr(args, "nproc", None) is not None:
        return _torchrun(args, argv)
    if training and getattr(args, "max_restarts", None) is not None:
        print("mmnb: error: --max-restarts needs --nproc (or torchrun's own)", file=sys.stderr)
        return 2
    rank = _rank()  # under torchrun only rank 0 prints
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        if not rank:
            print("interrupted; the last completed step is checkpointed", file=sys.stderr)
        return 130
    except Exception as err:
        if getattr(err, "reported_elsewhere", False):  # rank 0 of the job has said it
            return 2 if isinstance(err, user_errors()) else 1
        if isinstance(err, run_failures()):
            _error(rank, err, str(err))
            return 1
        if not isinstance(err, user_errors()):
            raise
        _error(rank, err, user_message(err))
        return 2


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def _error(rank: int, err: BaseException, text: str) -> None:
    """One line; a rank other than 0 names itself (rank 0 speaks for the job)."""
    where = f"[rank {rank}] " if rank else ""
    print(f"mmnb: error: {where}{text}", file=sys.stderr)


def _torchrun(args: argparse.Namespace, argv: list[str]) -> int:
    """`mmnb train --nproc N ...`: the same command in N processes, started by torchrun through
    `mmnb.launch` in this terminal's process group (Ctrl-C reaches torchrun and every rank,
    which stop together at the next step boundary with a checkpoint)."""
    from .dist import env_world, worker_argv
    from .launch import start

    if env_world()[1] > 1:
        print("mmnb: error: --nproc inside a torchrun job; drop it", file=sys.stderr)
        return 2
    if args.nproc < 1:
        print(f"mmnb: error: --nproc must be positive, got {args.nproc}", file=sys.stderr)
        return 2
    job = start(
        worker_argv(argv),
        logs=None,
        nproc=args.nproc,
        max_restarts=args.max_restarts or 0,
        detach=False,
    )
    interrupted = False
    while True:
        try:
            code = job.wait()  # on Ctrl-C keep waiting: the ranks are saving their step
            break
        except KeyboardInterrupt:
            interrupted = True
    return 130 if interrupted and code else int(code or 0)


_SHOW_WARNING = warnings.showwarning


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if not str(filename).startswith(os.path.dirname(__file__)):  # a library's: as Python shows it
        _SHOW_WARNING(message, category, filename, lineno, file, line)
        return
    print(f"mmnb: warning: {message}", file=file or sys.stderr)


def _without(options: list[Option], flag: str) -> list[Option]:
    return [o for o in options if o[0][0] != flag]


# ---- training commands ----
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", metavar="RUN", help="run name (default run-NNN)")
    add_options(p, TRAIN_OPTIONS)


def _resume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", metavar="RUN", help="run to resume (default: newest)")
    p.add_argument("--step", type=int, help="checkpoint to resume from (default: newest)")
    extend = p.add_mutually_exclusive_group()
    extend.add_argument("--epochs", type=int, help="extend the plan to E epochs in all")
    extend.add_argument("--more-epochs", type=int, help="extend the plan by K epochs")
    p.add_argument("--name", dest="new_name", help="name of the run an extension creates")
    add_options(p, SESSION_OPTIONS + COMMON_OPTIONS + DIST_OPTIONS + SAMPLE_OPTIONS + JOB_OPTIONS)


def _branch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="RUN", help="parent run")
    p.add_argument("--step", type=int, help="branch point (default: newest checkpoint)")
    p.add_argument("--name", dest="new_name", help="name of the new run")
    options = _without(RUN_OPTIONS, "--preset") + SESSION_OPTIONS + COMMON_OPTIONS
    add_options(p, options + DIST_OPTIONS + SAMPLE_OPTIONS + JOB_OPTIONS)


@command("train", "start a new run", _train_args)
def train_command(args: argparse.Namespace) -> int:
    from . import api

    if args.name and args.run_flag and args.name != args.run_flag:
        raise ValueError(f"two run names given: {args.name!r} and {args.run_flag!r}")
    options = collect(args, RUN_OPTIONS + INIT_OPTIONS + SESSION_OPTIONS)
    return _session(args, lambda common: api.train(args.name or args.run_flag, **common, **options))


@command("resume", "continue a run from the store alone", _resume_args)
def resume_command(args: argparse.Namespace) -> int:
    from . import api

    def call(common: dict[str, Any]) -> Run:
        return api.resume(
            args.name,
            step=args.step,
            epochs=args.epochs,
            more_epochs=args.more_epochs,
            name=args.new_name,
            **common,
            **collect(args, SESSION_OPTIONS),
        )

    return _session(args, call)


@command("branch", "new run from a checkpoint, with overrides", _branch_args)
def branch_command(args: argparse.Namespace) -> int:
    from . import api

    options = collect(args, RUN_OPTIONS + SESSION_OPTIONS)
    return _session(
        args, lambda common: api.branch(args.name, args.step, args.new_name, **common, **options)
    )


def _session(args: argparse.Namespace, call: Callable[[dict[str, Any]], Run]) -> int:
    """Train through `call(common keywords)`, with a console bar; print the saved state."""
    from .progress import ConsoleProgress

    if args.detach:  # a process of its own instead (mmnb.cli_jobs)
        from .cli_jobs import detach_command

        return detach_command(args)

    progress = ConsoleProgress()
    common: dict[str, Any] = {"store": args.store, "listeners": [progress]}
    if args.device:
        common["device"] = args.device
    if getattr(args, "shard", False):
        common["shard"] = True
    try:
        run = call(common)
    finally:
        progress.close()
    if _rank():  # rank 0 reports for the job
        return 0
    print(summary_line(run))
    print(f"store: {run.run_file}")
    if not args.no_sample:
        print("sample:", sample_text(run, args))
    return 0


def summary_line(run: Run) -> str:
    """What the store now holds for `run`: its newest checkpoint's step, loss and lr."""
    latest = run.latest()
    if latest is None:
        return f"run {run.name}: no checkpoint, status {run.status()}"
    parts = [f"run {run.name}: step {latest.step}"]
    if latest.loss is not None:
        parts.append(f"loss {latest.loss:.4f}")
    if latest.lr is not None:
        parts.append(f"lr {latest.lr:.2e}")
    return ", ".join(parts) + f", status {run.status()}"


def sample_text(run: Run, args: argparse.Namespace, step: int | None = None) -> str:
    """A sample from `run`'s checkpoint with the SAMPLE_OPTIONS in `args` (CLI and magics).

    After training on conversations (SFT) the automatic sample is a chat answer to the first
    question of the training data, not a continuation of nothing.
    """
    from . import api

    prompt, chat = getattr(args, "prompt", None), getattr(args, "chat", False)
    if prompt is None:  # the automatic sample after training
        question = chat_question(run)
        prompt, chat = (question, True) if question is not None else ("", False)
    model, tokenizer = api.load_model(run, step)
    return api.generate(
        model,
        tokenizer,
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.sample_seed,
        chat=chat,
    )


def chat_question(run: Run) -> str | None:
    """The first user message of `run`'s training data when it is a chat (SFT) set."""
    from .data import resolve_data_path

    data = run.config_dict()["train"].get("data")
    if data is None:
        return None
    try:
        path = resolve_data_path(data)
        if path.suffix.lower() != ".jsonl" or not path.is_file():
            return None
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    break
            else:
                return None
    except (OSError, ValueError):
        return None
    messages = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(messages, list):
        return None
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else None
    return None


# ---- reading commands ----
def _runs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_options(p, COMMON_OPTIONS[:1])


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", metavar="RUN", help="run (default: newest)")
    p.add_argument("--step", type=int, help="checkpoint (default: newest)")
    p.add_argument("--prompt", default="", help="text to continue (only the new text is printed)")
    p.add_argument("--chat", action="store_true", help="treat the prompt as a user message")
    add_options(p, _without(SAMPLE_OPTIONS, "--no-sample") + COMMON_OPTIONS[:1])


@command("runs", "list the runs of a store", _runs_args)
def runs_command(args: argparse.Namespace) -> int:
    from .store import Store, StoreError, jsonio
    from .validate import check_store

    store = Store(args.store)
    check_store(store.path, write=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = store.runs()
    problems = [str(w.message) for w in caught]
    rows = []
    for run in runs:  # a damaged run is named and skipped; the others are listed
        try:
            rows.append(run_summary(run))
        except StoreError as err:
            problems.append(f"{err}; skipping run {run.name}")
    for text in problems:
        print(f"mmnb: warning: {text}", file=sys.stderr)
    if args.json:
        print(jsonio.dumps({"store": str(store.path), "runs": rows}, indent=2))
        return 0
    if not rows:
        print(f"no runs in {store.path}")
        return 0
    for row in rows:
        parent = f" <- {row['parent']['run']}@{row['parent']['step']}" if row["parent"] else ""
        steps = row["steps"]
        shown = ", ".join(map(str, steps[:8])) + (", …" if len(steps) > 8 else "")
        print(f"{row['name']}{parent}  [{row['status']}]  steps: {shown}  ({row['file']})")
    return 0


@command("generate", "sample text from a checkpoint (prints only the new text)", _generate_args)
def generate_command(args: argparse.Namespace) -> int:
    from .store import Store
    from .validate import check_sampling, check_store

    check_sampling(args.max_new_tokens, args.temperature, args.top_p)  # before loading weights
    store = Store(args.store)
    check_store(store.path, write=False)
    run = store.run(args.name) if args.name else store.newest()
    print(sample_text(run, args, step=args.step))
    return 0


def run_summary(run: Run) -> dict[str, Any]:
    steps = run.steps()
    parent = run.parent
    return {
        "name": run.name,
        "file": str(run.run_file),
        "parent": {"run": parent[0], "step": parent[1]} if parent else None,
        "status": run.status(),
        "steps": [s.step for s in steps],
        "latest": steps[-1].step if steps else None,
        "loss": steps[-1].loss if steps else None,
    }


if __name__ == "__main__":
    sys.exit(main())
