"""The Python API every front-end calls: train, resume, branch, generate.

A front-end (CLI, magics, widgets) parses user input into keyword options and passes
`listeners` to see events; nothing here prints or knows which front-end is calling.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .config import (
    MODEL_ALIASES,
    MODEL_FIELDS,
    TRAIN_FIELDS,
    TRAJECTORY_FIELDS,
    ModelConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    parse_duration,
    resolve,
)
from .data import build_dataset, tokenizer_for
from .dist import Parallel, session_accum
from .events import EventWriter
from .jobs import recovery
from .jobs.session import open_session
from .model import MiniMind
from .schedule import Plan
from .store import CorruptCheckpoint, Run, Store, StoreError, check_run_name
from .store.sharded import commit_sharded, load_lazy
from .tokenizer import Tokenizer
from .train import Event, Trainer, plan_for
from .validate import (
    InvalidInput,
    check_config,
    check_run_writable,
    check_sampling,
    check_stop_at,
    check_store,
    positive,
)

Listener = Callable[[Event], None]

# Options a plain resume may change: they do not alter the trajectory, only this session.
SESSION_FIELDS = (
    *("stop_at", "time_budget", "save_every", "log_every", "keep_last", "keep_every"),
    "async_save",  # how checkpoints are written, never what
    # The anomaly policy: it changes a trajectory only by recoveries, which are recorded.
    *("on_anomaly", "spike_factor", "max_rollbacks", "rollback_lr_scale"),
)
# Stop conditions belong to the session that set them; a resume or branch starts without them.
_ONE_SESSION = {"stop_at": None, "time_budget": None}
# Fields whose change on a branch starts a new data stage (epoch 0, position 0, plan from there).
DATA_FIELDS = ("data", "tokenizer", "max_seq_len", "batch_size", "accum")


def _store(store: Store | str | None) -> Store:
    return store if isinstance(store, Store) else Store(store)


def _with_progress(
    listeners: Iterable[Listener], progress: bool | None, background: bool
) -> list[Listener]:
    """`listeners`, plus a console progress bar (tqdm on stderr) when `progress` is True, or
    when it is None (the default), nobody else listens, training blocks and a person is
    watching: stderr is a terminal or Python runs interactively. `progress=False` turns it off."""
    listeners = list(listeners)
    if progress is None:
        ipython = sys.modules.get("IPython")  # already imported by a shell; never imported here
        shell = ipython.get_ipython() if ipython is not None else None
        interactive = (
            hasattr(sys, "ps1") or sys.flags.interactive or _is_tty(sys.stderr) or shell is not None
        )
        progress = not listeners and not background and bool(interactive)
    if progress:
        from .progress import ConsoleProgress  # a front-end, imported only when asked for

        listeners.append(ConsoleProgress())
    return listeners


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _normalise(options: dict[str, Any]) -> dict[str, Any]:
    options = {k: v for k, v in options.items() if v is not None}
    if "time_budget" in options:
        options["time_budget"] = parse_duration(options["time_budget"])
    return options


def train(
    run: str | None = None,
    *,
    store: Store | str | None = None,
    listeners: Iterable[Listener] = (),
    device: str = "auto",
    shard: bool = False,
    start: bool = True,
    background: bool = False,
    progress: bool | None = None,
    **options: Any,
) -> Run:
    """Start a new run named `run` (auto-named when None) and train it.

    `options` are config fields (see `mmnb.config`): `preset`, `data`, `epochs`, `lr`, …
    With `start=False` the run is created and its step-0 checkpoint written, but not trained.
    With `background=True` training runs in a thread; `run.stop()`, `run.wait()`.
    A tqdm bar shows progress when a person watches (a terminal, an interactive session or a
    notebook) and no other listener is given; `progress=False` turns it off, True forces it.
    `device="auto"` picks CUDA, then MPS, then CPU. Under torchrun every rank calls this
    (`mmnb.dist`, docs/distributed.md): DDP, or FSDP2 with `shard=True`.
    """
    store = _store(store)
    listeners = _with_progress(listeners, progress, background)
    if run is not None:
        check_run_name(run)
    options = _normalise(options)
    par = Parallel.from_env(device, shard)
    try:
        _no_background(par, background)
        if par.restarts:
            # torchrun restarted the group after a failure: continue the run this job made.
            made = par.decide(lambda: _restarted_run(store, run, par))
            if made is not None:
                session = {k: v for k, v in options.items() if k in SESSION_FIELDS}
                return _resume(par, store, made, None, None, None, None, listeners, **session)
        return _train(par, store, run, listeners, start, background, options)
    except BaseException:
        par.close()
        raise


def _train(
    par: Parallel,
    store: Store,
    run: str | None,
    listeners: list[Listener],
    start: bool,
    background: bool,
    options: dict[str, Any],
) -> Run:
    made: dict[str, Any] = {}  # rank 0's weights, dataset and run handle (with the lock)

    def prepare() -> tuple[ModelConfig, TrainConfig, str, list[str]]:
        # Rank 0 decides: config and tokenizer (trained once); it checks what it can before
        # any rank builds a model.
        source, notices = None, []
        prep = _preparation(listeners)
        check_store(store.path, write=True)
        opts = dict(options, world_size=par.world_size)
        if opts.get("init_from"):
            source, model_cfg, train_cfg, tokenizer, notices = _from_weights(store, opts)
        else:
            preset = opts.pop("preset", "tiny")
            model_cfg, train_cfg = resolve(preset, **opts)  # validates both (mmnb.validate)
            tokenizer = tokenizer_for(
                train_cfg.data, model_cfg.vocab_size, train_cfg.tokenizer, progress=prep
            )
            if train_cfg.tokenizer is not None and tokenizer.vocab_size != model_cfg.vocab_size:
                # A given tokenizer decides the vocabulary; the embedding follows it.
                model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
        _check_parallel(train_cfg, par)
        dataset = _dataset(train_cfg, tokenizer, prep)
        _check_fits(dataset, train_cfg, par)
        made.update(source=source, dataset=dataset)
        return model_cfg, train_cfg, tokenizer.to_json(), notices

    model_cfg, train_cfg, tokenizer_json, notices = par.decide(prepare)
    if made.get("source") is None and train_cfg.init_from:
        made["source"] = _from_weights(store, dict(options))[0]  # every rank reads them
    dataset = made.get("dataset") or _dataset(
        train_cfg, Tokenizer.from_json(tokenizer_json), _preparation(())
    )
    trainer = Trainer(model_cfg, train_cfg, dataset, parallel=par)
    source = made.get("source")
    if source is not None:
        with torch.no_grad():  # copy_ casts a half-precision file up to the fp32 weights
            for key, tensor in trainer.model.state_dict().items():
                if ".lora." not in key:  # LoRA adapters start as drawn: B = 0
                    tensor.copy_(_shard_of(tensor, source.state[key]))

    def create() -> str:
        # The run appears only now: a follower (`mmnb watch`, %attach) finds its stream soon.
        handle = store.create_run(
            run or store.new_name(),
            config_to_dict(model_cfg, train_cfg),
            tokenizer_json,
            lineage={"init_from": source.lineage} if source is not None else None,
            writer=True,  # locked from its first moment: nobody sees it empty and unlocked
        )
        made["run"] = handle
        return handle.name

    name = par.decide(create)
    handle = made.get("run") or Run(store, name)
    stream = None
    try:
        stream = _attach(handle, trainer, listeners)
        for text in notices:
            trainer.emit("notice", text=text)
        trainer.checkpoint(["start"])  # step 0: resumable and branchable before the first step
        if trainer.lora or train_cfg.objective == "dpo":
            # A run that is LoRA or DPO from its start: step 0 (written whole) is its frozen
            # base and its reference; the checkpoints after it refer to it.
            _start_frozen(trainer, store, handle)
    except BaseException as err:
        if stream is not None:
            stream.close(err)
        handle.discard()  # nothing was committed (a full disk, Ctrl-C): the name stays free
        raise
    return _launch(handle, trainer, start, background, stream)


def _shard_of(target: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """`whole`, or the rows of it that this rank holds when `target` is an FSDP2 DTensor."""
    if not hasattr(target, "to_local"):
        return whole
    (chunk,) = target.__create_chunk_list__()
    start = chunk.offsets[0]
    return whole[start : start + chunk.sizes[0]]


def _from_weights(
    store: Store, options: dict[str, Any]
) -> tuple[Any, ModelConfig, TrainConfig, Tokenizer, list[str]]:
    """Configs and tokenizer for a run that starts from `options["init_from"]`'s weights."""
    from . import weights  # reading foreign formats only when asked to

    source = weights.read_source(options["init_from"], store)
    preset = options.pop("preset", None)
    model_kw = {k: options.pop(k) for k in list(options) if MODEL_ALIASES.get(k, k) in MODEL_FIELDS}
    model_cfg, chosen, notices = weights.infer_config(source, preset, model_kw)
    _, train_cfg = resolve(chosen, **options)
    tokenizer = weights.tokenizer_for_source(source, train_cfg.tokenizer)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens; {source.where} embeds only "
            f"{model_cfg.vocab_size}"
        )
    return source, model_cfg, train_cfg, tokenizer, notices


def resume(
    run: str | None = None,
    *,
    store: Store | str | None = None,
    step: int | None = None,
    epochs: int | None = None,
    more_epochs: int | None = None,
    name: str | None = None,
    listeners: Iterable[Listener] = (),
    device: str = "auto",
    shard: bool = False,
    background: bool = False,
    progress: bool | None = None,
    **options: Any,
) -> Run:
    """Continue `run` (the newest run when None) from the store alone.

    `epochs`/`more_epochs` extend the plan. A WSD run already past its decay start is extended
    from its decay-start checkpoint into a new run (`name`, default `<run>-<E>ep`), which
    equals a run planned that long from the start; a cosine run is re-planned from its current
    step and the result differs from one planned that long (a `notice` event says so).
    Only session options (stop_at, time_budget, save_every, …) may be given. At another world
    size than the run's, the global batch is kept by dividing its micro-batches anew.
    """
    store = _store(store)
    listeners = _with_progress(listeners, progress, background)
    if name is not None:
        check_run_name(name)
    options = _normalise(options)
    par = Parallel.from_env(device, shard)
    try:
        _no_background(par, background)
        return _resume(
            par, store, run, step, epochs, more_epochs, name, listeners, background, **options
        )
    except BaseException:
        par.close()
        raise


def _resume(
    par: Parallel,
    store: Store,
    run: str | None,
    step: int | None,
    epochs: int | None,
    more_epochs: int | None,
    name: str | None,
    listeners: Iterable[Listener],
    background: bool = False,
    **options: Any,
) -> Run:
    made: dict[str, Run] = {}

    def prepare() -> tuple[str, bool]:
        check_store(store.path, write=False)
        handle = store.run(run) if run is not None else store.newest()
        for key in options:
            if key not in SESSION_FIELDS:
                what = (
                    "defines the run's trajectory"
                    if key in TRAJECTORY_FIELDS
                    else "is not a session option"
                )
                raise InvalidInput(
                    f"{{0}} {what}; change it on a branch (mmnb branch), not on resume", key
                )
        if epochs is not None and more_epochs is not None:
            raise InvalidInput("give {0} or {1}, not both", "epochs", "more_epochs")
        for label, value in (("epochs", epochs), ("more_epochs", more_epochs)):
            if value is not None:
                positive(label, value)
        model_cfg, train_cfg = config_from_dict(handle.config_dict())
        train_cfg = dataclasses.replace(train_cfg, **{**_ONE_SESSION, **options})
        check_config(model_cfg, train_cfg)  # the same validator as train's
        session_accum(train_cfg.world_size, train_cfg.batch_size, train_cfg.accum, par.world_size)
        check_store(store.path, write=True)
        check_run_writable(handle.path)
        handle.open_writer()
        made["run"] = handle
        if step is not None:
            handle.step_info(step)
        info = handle.info()
        # Its creator died before step 0 was committed: it starts from its config.
        unstarted = step is None and not info.get("parent") and not handle.steps()
        return handle.name, unstarted

    run_name, unstarted = par.decide(prepare)
    handle = made.get("run") or Run(store, run_name)
    model_cfg, train_cfg = config_from_dict(handle.config_dict())
    train_cfg = dataclasses.replace(train_cfg, **{**_ONE_SESSION, **options})
    try:
        info = handle.info()
        stage = info.get("stage") if info.get("parent") else None
        listeners = list(listeners)
        tokenizer_json = handle.tokenizer_json()
        if unstarted:
            trainer = _fresh(model_cfg, train_cfg, tokenizer_json, par, listeners)
        else:
            trainer, corrupt = _restore(
                handle, step, model_cfg, train_cfg, tokenizer_json, par, stage, listeners
            )
            # A newer checkpoint that is corrupt is recomputed (the trajectory is a pure
            # function of config, seed and data) and replaced when training passes it.
            trainer.repair_steps.update(corrupt)
        _same_everywhere(par, lambda: check_stop_at(train_cfg.stop_at, trainer.step))
    except BaseException:
        handle.close_writer()
        raise
    if epochs is None and more_epochs is None:
        stream = _attach(handle, trainer, listeners)
        if unstarted:
            try:
                trainer.checkpoint(["start"])
            except BaseException as err:
                if stream is not None:
                    stream.close(err)
                handle.close_writer()
                raise
        if trainer.finished:
            trainer.emit(
                "notice",
                text=f"run {handle.name} already finished its plan at step {trainer.step}; "
                "nothing to train (extend it with more epochs, or branch it)",
            )
        return _launch(handle, trainer, True, background, stream)

    # ---- extension: a longer plan ----
    notices: list[str] = []
    old = trainer.plan
    new_epochs = epochs if epochs is not None else train_cfg.epochs + more_epochs
    extended = dataclasses.replace(train_cfg, epochs=new_epochs, max_steps=None)
    if train_cfg.max_steps is not None:
        spe = trainer.steps_per_epoch
        extra = (new_epochs - train_cfg.epochs) * spe
        extended = dataclasses.replace(
            train_cfg, epochs=new_epochs, max_steps=train_cfg.max_steps + extra
        )
    new_plan = plan_for(extended, trainer.steps_per_epoch, start=old.start)
    if new_plan.end <= trainer.step:
        handle.close_writer()
        _same_everywhere(
            par,
            lambda: _raise(
                ValueError(
                    f"run {handle.name!r} is at step {trainer.step}; a plan of {new_epochs} "
                    f"epochs ({new_plan.end} steps) does not extend it"
                )
            ),
        )
    # Where the run IS, by its index: when the newest checkpoint is unreadable, `load()` fell
    # back to an older one, but the run has still been trained (and decayed) that far.
    latest = handle.latest()
    reached = max(trainer.step, latest.step if latest and step is None else trainer.step)
    reached = par.broadcast(reached)  # rank 0's index decides
    if old.kind == "wsd" and reached > old.decay_start:
        # The decayed steps depend on the old horizon: continue from the decay start instead,
        # in a new run, so the decayed run stays as its own leaf.
        handle.close_writer()
        base = re.sub(r"-\d+ep$", "", handle.name)  # one-2ep extends to one-3ep
        new_name = name or f"{base}-{new_epochs}ep"
        return _branch(
            par,
            store,
            handle,
            old.decay_start,
            new_name,
            model_cfg,
            extended,
            listeners,
            background=background,
        )
    if old.kind in ("cosine", "minimind") and trainer.step > old.start + old.warmup:
        lr_now = old.lr_at(trainer.step)
        floor = old.lr * (0.1 if old.kind == "minimind" else old.min_ratio)
        new_plan = Plan(
            kind="cosine",
            lr=lr_now,
            total=new_plan.end - trainer.step,
            start=trainer.step,
            min_ratio=floor / lr_now if lr_now > 0 else 1.0,
        )
        notices.append(
            f"cosine schedule re-planned from step {trainer.step} (lr {lr_now:.3g} → {floor:.3g} "
            f"at step {new_plan.end}); this differs from a run planned for {new_epochs} epochs "
            "from the start — use --schedule wsd for exactly extendable runs"
        )
    trainer.config = extended
    trainer.plan = new_plan
    if par.is_main:
        history = handle.info().get("history", [])
        history.append(
            {"step": trainer.step, "extend_to_epochs": new_epochs, "plan": new_plan.to_dict()}
        )
        handle.update_attrs(config=config_to_dict(model_cfg, extended), history=history)
    stream = _attach(handle, trainer, listeners)
    for text in notices:
        trainer.emit("notice", text=text)
    return _launch(handle, trainer, True, background, stream)


def branch(
    run: str,
    step: int | None = None,
    name: str | None = None,
    *,
    store: Store | str | None = None,
    listeners: Iterable[Listener] = (),
    device: str = "auto",
    shard: bool = False,
    start: bool = True,
    background: bool = False,
    progress: bool | None = None,
    **overrides: Any,
) -> Run:
    """A new run whose parent is (`run`, `step`), sharing the parent's history up to `step`.

    `overrides` may change any training field (lr, epochs, schedule, batch_size, data, …) and
    dropout; a change to data, tokenizer, max_seq_len, batch_size or accum starts a new stage
    (epoch 0 of the new data, the schedule counted from `step`). The parent is never modified.
    """
    store = _store(store)
    listeners = _with_progress(listeners, progress, background)
    if name is not None:
        check_run_name(name)
    overrides = {MODEL_ALIASES.get(k, k): v for k, v in _normalise(overrides).items()}
    par = Parallel.from_env(device, shard)
    try:
        _no_background(par, background)
        if par.restarts:
            made = par.decide(lambda: _restarted_run(store, name, par))
            if made is not None:
                session = {k: v for k, v in overrides.items() if k in SESSION_FIELDS}
                return _resume(par, store, made, None, None, None, None, listeners, **session)

        def prepare() -> tuple[str, int, ModelConfig, TrainConfig]:
            check_store(store.path, write=True)
            parent = store.run(run)
            at = step
            if at is None:
                latest = parent.latest()
                if latest is None:
                    raise StoreError(f"run {run!r} has no checkpoint to branch from")
                at = latest.step
            parent.step_info(at)
            options = dict(overrides)
            model_cfg, train_cfg = config_from_dict(parent.config_dict())
            model_kw = {k: options.pop(k) for k in list(options) if k in MODEL_FIELDS}
            for key, value in model_kw.items():
                if key != "dropout" and value != getattr(model_cfg, key):
                    raise InvalidInput(
                        "{0} changes the model's shape; a branch keeps the parent's weights", key
                    )
            unknown = [k for k in options if k not in TRAIN_FIELDS or k == "preset"]
            if unknown:
                raise ValueError(f"unknown branch option {unknown[0]!r}")
            if "epochs" in options and "max_steps" not in options:
                options["max_steps"] = None  # a horizon in epochs replaces one in steps
            if "batch_size" in options or "accum" in options:
                options["world_size"] = par.world_size  # a new batch is per rank of this job
            new_model = dataclasses.replace(model_cfg, **model_kw)
            new_train = dataclasses.replace(train_cfg, **{**_ONE_SESSION, **options})
            check_config(new_model, new_train)  # the same validator as train's
            check_stop_at(new_train.stop_at, at)
            _check_parallel(new_train, par)
            session_accum(
                new_train.world_size, new_train.batch_size, new_train.accum, par.world_size
            )
            return parent.name, at, new_model, new_train

        parent_name, at, new_model, new_train = par.decide(prepare)
        return _branch(
            par,
            store,
            store.run(parent_name),
            at,
            name,
            new_model,
            new_train,
            listeners,
            start,
            background,
        )
    except BaseException:
        par.close()
        raise


def _branch(
    par: Parallel,
    store: Store,
    parent: Run,
    step: int,
    name: str | None,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    listeners: Iterable[Listener],
    start: bool = True,
    background: bool = False,
) -> Run:
    _, parent_train = config_from_dict(parent.config_dict())
    new_stage = any(getattr(train_cfg, k) != getattr(parent_train, k) for k in DATA_FIELDS)
    tokenizer_json = parent.tokenizer_json()
    if train_cfg.tokenizer and train_cfg.tokenizer != parent_train.tokenizer:

        def read_tokenizer() -> str:
            tokenizer = Tokenizer.from_file(train_cfg.tokenizer)
            if tokenizer.vocab_size != model_cfg.vocab_size:
                raise ValueError(
                    f"tokenizer {train_cfg.tokenizer} has {tokenizer.vocab_size} tokens; the "
                    f"model has {model_cfg.vocab_size}"
                )
            return tokenizer.to_json()

        tokenizer_json = par.decide(read_tokenizer)
    stage = {"start": step, "reset_data": new_stage}
    # Everything that can fail on user input happens before the store is touched.
    listeners = list(listeners)
    trainer, _ = _restore(parent, step, model_cfg, train_cfg, tokenizer_json, par, stage, listeners)
    made: dict[str, Run] = {}

    def create() -> str:
        handle = store.create_run(
            name or store.new_name(f"{parent.name}-b"),
            config_to_dict(model_cfg, train_cfg),
            tokenizer_json,
            parent=(parent.name, step),
            stage=stage,
            writer=True,
        )
        made["run"] = handle
        return handle.name

    run_name = par.decide(create)
    handle = made.get("run") or Run(store, run_name)
    stream = _attach(handle, trainer, listeners)
    return _launch(handle, trainer, start, background, stream)


def _restore(
    source: Run,
    step: int | None,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    tokenizer_json: str,
    par: Parallel,
    branch_stage: dict[str, Any] | None = None,
    listeners: Iterable[Listener] = (),
) -> tuple[Trainer, list[int]]:
    """A Trainer holding the state of `source`'s checkpoint `step` (newest readable if None),
    and the newer steps skipped as corrupt.

    At a branch point (`branch_stage` given) the inherited checkpoint holds the parent's plan
    and data position; the branch's own follow from its config, deterministically. LoRA and
    DPO stages get their frozen weights through `mmnb.stages`. Distributed, every rank loads
    the same checkpoint and reads only what it holds (`_load_agreed`)."""
    from . import stages

    trainer = _fresh(model_cfg, train_cfg, tokenizer_json, par, listeners)
    target = step if step is not None else par.decide(lambda: _newest_step(source))
    owner = source.store.run(source.step_info(target).run)  # who wrote it: a branch inherits
    _, old = config_from_dict(owner.config_dict())
    staged = any(c.lora_rank or c.objective == "dpo" for c in (old, train_cfg))
    if par.distributed and not staged:
        # the rows this rank holds, of the newest checkpoint every rank could read
        state, corrupt = _load_agreed(source, step, trainer, par)
    else:
        if step is None:
            state, corrupt = source.load_newest()  # a corrupt one is skipped, with a warning
        else:
            state, corrupt = source.load(step), []
        at = int(state["trainer"]["step"])
        at_branch = branch_stage is not None and at == branch_stage["start"]
        try:
            stages.load(trainer, state, source.store, owner, old, at_branch)
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
            # The store checked every value it read; this is the last line of defence.
            raise StoreError(f"run {owner.name!r} step {at} cannot be restored ({err})") from None
    if branch_stage is not None and trainer.step == branch_stage["start"]:
        if branch_stage["reset_data"]:
            trainer.epoch, trainer.position = 0, 0
            trainer.plan = plan_for(train_cfg, trainer.steps_per_epoch, start=trainer.step)
        else:
            # Same data stream: the plan keeps its origin (a fine-tuning stage's own start).
            trainer.plan = plan_for(train_cfg, trainer.steps_per_epoch, start=trainer.plan.start)
    elif state["data"]["fingerprint"] != trainer.dataset.fingerprint:
        _same_everywhere(
            par,
            lambda: _raise(
                StoreError(
                    f"the data ({train_cfg.data or 'bundled corpus'}) changed since the "
                    "checkpoint was written; restore it or branch with --data"
                )
            ),
        )
    return trainer, corrupt


def _newest_step(run: Run) -> int:
    latest = run.latest()
    if latest is None:
        raise StoreError(f"run {run.name!r} has no checkpoint")
    return latest.step


def _fresh(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    tokenizer_json: str,
    par: Parallel,
    listeners: Iterable[Listener] = (),
) -> Trainer:
    """A Trainer at step 0 of the config, on the data with the run's tokenizer."""
    tokenizer = Tokenizer.from_json(tokenizer_json)
    prep = _preparation(listeners if par.is_main else ())
    built: dict[str, Any] = {}

    def first() -> None:  # rank 0 tokenises (or finds the cache) first, then the others
        built["dataset"] = _dataset(train_cfg, tokenizer, prep)

    par.decide(first)
    dataset = built.get("dataset") or _dataset(train_cfg, tokenizer, _preparation(()))
    return Trainer(model_cfg, train_cfg, dataset, parallel=par)


def _dataset(
    train_cfg: TrainConfig, tokenizer: Tokenizer, progress: Callable[[dict[str, Any]], None]
) -> Any:
    if train_cfg.objective == "dpo":  # preference pairs: small, tokenised in one go
        from .preference import build_preference_dataset

        return build_preference_dataset(train_cfg.data, tokenizer, train_cfg.max_seq_len)
    return build_dataset(train_cfg.data, tokenizer, train_cfg.max_seq_len, progress=progress)


def _start_frozen(trainer: Trainer, store: Store, handle: Run) -> None:
    from . import frozen, stages

    ref = frozen.reference(handle, trainer.step)
    if trainer.lora:
        trainer.frozen["base"] = ref
    if trainer.config.objective == "dpo":
        trainer.frozen["reference"] = ref
        stages.install_reference(trainer, store, ref)


def _preparation(listeners: Iterable[Listener]) -> Callable[[dict[str, Any]], None]:
    """Data preparation's progress as `prepare` events (before the trainer exists)."""
    listeners = list(listeners)

    def emit(info: dict[str, Any]) -> None:
        for listener in listeners:
            listener(Event("prepare", 0, dict(info)))

    return emit


def _load_agreed(
    source: Run, step: int | None, trainer: Trainer, par: Parallel
) -> tuple[dict, list[int]]:
    """Every rank loads the same checkpoint, reading only what it holds; the newest one every
    rank could read (a corrupt shard seen by any rank makes all fall back to an older one).
    Returns the state and the newer steps skipped as corrupt."""
    steps = [step] if step is not None else par.decide(lambda: [s.step for s in source.steps()])
    skipped: list[int] = []
    for candidate in reversed(steps):
        error: StoreError | None = None
        try:
            state = load_lazy(source, candidate)
            trainer.load_state_dict(state)
        except CorruptCheckpoint as err:
            error = err
        if not par.any(error is not None):
            return state, skipped
        if step is not None:
            raise error or StoreError(
                f"checkpoint {candidate} of run {source.name!r} is corrupt (seen by another rank)"
            )
        if error is not None:
            warnings.warn(f"{error}; trying an older checkpoint", stacklevel=2)
        skipped.append(candidate)
    raise StoreError(f"run {source.name!r} has no readable checkpoint")


def _raise(error: Exception) -> None:
    raise error


def _same_everywhere(par: Parallel, check: Callable[[], Any]) -> None:
    """A check every rank makes alike: its error is reported once, by rank 0."""
    try:
        check()
    except Exception as err:
        if not par.is_main:
            err.reported_elsewhere = True  # type: ignore[attr-defined]
        raise


def _check_fits(dataset: Any, train_cfg: TrainConfig, par: Parallel) -> None:
    """The Trainer's own checks of the batch against the data, before a run is created."""
    accum = session_accum(
        train_cfg.world_size, train_cfg.batch_size, train_cfg.accum, par.world_size
    )
    needed = par.world_size * train_cfg.batch_size * accum
    if len(dataset) < needed:
        raise ValueError(
            f"the dataset has {len(dataset)} samples of {train_cfg.max_seq_len} tokens, fewer "
            f"than one optimizer step needs ({needed}: world_size {par.world_size} x batch_size "
            f"{train_cfg.batch_size} x accum {accum})"
        )


def _restarted_run(store: Store, name: str | None, par: Parallel) -> str | None:
    """The run this torchrun job made before the agent restarted it, if it made one."""
    if par.job is None:
        return None
    if name is not None:
        runs = [store.run(name)] if (store.path / name).is_dir() else []
    else:
        runs = sorted(store.runs(), key=lambda r: r.run_file.stat().st_mtime, reverse=True)
    for r in runs:
        for entry in r.info().get("history", []):
            if entry.get("session", {}).get("job") == par.job:
                return r.name
    return None


def _check_parallel(train_cfg: TrainConfig, par: Parallel) -> None:
    """What sharded (FSDP2) training does not do yet, said before anything starts."""
    if par.mode == "fsdp" and (train_cfg.lora_rank or train_cfg.objective == "dpo"):
        raise ValueError(
            "--shard (FSDP2) does not train LoRA or DPO stages yet; use DDP (no --shard)"
        )


def _no_background(par: Parallel, background: bool) -> None:
    if background and par.distributed:
        raise ValueError("--background trains in a thread of one process; not under torchrun")


def _attach(handle: Run, trainer: Trainer, listeners: Iterable[Listener]) -> EventWriter | None:
    """Connect a trainer to its run: listeners, the saver, and the session's live event stream
    and control channel (`mmnb.jobs.session`), which the caller closes when training ends.
    Distributed, rank 0 alone has listeners and the stream (None elsewhere)."""
    par = trainer.parallel
    handle.trainer = trainer
    if par.is_main:  # only rank 0 reports progress and writes the run's history
        listeners = list(listeners)
        trainer.listeners.extend(listeners)
        for listener in listeners:
            # A listener with controls (a dashboard's Stop button) gets the live handle before
            # training starts: a blocking run returns it only when training is over.
            attach = getattr(listener, "attach", None)
            if callable(attach):
                attach(handle)
        history = handle.info().get("history", [])
        history.append(
            {"kind": "session", "step": trainer.step, "session": _session_record(trainer)}
        )
        handle.update_attrs(history=history)
    log = os.environ.get("MMNB_SAMPLE_LOG")
    if log:
        trainer.on_batch = sample_logger(Path(log), par.rank)
    cfg = trainer.config

    def notify(text: str) -> None:  # saving may run on a background thread: no printing
        trainer.emit("notice", text=text)

    def write(state: dict[str, Any], reasons: list[str], tags: list[str]) -> Any:
        if par.distributed:
            info = commit_sharded(handle, state, reasons, tags, par, notify)
        else:
            info = handle.commit(state, reasons, tags, notify=notify)
        if par.is_main:
            plan = trainer.plan
            protect = {s for s in (plan.decay_start, plan.start) if s is not None}
            handle.prune(cfg.keep_last, cfg.keep_every, protect, notify=notify)
        return info

    def save(t: Trainer, reasons: list[str], tags: list[str]) -> Any:
        return write(t.state_dict(), reasons, tags)

    trainer.saver = save
    trainer.state_writer = write  # the same, given a state: for saves in the background
    recovery.install(handle, trainer)
    return open_session(handle, trainer) if par.is_main else None


def _session_record(trainer: Trainer) -> dict[str, Any]:
    """What the run's history keeps of one training session (process layout, precision)."""
    cfg = trainer.config
    return {
        **trainer.parallel.describe(),
        "batch_size": cfg.batch_size,
        "accum": trainer.accum,
        "dtype": cfg.dtype,
        "tf32": cfg.tf32,
        "started": time.time(),
    }


def sample_logger(folder: Path, rank: int) -> Callable[[int, int, Any], None]:
    """An `on_batch` hook appending `{step, micro, samples}` lines to `folder/rank<r>.jsonl`:
    the sample indices each rank actually fed, to audit the global sample sequence."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank{rank}.jsonl"

    def log(step: int, micro: int, indices: Any) -> None:
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "micro": micro, "samples": indices.tolist()}) + "\n")

    return log


def _launch(
    handle: Run, trainer: Trainer, start: bool, background: bool, stream: EventWriter | None
) -> Run:
    """Train in this thread, in a background thread, or not at all; the lock is released, the
    event stream closed (and a distributed process leaves its group) when training ends
    however it ends."""

    def fit() -> None:
        error = None
        try:
            trainer.fit()
        except BaseException as err:
            error = err
            raise
        finally:
            handle.close_writer()
            if stream is not None:
                stream.close(None if isinstance(error, KeyboardInterrupt) else error)
            _leave_group(trainer)

    if not start:
        handle.close_writer()
        if stream is not None:
            stream.close()
        _leave_group(trainer)
    elif background:
        handle.start_thread(fit)
    else:
        fit()
    return handle


def _leave_group(trainer: Trainer) -> None:
    """Leave the process group, the DDP wrapper first: a process that exits while DDP's
    reducer still holds the gloo group aborts in its destructor ("terminate called")."""
    if trainer.parallel.distributed:
        trainer.module = trainer.model
        gc.collect()
    trainer.parallel.close()


def load_model(run: Run, step: int | None = None) -> tuple[MiniMind, Tokenizer]:
    """The model (eval mode) and tokenizer of a checkpoint, reading only the weights."""
    from .frozen import build_model  # a LoRA checkpoint: its adapters on its frozen base

    tokenizer = Tokenizer.from_json(run.tokenizer_json())
    if step is not None:
        return build_model(run, step), tokenizer
    for info in reversed(run.steps()):  # the newest readable checkpoint, as Run.load does
        try:
            return build_model(run, info.step), tokenizer
        except CorruptCheckpoint as err:
            warnings.warn(f"{err}; trying an older checkpoint", stacklevel=2)
    raise StoreError(f"run {run.name!r} has no readable checkpoint")


def generate(
    model: MiniMind,
    tokenizer: Tokenizer,
    prompt: str = "",
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    chat: bool = False,
) -> str:
    """Continue `prompt` (or answer it as a user message with `chat`); return the new text.

    The result is only what the model wrote — never the prompt — in both modes; `mmnb generate`
    prints the same. Decoding stops at whole characters: a multi-byte character cut by
    `max_new_tokens`, or byte tokens that form no character, are left out (no U+FFFD).
    """
    check_sampling(max_new_tokens, temperature, top_p)
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
    else:
        text = tokenizer.decode([tokenizer.bos_id]) + prompt
    ids = torch.tensor([tokenizer.encode(text)], dtype=torch.long)
    out = model.generate(
        ids,
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_token_id=tokenizer.eos_id,
        seed=seed,
    )
    new = out[0, ids.shape[1] :].tolist()
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    # A byte-level tokenizer decodes an incomplete UTF-8 sequence to U+FFFD; drop those.
    return tokenizer.decode(new, skip_special_tokens=True).replace("\ufffd", "")
