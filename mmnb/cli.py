"""`mmnb` on the command line: parse, call the Python API, render events. Nothing else.

mmnb train [RUN] [options]     new run (tiny preset on the bundled corpus by default)
mmnb resume [RUN] [--step N] [--epochs E | --more-epochs K]
mmnb branch RUN [--step N] [--name NEW] [overrides]
mmnb runs [--json]
mmnb generate [RUN] [--step N] [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from . import api
from .data import DataError
from .options import (
    COMMON_OPTIONS,
    RUN_OPTIONS,
    SAMPLE_OPTIONS,
    SESSION_OPTIONS,
    TRAIN_OPTIONS,
    add_options,
    collect,
)
from .progress import ConsoleProgress
from .store import Run, Store, StoreError, StoreWriteError, jsonio
from .train import NonFiniteError

USER_ERRORS = (ValueError, StoreError, DataError, FileNotFoundError)
# Training that started and could not go on: exit 1, not 2 (a usage error).
RUN_FAILURES = (StoreWriteError, NonFiniteError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line naming the problem; `--help` has the usage.
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mmnb", description="Train MiniMind-style LLMs with exactly resumable checkpoints."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="start a new run")
    train.add_argument("name", nargs="?", metavar="RUN", help="run name (default run-NNN)")
    add_options(train, TRAIN_OPTIONS)

    resume = sub.add_parser("resume", help="continue a run from the store alone")
    resume.add_argument("name", nargs="?", metavar="RUN", help="run to resume (default: newest)")
    resume.add_argument("--step", type=int, help="checkpoint to resume from (default: newest)")
    extend = resume.add_mutually_exclusive_group()
    extend.add_argument("--epochs", type=int, help="extend the plan to E epochs in all")
    extend.add_argument("--more-epochs", type=int, help="extend the plan by K epochs")
    resume.add_argument("--name", dest="new_name", help="name of the run an extension creates")
    add_options(resume, SESSION_OPTIONS + COMMON_OPTIONS + SAMPLE_OPTIONS)

    branch = sub.add_parser("branch", help="new run from a checkpoint, with overrides")
    branch.add_argument("name", metavar="RUN", help="parent run")
    branch.add_argument("--step", type=int, help="branch point (default: newest checkpoint)")
    branch.add_argument("--name", dest="new_name", help="name of the new run")
    add_options(
        branch,
        _without(RUN_OPTIONS, "--preset") + SESSION_OPTIONS + COMMON_OPTIONS + SAMPLE_OPTIONS,
    )

    runs = sub.add_parser("runs", help="list the runs of a store")
    runs.add_argument("--json", action="store_true", help="machine-readable output")
    add_options(runs, COMMON_OPTIONS[:1])

    gen = sub.add_parser("generate", help="sample text from a checkpoint")
    gen.add_argument("name", nargs="?", metavar="RUN", help="run (default: newest)")
    gen.add_argument("--step", type=int, help="checkpoint (default: newest)")
    gen.add_argument("--prompt", default="", help="text to continue")
    gen.add_argument("--chat", action="store_true", help="treat the prompt as a user message")
    add_options(gen, _without(SAMPLE_OPTIONS, "--no-sample") + COMMON_OPTIONS[:1])
    return parser


def _without(options: list, flag: str) -> list:
    return [o for o in options if o[0][0] != flag]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["train", *(argv or [])])
    progress = ConsoleProgress()
    try:
        return _dispatch(args, progress)
    except KeyboardInterrupt:
        progress.close()
        print("interrupted; the last completed step is checkpointed", file=sys.stderr)
        return 130
    except RUN_FAILURES as err:
        progress.close()
        print(f"mmnb: error: {err}", file=sys.stderr)
        return 1
    except USER_ERRORS as err:
        progress.close()
        print(f"mmnb: error: {err}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace, progress: ConsoleProgress) -> int:
    common = {"store": args.store, "listeners": [progress]} if args.command != "runs" else {}
    if getattr(args, "device", None):
        common["device"] = args.device
    if args.command == "train":
        if args.name and args.run_flag and args.name != args.run_flag:
            raise ValueError(f"two run names given: {args.name!r} and {args.run_flag!r}")
        options = collect(args, RUN_OPTIONS + SESSION_OPTIONS)
        run = api.train(args.name or args.run_flag, **common, **options)
    elif args.command == "resume":
        run = api.resume(
            args.name,
            step=args.step,
            epochs=args.epochs,
            more_epochs=args.more_epochs,
            name=args.new_name,
            **common,
            **collect(args, SESSION_OPTIONS),
        )
    elif args.command == "branch":
        run = api.branch(
            args.name,
            args.step,
            args.new_name,
            **common,
            **collect(args, RUN_OPTIONS + SESSION_OPTIONS),
        )
    elif args.command == "runs":
        return _list_runs(Store(args.store), args.json)
    else:  # generate
        store = Store(args.store)
        run = store.run(args.name) if args.name else store.newest()
        completion = sample_text(run, args, step=args.step)
        print(completion if args.chat else args.prompt + completion)
        return 0
    progress.close()
    latest = run.latest()
    print(f"run {run.name}: step {latest.step}, loss {latest.loss:.4f}, status {run.status()}")
    print(f"store: {run.run_file}")
    if not args.no_sample:
        print("sample:", sample_text(run, args))
    return 0


def sample_text(run: Run, args: argparse.Namespace, step: int | None = None) -> str:
    """A sample from `run`'s checkpoint with the SAMPLE_OPTIONS in `args` (CLI and magics)."""
    model, tokenizer = api.load_model(run, step)
    return api.generate(
        model,
        tokenizer,
        getattr(args, "prompt", ""),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.sample_seed,
        chat=getattr(args, "chat", False),
    )


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


def _list_runs(store: Store, as_json: bool) -> int:
    rows = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = store.runs()
    problems = [str(w.message) for w in caught]
    for run in runs:  # a damaged run is reported and skipped; the others are listed
        try:
            rows.append(run_summary(run))
        except StoreError as err:
            problems.append(f"{err}; skipping run {run.name}")
    for text in problems:
        print(f"mmnb: warning: {text}", file=sys.stderr)
    if as_json:
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


if __name__ == "__main__":
    sys.exit(main())
