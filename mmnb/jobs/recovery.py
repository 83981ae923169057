"""Numerical recovery: spike detection, rollback to a good checkpoint, and exact replay.

Built on the trainer's anomaly hook (`mmnb.train.Anomaly`: a non-finite loss or gradient norm
is found before `optimizer.step()` and `Trainer.on_anomaly` decides), with two more hooks of the
trainer: `spike_check` (finite but suspicious steps) and `at_boundary` (between steps).

- `--spike-factor F`: a step whose loss is above F x the mean of the previous `SPIKE_WINDOW`
  step losses is refused like a non-finite one, once the plan's warmup is over. The window is
  the run's own metrics log, which checkpoints hold: the check is a function of the trajectory.
- `--on-anomaly rollback`: the refused step k is not applied; the trainer returns to the newest
  checkpoint c < k of this run and skips the data of steps c+1..k — the window that led to the
  anomaly (PaLM's remedy, done by hand there: restart before the spike, skip those batches) —
  optionally scaling the planned lr by `--rollback-lr-scale`. At most `--max-rollbacks` per run;
  then it stops like `--on-anomaly stop`.

Each rollback is recorded in the run's history (`run.info()["history"]`):

    {"kind": "rollback", "step": c, "anomaly_step": k, "what": "loss spike", "loss": …,
     "skip_steps": k - c, "skip": [{"epoch": e, "start": p0, "end": p1}], "lr_scale": s,
     "time": …}

`skip` holds the skipped sample ranges as positions in epoch e's order
(`data.epoch_order(n, seed, e)[p0:p1]` are the dataset indices). The skip is applied at the
boundary of step c — by the same function in the run itself (after reloading checkpoint c), in
a resume from a checkpoint at or before c, and in `replay()`, which trains a new run from the
config and the recorded log: its weights equal the original's bitwise.

A recovery is an event (`recover`) and a notice: the dashboard shows it, the event stream
carries it, and the browser marks it on the loss plot from the run's history.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable
from typing import Any

SPIKE_WINDOW = 20  # step losses in the running mean of the spike check
FAULT_ENV = "MMNB_FAULT_NONFINITE_STEP"  # test hook: make this step's loss NaN (once)


def recoveries(history: Iterable[Any]) -> list[dict[str, Any]]:
    """The well-formed recovery entries of a run's history (the store is untrusted)."""
    kept = []
    for entry in history:
        if not isinstance(entry, dict) or entry.get("kind") != "rollback":
            continue
        step, skip, scale = entry.get("step"), entry.get("skip_steps"), entry.get("lr_scale")
        ints = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (step, skip))
        if ints and isinstance(scale, (int, float)) and 0 < scale <= 1:
            kept.append(entry)
    return kept


def skip_window(trainer: Any, steps: int) -> None:
    """Advance the data position by `steps` optimizer steps' samples without training on them
    (the epoch wraps as in training)."""
    per_step, per_epoch = trainer.samples_per_step, trainer.steps_per_epoch
    for _ in range(steps):
        trainer.position += per_step
        if trainer.position >= per_epoch * per_step:
            trainer.epoch, trainer.position = trainer.epoch + 1, 0


def apply(trainer: Any, entry: dict[str, Any]) -> None:
    """Apply a recorded recovery at its boundary: skip its window, scale the planned lr."""
    skip_window(trainer, entry["skip_steps"])
    if entry["lr_scale"] != 1:
        trainer.plan = dataclasses.replace(trainer.plan, lr=trainer.plan.lr * entry["lr_scale"])


class Recovery:
    """The anomaly policy of one training session (installed by `install`)."""

    def __init__(self, run: Any, trainer: Any, log: list[dict[str, Any]]) -> None:
        self.run, self.trainer, self.log = run, trainer, log

    # ---- Trainer.spike_check ----
    def spike_check(self, trainer: Any, loss: float) -> str | None:
        factor = trainer.config.spike_factor
        losses = trainer.metrics["loss"][-SPIKE_WINDOW:]
        warm = trainer.step >= trainer.plan.start + trainer.plan.warmup
        if factor and warm and len(losses) == SPIKE_WINDOW:
            mean = sum(losses) / SPIKE_WINDOW
            if loss > factor * mean:
                return f"loss spike ({loss:.4g} > {factor:g} x the running mean {mean:.4g})"
        return None

    # ---- Trainer.at_boundary ----
    def at_boundary(self, trainer: Any) -> None:
        for entry in self.log:
            if entry["step"] == trainer.step:
                apply(trainer, entry)

    # ---- Trainer.on_anomaly ----
    def rollback(self, trainer: Any, anomaly: Any) -> str:
        """Return to the newest good checkpoint before the refused step (AnomalyAction.ROLLBACK)
        or stop (AnomalyAction.STOP: no rollback left, or no checkpoint to go back to)."""
        from ..train import AnomalyAction

        cfg = trainer.config
        done = len(self.log)
        if done >= cfg.max_rollbacks:
            trainer.emit(
                "notice", text=f"{anomaly}: {done} rollbacks (--max-rollbacks) used up; stopping"
            )
            return AnomalyAction.STOP
        target = self._target(anomaly.step)
        if target is None:
            trainer.emit(
                "notice",
                text=f"{anomaly}: no checkpoint of run {self.run.name} to roll back to "
                "(--save-every K keeps recent ones); stopping",
            )
            return AnomalyAction.STOP
        trainer.load_state_dict(self.run.load(target.step))
        epoch, position = trainer.epoch, trainer.position
        skip_steps = anomaly.step - target.step
        entry = {
            "kind": "rollback",
            "step": target.step,
            "anomaly_step": anomaly.step,
            "what": anomaly.reason or f"non-finite {anomaly.what}",
            "loss": anomaly.loss,
            "grad_norm": anomaly.grad_norm,
            "skip_steps": skip_steps,
            "skip": _ranges(trainer, epoch, position, skip_steps),
            "lr_scale": cfg.rollback_lr_scale,
            "time": time.time(),
        }
        self.log.append(entry)
        history = self.run.info().get("history", [])
        self.run.update_attrs(history=[*history, entry])
        found = str(anomaly).split(" (lr ")[0]
        text = (
            f"{found}: rolled back to step {target.step}, skipping the data of steps "
            f"{target.step + 1}-{anomaly.step}"
            + (f", lr x {cfg.rollback_lr_scale:g}" if cfg.rollback_lr_scale != 1 else "")
            + f" (rollback {done + 1} of at most {cfg.max_rollbacks})"
        )
        info = {k: v for k, v in entry.items() if k != "kind"}
        trainer.emit("recover", action="rollback", **info, text=text)
        trainer.emit("notice", text=text)
        return AnomalyAction.ROLLBACK  # the loop goes on from step c; at_boundary skips

    def _target(self, before: int) -> Any:
        """The newest checkpoint of this run's own (not inherited) before step `before`, and
        not before an in-place extension (whose plan it would undo)."""
        floor = max(
            (e["step"] for e in self.run.info().get("history", []) if "extend_to_epochs" in e),
            default=0,
        )
        own = [s for s in self.run.steps() if not s.inherited and floor <= s.step < before]
        return own[-1] if own else None


class _Position:
    """The data counters of a trainer, to compute a skip without applying it."""

    def __init__(self, trainer: Any) -> None:
        self.position, self.epoch = trainer.position, trainer.epoch
        self.samples_per_step = trainer.samples_per_step
        self.steps_per_epoch = trainer.steps_per_epoch


def _ranges(trainer: Any, epoch: int, position: int, steps: int) -> list[dict[str, int]]:
    """The sample ranges (positions in each epoch's order) that `steps` steps from here use."""
    ranges: list[dict[str, int]] = []
    probe = _Position(trainer)
    probe.epoch, probe.position = epoch, position
    for _ in range(steps):
        start = probe.position
        skip_window(probe, 1)
        end = start + probe.samples_per_step
        if ranges and ranges[-1]["epoch"] == epoch and ranges[-1]["end"] == start:
            ranges[-1]["end"] = end
        else:
            ranges.append({"epoch": epoch, "start": start, "end": end})
        epoch = probe.epoch
    return ranges


def install(run: Any, trainer: Any) -> Recovery:
    """Connect the policy of `trainer.config` and the run's recorded recoveries (mmnb.api)."""
    policy = Recovery(run, trainer, recoveries(run.info().get("history", [])))
    if trainer.config.spike_factor:
        trainer.spike_check = policy.spike_check
    trainer.at_boundary = policy.at_boundary
    if trainer.config.on_anomaly == "rollback":
        trainer.on_anomaly = policy.rollback
    fault = os.environ.get(FAULT_ENV)
    if fault and fault.isdigit():
        trainer.inject_nonfinite = int(fault)
    return policy


def replay(
    source: Any,
    name: str | None = None,
    *,
    store: Any = None,
    listeners: Iterable[Any] = (),
    device: str = "cpu",
    background: bool = False,
) -> Any:
    """Train a new run from `source`'s config and its recorded recoveries; with the same
    hardware, torch and thread count it ends bitwise equal to `source`."""
    import torch

    from .. import api
    from ..config import config_from_dict, config_to_dict
    from ..tokenizer import Tokenizer
    from ..train import Trainer

    store = api._store(store)
    src = store.run(source) if isinstance(source, str) else source
    info = src.info()
    log = recoveries(info.get("history", []))
    if any("extend_to_epochs" in e for e in info.get("history", [])):
        raise ValueError(
            f"run {src.name!r} was extended in place; replay the run it was extended from"
        )
    model_cfg, train_cfg = config_from_dict(src.config_dict())
    tokenizer_json = src.tokenizer_json()
    parent = src.parent
    config = config_to_dict(model_cfg, train_cfg)
    name = name or store.new_name(f"{src.name}-replay")
    if parent is None:
        dataset = api._dataset(train_cfg, Tokenizer.from_json(tokenizer_json), lambda info: None)
        trainer = Trainer(model_cfg, train_cfg, dataset, device=device)
        if train_cfg.init_from:  # imported weights: they are the source's own step 0
            start = src.load(0, groups=("model",))["model"]
            with torch.no_grad():
                for key, tensor in trainer.model.state_dict().items():
                    tensor.copy_(start[key])
        handle = store.create_run(name, config, tokenizer_json, lineage=info.get("lineage") or None)
    else:
        stage = info.get("stage")
        state = store.run(parent[0]).load(parent[1])
        trainer = api._restore(
            state, model_cfg, train_cfg, tokenizer_json, device, stage, store.run(parent[0])
        )
        handle = store.create_run(name, config, tokenizer_json, parent=parent, stage=stage)
    handle.open_writer()
    stream = None
    try:
        handle.update_attrs(history=log)
        stream = api._attach(handle, trainer, listeners)
        if parent is None:
            trainer.checkpoint(["start"])
            if trainer.lora or train_cfg.objective == "dpo":  # step 0 is its base / reference
                api._start_frozen(trainer, store, handle)
    except BaseException as err:
        if stream is not None:
            stream.close(err)
        handle.close_writer()
        raise
    return api._launch(handle, trainer, True, background, stream)
