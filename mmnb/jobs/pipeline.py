"""Staged pipelines: a TOML file of stages, each a branch of the one before, run by the queue.

    name = "tinychat"                 # optional; default: the file's name
    [defaults]                        # optional: options of every stage
    max_steps = 200
    [[stage]]
    name = "pretrain"
    epochs = 2
    save_every = 50
    [[stage]]
    name = "sft"
    from = "pretrain"                 # default: the stage before; "pretrain@120": that step
    data = "chat"
    lr = 1e-3
    max_restarts = 2                  # job options: max_restarts, stall_timeout, restart_delay

A stage's options are the flags of `mmnb train` (the first stage) or `mmnb branch` (the others),
written with `_` or `-`; each stage is checked with the CLI's parser when the pipeline is read.

Every stage has a key: a hash of its definition (the options that shape its trajectory — not
`save_every`, `log_every`, retention or sampling) and of its parent's key and branch step. Its
run is `<pipeline>-<stage>-<key[:8]>`, so an edited stage gets a new run and the runs of the old
definition stay. `run()` enqueues what is missing, in order:
- a stage whose run reached its end (or its `stop_at`) is reused;
- one with a queued or running job is left to it;
- one whose run exists but stopped early (a crash, a cancel) is resumed from its checkpoint;
- otherwise it is queued: `train`, or `branch` of its parent's run, after the parent's job.
So running a pipeline again after a crash continues where it stopped, and after an edit re-runs
from the first changed stage.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import commands
from .queue import Queue, QueueError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

JOB_KEYS = ("max_restarts", "stall_timeout", "restart_delay")
# Options that shape a session, not the trajectory: changing them reuses a finished stage.
SESSION_KEYS = (
    *("save_every", "log_every", "keep_last", "keep_every", "no_sample", "async_save"),
    *("max_new_tokens", "temperature", "top_p", "sample_seed", "store"),
)
_RESERVED = ("name", "from", "step")


class PipelineError(ValueError):
    """A pipeline file that cannot be run: one line naming the file and the stage."""


@dataclass
class Stage:
    name: str
    options: dict[str, Any]  # flag name (underscored) -> value
    parent: str | None  # the stage it branches from; None for a stage that trains from scratch
    step: int | None  # branch point in the parent (None: its final checkpoint)
    jobs: dict[str, Any] = field(default_factory=dict)  # queue options
    key: str = ""
    run: str = ""


@dataclass
class Pipeline:
    name: str
    path: Path
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise PipelineError(f"{self.path}: no stage {name!r}")


def _flag_key(key: str) -> str:
    return key.replace("-", "_")


def load(path: str | Path) -> Pipeline:
    """Read and check a pipeline file; PipelineError names what is wrong."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"pipeline file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise PipelineError(f"{path}: {err}") from None
    name = str(data.get("name") or path.stem)
    from ..store.confine import RUN_NAME

    if not RUN_NAME.match(name) or len(name) > 60:
        raise PipelineError(f"{path}: pipeline name {name!r} must be a short run-name prefix")
    unknown = set(data) - {"name", "defaults", "stage"}
    if unknown:
        raise PipelineError(f"{path}: unknown top-level key {sorted(unknown)[0]!r}")
    defaults = data.get("defaults", {})
    raw = data.get("stage")
    if not isinstance(raw, list) or not raw or not isinstance(defaults, dict):
        raise PipelineError(f"{path}: give at least one [[stage]] (and [defaults] as a table)")
    stages: list[Stage] = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise PipelineError(f"{path}: stage {i + 1} needs a name")
        stage_name = entry["name"]
        if not RUN_NAME.match(stage_name) or any(s.name == stage_name for s in stages):
            raise PipelineError(f"{path}: stage name {stage_name!r} is invalid or repeated")
        inherited = {k: v for k, v in defaults.items() if not (stages and k == "preset")}
        merged = {_flag_key(k): v for k, v in {**inherited, **entry}.items()}
        source = merged.pop("from", stages[-1].name if stages else None)
        step = merged.pop("step", None)
        merged.pop("name", None)
        if isinstance(source, str) and "@" in source:
            source, _, at = source.partition("@")
            try:
                step = int(at)
            except ValueError:
                raise PipelineError(
                    f"{path}: stage {stage_name!r}: from = {source}@{at!r}"
                ) from None
        if source is not None and not any(s.name == source for s in stages):
            raise PipelineError(
                f"{path}: stage {stage_name!r} comes from {source!r}, which is not an earlier stage"
            )
        if step is not None and (not isinstance(step, int) or step < 0):
            raise PipelineError(f"{path}: stage {stage_name!r}: step must be a step number")
        jobs = {k: merged.pop(k) for k in JOB_KEYS if k in merged}
        stages.append(Stage(stage_name, merged, source, step, jobs))
    pipeline = Pipeline(name, path, stages)
    for stage in stages:
        parent = pipeline.stage(stage.parent) if stage.parent else None
        definition = {
            "kind": "branch" if parent else "train",
            "options": {k: v for k, v in sorted(stage.options.items()) if k not in SESSION_KEYS},
            "parent": parent.key if parent else None,
            "step": stage.step,
        }
        digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
        stage.key = digest
        stage.run = f"{name}-{stage.name}-{digest[:8]}"
    return pipeline


def _argv(options: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + flag[2:])
        elif isinstance(value, (list, dict)):
            raise PipelineError(f"option {key!r} must be a single value")
        else:
            argv += [flag, str(value)]
    return argv


def command_for(pipeline: Pipeline, stage: Stage, store: Any, resume: bool = False) -> Any:
    """The checked command of a stage: train, branch of its parent, or resume of its run."""
    options = dict(stage.options)
    try:
        if resume:
            session = {k: v for k, v in options.items() if k in SESSION_KEYS}
            return commands.parse("resume", [stage.run, *_argv(session)], store)
        if stage.parent is None:
            return commands.parse("train", [stage.run, *_argv(options)], store)
        parent = pipeline.stage(stage.parent)
        step = ["--step", str(stage.step)] if stage.step is not None else []
        argv = [parent.run, "--name", stage.run, *step, *_argv(options)]
        return commands.parse("branch", argv, store, taken=set())
    except ValueError as err:
        raise PipelineError(f"{pipeline.path}: stage {stage.name!r}: {err}") from None


def check(pipeline: Pipeline, store: Any) -> None:
    """Check every stage's options with the CLI's parser (nothing is queued)."""
    for stage in pipeline.stages:
        try:
            if stage.parent is None:
                commands.parser_for("train").parse_args([stage.run, *_argv(stage.options)])
            else:
                commands.parser_for("branch").parse_args(["x", *_argv(stage.options)])
        except ValueError as err:
            raise PipelineError(f"{pipeline.path}: stage {stage.name!r}: {err}") from None


def _complete(store: Any, run: str) -> bool:
    from ..store import StoreError

    try:
        latest = store.run(run).latest()
    except StoreError:
        return False
    return latest is not None and bool({"end", "stop_at"} & set(latest.reasons))


def status(pipeline: Pipeline, store: Any, queue: Queue | None = None) -> list[dict[str, Any]]:
    """Each stage's run and where it stands: done, queued, running, stopped, new."""
    queue = queue or Queue(store)
    jobs = {j.stage_key: j for j in queue.jobs() if j.stage_key}
    rows = []
    for stage in pipeline.stages:
        job = jobs.get(stage.key)
        exists = (Path(store.path) / stage.run / "run.h5").is_file()
        if _complete(store, stage.run):
            state = "done"
        elif job is not None and job.state in ("queued", "running"):
            state = job.state
        elif exists:
            state = "stopped" + (f" ({job.state}: {job.note})" if job and job.note else "")
        else:
            state = "new"
        rows.append(
            {
                "stage": stage.name,
                "run": stage.run,
                "from": stage.parent,
                "step": stage.step,
                "key": stage.key[:12],
                "state": state,
                "job": job.id if job else None,
            }
        )
    return rows


def run(pipeline: Pipeline, store: Any, queue: Queue | None = None) -> list[dict[str, Any]]:
    """Queue what the pipeline still needs (see the module's docstring); each stage's action."""
    queue = queue or Queue(store)
    check(pipeline, store)
    pending = {
        j.stage_key: j for j in queue.jobs(["queued", "running"]) if j.stage_key
    }  # fmt: skip
    job_of: dict[str, int | None] = {}
    actions = []
    for stage in pipeline.stages:
        after = [job_of[stage.parent]] if stage.parent and job_of.get(stage.parent) else []
        if _complete(store, stage.run):
            job_of[stage.name], action = None, "reused"
        elif stage.key in pending:
            job_of[stage.name], action = (
                pending[stage.key].id,
                f"already {pending[stage.key].state}",
            )
        else:
            exists = (Path(store.path) / stage.run / "run.h5").is_file()
            command = command_for(pipeline, stage, store, resume=exists)
            try:
                job = queue.add(
                    command,
                    after=after,
                    pipeline=pipeline.name,
                    stage=stage.name,
                    stage_key=stage.key,
                    **stage.jobs,
                )
            except QueueError as err:
                raise PipelineError(f"stage {stage.name!r}: {err}") from None
            job_of[stage.name] = job.id
            action = f"queued as job {job.id}" + (" (continues its run)" if exists else "")
        actions.append({"stage": stage.name, "run": stage.run, "action": action,
                        "job": job_of[stage.name]})  # fmt: skip
    return actions


def format_status(rows: list[dict[str, Any]], key: str = "state") -> str:
    width = max(len(r["stage"]) for r in rows)
    run_width = max(len(r["run"]) for r in rows)
    return "\n".join(
        f"{r['stage'].ljust(width)}  {r['run'].ljust(run_width)}  {r[key]}" for r in rows
    )
