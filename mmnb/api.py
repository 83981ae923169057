"""The Python API every front-end calls: train, resume, branch, generate.

A front-end (CLI, magics, widgets) parses user input into keyword options and passes
`listeners` to see events; nothing here prints or knows which front-end is calling.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import warnings
from collections.abc import Callable, Iterable
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
from .events import EventWriter
from .jobs import recovery
from .jobs.session import open_session
from .model import MiniMind
from .schedule import Plan
from .store import CorruptCheckpoint, Run, Store, StoreError, check_run_name
from .tokenizer import Tokenizer
from .train import Event, Trainer, plan_for
from .validate import (
    InvalidInput,
    check_config,
    check_device,
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
    device: str = "cpu",
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
    """
    store = _store(store)
    listeners = _with_progress(listeners, progress, background)
    if run is not None:
        check_run_name(run)
    options = _normalise(options)
    source, notices = None, []
    device = check_device(device)
    check_store(store.path, write=True)
    listeners = list(listeners)
    prep = _preparation(listeners)
    if options.get("init_from"):
        source, model_cfg, train_cfg, tokenizer, notices = _from_weights(store, options)
    else:
        preset = options.pop("preset", "tiny")
        model_cfg, train_cfg = resolve(preset, **options)  # validates both (mmnb.validate)
        tokenizer = tokenizer_for(
            train_cfg.data, model_cfg.vocab_size, train_cfg.tokenizer, progress=prep
        )
        if train_cfg.tokenizer is not None and tokenizer.vocab_size != model_cfg.vocab_size:
            # A given tokenizer decides the vocabulary; the embedding follows it.
            model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    dataset = _dataset(train_cfg, tokenizer, prep)
    trainer = Trainer(model_cfg, train_cfg, dataset, device=device)
    if source is not None:
        with torch.no_grad():  # copy_ casts a half-precision file up to the fp32 master weights
            for name, tensor in trainer.model.state_dict().items():
                if ".lora." not in name:  # LoRA adapters start as drawn: B = 0
                    tensor.copy_(source.state[name])
    handle = store.create_run(
        run or store.new_name(),
        config_to_dict(model_cfg, train_cfg),
        tokenizer.to_json(),
        lineage={"init_from": source.lineage} if source is not None else None,
        writer=True,  # locked from its first moment: nobody sees it empty and unlocked
    )
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
    device: str = "cpu",
    background: bool = False,
    progress: bool | None = None,
    **options: Any,
) -> Run:
    """Continue `run` (the newest run when None) from the store alone.

    `epochs`/`more_epochs` extend the plan. A WSD run already past its decay start is extended
    from its decay-start checkpoint into a new run (`name`, default `<run>-<E>ep`), which
    equals a run planned that long from the start; a cosine run is re-planned from its current
    step and the result differs from one planned that long (a `notice` event says so).
    Only session options (stop_at, time_budget, save_every, …) may be given.
    """
    store = _store(store)
    listeners = _with_progress(listeners, progress, background)
    if name is not None:
        check_run_name(name)
    check_store(store.path, write=False)
    handle = store.run(run) if run is not None else store.newest()
    options = _normalise(options)
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
    device = check_device(device)
    check_store(store.path, write=True)
    check_run_writable(handle.path)
    handle.open_writer()
    unstarted = False
    try:
        info = handle.info()
        stage = info.get("stage") if info.get("parent") else None
        listeners = list(listeners)
        if step is None and stage is None and not handle.steps():
            # Its creator died before step 0 was committed: start it from its config.
            unstarted = True
            trainer = _fresh(model_cfg, train_cfg, handle.tokenizer_json(), device, listeners)
        else:
            if step is None:
                state, corrupt = handle.load_newest()
            else:
                state, corrupt = handle.load(step), []
            trainer = _restore(
                state, model_cfg, train_cfg, handle.tokenizer_json(), device, stage, handle,
                listeners,
            )  # fmt: skip
            # A newer checkpoint that is corrupt is recomputed (the trajectory is a pure
            # function of config, seed and data) and replaced when training passes it.
            trainer.repair_steps.update(corrupt)
        check_stop_at(train_cfg.stop_at, trainer.step)
    except BaseException:
        handle.close_writer()
        raise
    if epochs is None and more_epochs is None:
        stream = _attach(handle, trainer, listeners)
        if unstarted:
            try:
                trainer.checkpoint(["start"])
            except BaseException as err:
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
        raise ValueError(
            f"run {handle.name!r} is at step {trainer.step}; a plan of {new_epochs} epochs "
            f"({new_plan.end} steps) does not extend it"
        )
    # Where the run IS, by its index: when the newest checkpoint is unreadable, `load()` fell
    # back to an older one, but the run has still been trained (and decayed) that far.
    latest = handle.latest()
    reached = max(trainer.step, latest.step if latest and step is None else trainer.step)
    if old.kind == "wsd" and reached > old.decay_start:
        # The decayed steps depend on the old horizon: continue from the decay start instead,
        # in a new run, so the decayed run stays as its own leaf.
        handle.close_writer()
        base = re.sub(r"-\d+ep$", "", handle.name)  # one-2ep extends to one-3ep
        new_name = name or f"{base}-{new_epochs}ep"
        return _branch(
            store,
            handle,
            old.decay_start,
            new_name,
            model_cfg,
            extended,
            listeners,
            device,
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
    device: str = "cpu",
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
    check_store(store.path, write=True)
    parent = store.run(run)
    if step is None:
        latest = parent.latest()
        if latest is None:
            raise StoreError(f"run {run!r} has no checkpoint to branch from")
        step = latest.step
    parent.step_info(step)
    overrides = {MODEL_ALIASES.get(k, k): v for k, v in _normalise(overrides).items()}
    model_cfg, train_cfg = config_from_dict(parent.config_dict())
    model_kw = {k: overrides.pop(k) for k in list(overrides) if k in MODEL_FIELDS}
    for key, value in model_kw.items():
        if key != "dropout" and value != getattr(model_cfg, key):
            raise InvalidInput(
                "{0} changes the model's shape; a branch keeps the parent's weights", key
            )
    unknown = [k for k in overrides if k not in TRAIN_FIELDS or k == "preset"]
    if unknown:
        raise ValueError(f"unknown branch option {unknown[0]!r}")
    if "epochs" in overrides and "max_steps" not in overrides:
        overrides["max_steps"] = None  # a horizon given in epochs replaces one given in steps
    new_model = dataclasses.replace(model_cfg, **model_kw)
    new_train = dataclasses.replace(train_cfg, **{**_ONE_SESSION, **overrides})
    check_config(new_model, new_train)  # the same validator as train's
    check_stop_at(new_train.stop_at, step)
    device = check_device(device)
    return _branch(
        store, parent, step, name, new_model, new_train, listeners, device, start, background
    )


def _branch(
    store: Store,
    parent: Run,
    step: int,
    name: str | None,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    listeners: Iterable[Listener],
    device: str,
    start: bool = True,
    background: bool = False,
) -> Run:
    _, parent_train = config_from_dict(parent.config_dict())
    new_stage = any(getattr(train_cfg, k) != getattr(parent_train, k) for k in DATA_FIELDS)
    tokenizer_json = parent.tokenizer_json()
    if train_cfg.tokenizer and train_cfg.tokenizer != parent_train.tokenizer:
        tokenizer = Tokenizer.from_file(train_cfg.tokenizer)
        if tokenizer.vocab_size != model_cfg.vocab_size:
            raise ValueError(
                f"tokenizer {train_cfg.tokenizer} has {tokenizer.vocab_size} tokens; the model "
                f"has {model_cfg.vocab_size}"
            )
        tokenizer_json = tokenizer.to_json()
    stage = {"start": step, "reset_data": new_stage}
    # Everything that can fail on user input happens before the store is touched.
    listeners = list(listeners)
    state = parent.load(step)
    trainer = _restore(
        state, model_cfg, train_cfg, tokenizer_json, device, stage, parent, listeners
    )
    handle = store.create_run(
        name or store.new_name(f"{parent.name}-b"),
        config_to_dict(model_cfg, train_cfg),
        tokenizer_json,
        parent=(parent.name, step),
        stage=stage,
        writer=True,
    )
    stream = _attach(handle, trainer, listeners)
    return _launch(handle, trainer, start, background, stream)


def _restore(
    state: dict[str, Any],
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    tokenizer_json: str,
    device: str,
    branch_stage: dict[str, Any] | None = None,
    source: Run | None = None,
    listeners: Iterable[Listener] = (),
) -> Trainer:
    """A Trainer holding `state`, a checkpoint listed by run `source`. At a branch point
    (`branch_stage` given) the inherited checkpoint holds the parent's plan and data position;
    the branch's own follow from its config, deterministically. LoRA and DPO stages get their
    frozen weights through `mmnb.stages`."""
    from . import stages

    trainer = _fresh(model_cfg, train_cfg, tokenizer_json, device, listeners)
    step = int(state["trainer"]["step"])
    owner = source.store.run(source.step_info(step).run)  # who wrote it: a branch inherits
    _, old = config_from_dict(owner.config_dict())
    at_branch = branch_stage is not None and step == branch_stage["start"]
    try:
        stages.load(trainer, state, source.store, owner, old, at_branch)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
        # The store checked every value it read; this is the last line of defence.
        raise StoreError(f"run {owner.name!r} step {step} cannot be restored ({err})") from None
    if at_branch:
        if branch_stage["reset_data"]:
            trainer.epoch, trainer.position = 0, 0
            trainer.plan = plan_for(train_cfg, trainer.steps_per_epoch, start=trainer.step)
        else:
            # Same data stream: the plan keeps its origin (a fine-tuning stage's own start).
            trainer.plan = plan_for(train_cfg, trainer.steps_per_epoch, start=trainer.plan.start)
    elif state["data"]["fingerprint"] != trainer.dataset.fingerprint:
        raise StoreError(
            f"the data ({train_cfg.data or 'bundled corpus'}) changed since the checkpoint "
            "was written; restore it or branch with --data"
        )
    return trainer


def _fresh(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    tokenizer_json: str,
    device: str,
    listeners: Iterable[Listener] = (),
) -> Trainer:
    """A Trainer at step 0 of the config, on the data with the run's tokenizer."""
    tokenizer = Tokenizer.from_json(tokenizer_json)
    dataset = _dataset(train_cfg, tokenizer, _preparation(listeners))
    return Trainer(model_cfg, train_cfg, dataset, device=device)


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


def _attach(handle: Run, trainer: Trainer, listeners: Iterable[Listener]) -> EventWriter:
    """Connect a trainer to its run: listeners, the saver, and the session's live event stream
    and control channel (`mmnb.jobs.session`), which the caller closes when training ends."""
    handle.trainer = trainer
    listeners = list(listeners)
    trainer.listeners.extend(listeners)
    for listener in listeners:
        # A listener with controls (a dashboard's Stop button) gets the live handle before
        # training starts: a blocking run returns it only when training is over.
        attach = getattr(listener, "attach", None)
        if callable(attach):
            attach(handle)
    cfg = trainer.config

    def notify(text: str) -> None:  # saving may run on a background thread: no printing
        trainer.emit("notice", text=text)

    def write(state: dict[str, Any], reasons: list[str], tags: list[str]) -> Any:
        info = handle.commit(state, reasons, tags, notify=notify)
        plan = trainer.plan
        protect = {s for s in (plan.decay_start, plan.start) if s is not None}
        handle.prune(cfg.keep_last, cfg.keep_every, protect, notify=notify)
        return info

    def save(t: Trainer, reasons: list[str], tags: list[str]) -> Any:
        return write(t.state_dict(), reasons, tags)

    trainer.saver = save
    trainer.state_writer = write  # the same, given a state: for saves in the background
    recovery.install(handle, trainer)
    return open_session(handle, trainer)


def _launch(
    handle: Run, trainer: Trainer, start: bool, background: bool, stream: EventWriter
) -> Run:
    """Train in this thread, in a background thread, or not at all; the lock is released and
    the event stream closed when training ends however it ends."""

    def fit() -> None:
        error = None
        try:
            trainer.fit()
        except BaseException as err:
            error = err
            raise
        finally:
            stream.close(None if isinstance(error, KeyboardInterrupt) else error)
            handle.close_writer()

    if not start:
        stream.close()
        handle.close_writer()
    elif background:
        handle.start_thread(fit)
    else:
        fit()
    return handle


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
