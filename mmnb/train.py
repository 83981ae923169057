"""The trainer: one readable loop and a `state_dict()` that holds everything a resume needs.

Order of one optimizer step (nanoGPT's): lr from the plan → micro-batches with gradient
accumulation → clip → AdamW step → counters and metrics → checkpoint/stop checks.

Every random stream is a pure function of (seed, epoch/step): the model init of `seed`, the data
order of (seed, epoch), dropout masks of (seed, step). The trainer draws nothing from the global
RNGs, so a user's cell that reseeds torch meanwhile cannot change the run. The global RNG states
are still saved and restored with a checkpoint, for code of the user's that draws from them.

Numerical faults: a non-finite loss or gradient norm is found at the step it happens, after the
backward passes and before clipping and `optimizer.step()`, so the weights and AdamW moments are
still those of the last boundary. `Trainer.on_anomaly` decides what happens (see `Anomaly`).
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import lora
from .asyncsave import AUTO_BYTES, AsyncWriter, Job, state_bytes
from .config import ModelConfig, TrainConfig
from .data import TokenDataset, epoch_order
from .dist import Parallel, session_accum
from .events import Event  # defined with the stream that carries it to other processes
from .model import MiniMind
from .objective import objective_for
from .schedule import Plan
from .speed import make_optimizer

METRIC_NAMES = ("step", "loss", "lr", "grad_norm", "tokens", "time")
LORA_STREAM = 0x10A  # the random stream LoRA's A matrices are drawn from: (seed, LORA_STREAM)


@dataclass
class Anomaly:
    """A non-finite loss or gradient norm, found before the optimizer applied the step.

    The anomaly hook, `Trainer.on_anomaly(trainer, anomaly) -> str`, is called with it while the
    trainer sits at the last optimizer-step boundary plus this step's gradients (in `.grad`):
    weights, optimizer state, counters, data position and metrics are untouched. It returns

    - `AnomalyAction.STOP` (the default policy, `stop_on_anomaly`): the gradients are dropped and
      `fit()` raises `NonFiniteError` after a `stop` event with reason `anomaly`; nothing is
      checkpointed, so no non-finite state ever reaches the store;
    - `AnomalyAction.SKIP`: the update is not applied (gradients dropped, optimizer not stepped),
      but the step counts: counters and the data position advance past this step's batch and
      the metrics log it with its non-finite loss/grad norm. A deterministic policy keeps the
      trajectory a pure function of (config, seed, data).

    A policy may also raise (e.g. to roll back to a checkpoint from the caller); the exception
    leaves `fit()` like `NonFiniteError` does. Policies must not print (front-ends render events).
    """

    step: int  # the optimizer step being taken (steps completed + 1)
    loss: float  # mean loss over the accumulation window
    grad_norm: float  # total gradient norm before clipping
    lr: float
    # What `Trainer.spike_check` found wrong with finite values (a loss spike); None when the
    # loss or gradient norm is non-finite.
    reason: str | None = None

    @property
    def what(self) -> str:
        if self.reason is not None:
            return "loss spike"
        return "loss" if not math.isfinite(self.loss) else "gradient norm"

    def __str__(self) -> str:
        if self.reason is not None:
            found = f"{self.reason} at step {self.step}"
        else:
            value = self.loss if self.what == "loss" else self.grad_norm
            found = f"non-finite {self.what} ({value}) at step {self.step}"
        return f"{found} (lr {self.lr:.3g}); training stopped before the optimizer step"


class AnomalyAction:
    STOP = "stop"
    SKIP = "skip"
    # The policy restored the trainer to an earlier boundary (mmnb.jobs.recovery's rollback):
    # this step's gradients are dropped and the loop goes on from the restored state.
    ROLLBACK = "rollback"


class _RolledBack(Exception):
    """Unwinds a refused step to `fit()`'s loop after a rollback policy restored the state."""


class NonFiniteError(ArithmeticError):
    """Training stopped at an anomaly (the default policy): a non-finite loss or gradient
    norm, or a loss spike that `Trainer.spike_check` refused."""

    def __init__(self, anomaly: Anomaly, newest_checkpoint: int | None = None) -> None:
        text = str(anomaly)
        if newest_checkpoint is not None:
            text += f"; the newest checkpoint is step {newest_checkpoint}"
        super().__init__(text)
        self.anomaly = anomaly
        self.newest_checkpoint = newest_checkpoint


def stop_on_anomaly(trainer: Trainer, anomaly: Anomaly) -> str:
    """The default anomaly policy: stop before the bad update is applied."""
    return AnomalyAction.STOP


class StopReason:
    DONE = "done"  # the plan's last step
    STOP_AT = "stop_at"
    TIME_BUDGET = "time_budget"
    REQUESTED = "stop"  # stop() from another thread or a Stop button (not "requested": that
    # is a checkpoint asked for with request_checkpoint, and training goes on after it)
    FAILED = "failed"  # an exception ended training (the stop event carries `error`)


def plan_for(train: TrainConfig, steps_per_epoch: int, start: int = 0) -> Plan:
    """The schedule a config asks for; a stage that begins at `start` counts its steps from there."""
    total = train.max_steps if train.max_steps is not None else train.epochs * steps_per_epoch
    return Plan(
        start=start,
        kind=train.schedule,
        lr=train.lr,
        total=total,
        warmup=train.warmup,
        min_ratio=train.min_lr_ratio,
        decay_fraction=train.decay_fraction,
        decay_shape=train.decay_shape,
    )


def _mix_seed(seed: int, *keys: int) -> int:
    # SeedSequence hashes (seed, keys...) into well-spread seeds; adjacent steps get unrelated masks.
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0] >> 1)


class _InterruptGuard:
    """Defers Ctrl-C (SIGINT) out of critical sections (optimizer update, checkpoint write).

    A KeyboardInterrupt raised halfway through `optimizer.step()` would leave half the parameters
    updated; deferring it to the end of the section means an interrupt always lands at an
    optimizer-step boundary. Only the main thread receives signals; elsewhere this is inert.
    """

    def __init__(self, enabled: bool = True) -> None:
        self._enabled = enabled
        self._depth = 0
        self._pending = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _InterruptGuard:
        if self._enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self._depth:
            self._pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if not self._depth and self._pending:
            self._pending = False
            raise KeyboardInterrupt


# Stop conditions that are not a pure function of the step; ranks all-reduce them per step.
_FLAGS = ("interrupt", "stop", "requested", "time_budget")
_NO_FLAGS = dict.fromkeys(_FLAGS, False)
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _AgreedInterrupt(Exception):
    """Every rank stops at this boundary (a SIGINT reached one of them); checkpoint is done."""


class Trainer:
    """Owns the model, optimizer, plan, data position, counters and metrics of one run.

    With a distributed `parallel` (one Trainer per rank, see `mmnb.dist`), the global batch
    of an optimizer step is `world_size x batch_size x accum` samples of the run's plan: the
    window `order[position : position + samples_per_step]` of the epoch order, of which rank r
    feeds micro-batches `r*accum ... (r+1)*accum - 1`. The global sample sequence is the one
    `epoch_order(seed, epoch)` defines at any world size.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        train_config: TrainConfig,
        dataset: TokenDataset,
        *,
        device: str | torch.device = "cpu",
        parallel: Parallel | None = None,
    ) -> None:
        self.model_config, self.config = model_config, train_config
        self.dataset = dataset
        self.parallel = par = parallel or Parallel(device=torch.device(device))
        self.device = par.device
        # Micro-batches of this rank per optimizer step: the run's global batch, split anew
        # over this session's processes (a ValueError names the fields when it cannot be).
        self.accum = session_accum(
            train_config.world_size, train_config.batch_size, train_config.accum, par.world_size
        )
        self.samples_per_step = par.world_size * train_config.batch_size * self.accum
        self.steps_per_epoch = len(dataset) // self.samples_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the dataset has {len(dataset)} samples of {train_config.max_seq_len} tokens, "
                f"fewer than one optimizer step needs ({self.samples_per_step}: world_size "
                f"{par.world_size} x batch_size {train_config.batch_size} x accum {self.accum})"
            )
        self.model = MiniMind(model_config, seed=train_config.seed).to(self.device)
        # A LoRA stage trains adapters only (mmnb.lora); its base weights come from `load_base`.
        self.lora = train_config.lora_rank > 0
        if self.lora:
            rank = train_config.lora_rank
            alpha = train_config.lora_alpha or rank
            targets = lora.targets_of(train_config.lora_targets)
            seed = _mix_seed(train_config.seed, LORA_STREAM, 0)  # 3 keys: never a dropout stream
            lora.apply(self.model, rank, alpha, targets, seed)
        self.objective = objective_for(train_config.objective, train_config.dpo_beta)
        self.metric_names = METRIC_NAMES + self.objective.metrics
        # References to the frozen weights this stage uses (LoRA base, DPO reference), as
        # `mmnb.frozen` writes them; checkpointed so a resume finds the same weights.
        self.frozen: dict[str, Any] = {}
        # Names, not positions, key the optimizer state in a checkpoint; tied weights appear once.
        self.param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        # What the training step calls: the model itself, or a compiled wrapper around it that
        # shares its parameters (so state_dict keys are unchanged); distributed, DDP's wrapper
        # around that, or (FSDP2) the model sharded in place. The optimizer comes after: FSDP2
        # replaces the parameters by DTensors.
        self.module = par.wrap(self.model, train_config.compile, train_config.max_seq_len)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(trainable, train_config, self.device)
        self.plan = plan_for(train_config, self.steps_per_epoch)
        # Counters: the state at the last optimizer-step boundary.
        self.step = 0  # optimizer steps completed
        self.epoch = 0
        self.position = 0  # global sample index into this epoch's order
        self.tokens = 0  # tokens fed to the model
        self.elapsed = 0.0  # seconds spent training, summed over sessions
        self._saved_threads: int | None = None  # of the checkpoint resumed from
        self.metrics: dict[str, list[float]] = {name: [] for name in self.metric_names}
        self.listeners: list[Callable[[Event], None]] = []
        # Called with (trainer, reasons, tags) at each checkpoint; returns what was saved.
        # The store installs it.
        self.saver: Callable[[Trainer, list[str], list[str]], Any] | None = None
        # The same write given a state dict: what a checkpoint written in the background runs
        # (async saves, `config.async_save`; the store installs it too).
        self.state_writer: Callable[[dict[str, Any], list[str], list[str]], Any] | None = None
        self._writer = AsyncWriter()
        self.checkpoint_seconds = 0.0  # time the loop spent saving or waiting for a save
        self._pending: tuple[Job, list[tuple[Future, list[str]]]] | None = None
        # Called before optimizer.step() when the loss or grad norm is not finite (`Anomaly`).
        self.on_anomaly: Callable[[Trainer, Anomaly], str] = stop_on_anomaly
        self.saved_step: int | None = None  # step of the newest checkpoint saved or loaded
        # Steps whose committed checkpoint is corrupt: checkpointed again when reached.
        self.repair_steps: set[int] = set()
        # Called with (trainer, loss) for a step with finite values: a reason to refuse it
        # (a loss spike) or None. Installed by mmnb.jobs.recovery for --spike-factor.
        self.spike_check: Callable[[Trainer, float], str | None] | None = None
        # Called at every optimizer-step boundary before the next step: recorded recoveries
        # are applied there, so a resume or a replay takes the same path (mmnb.jobs.recovery).
        self.at_boundary: Callable[[Trainer], None] | None = None
        # Test hook: the loss of this optimizer step (1-based) is made NaN once, before the
        # backward pass, as a real fault would be ($MMNB_FAULT_NONFINITE_STEP, mmnb.jobs).
        self.inject_nonfinite: int | None = None
        self._stop = threading.Event()
        self._requests: list[tuple[Future, list[str]]] = []  # checkpoints asked for from outside
        self._requests_lock = threading.Lock()
        self._running = False  # inside fit(); guarded by _requests_lock
        self._order: tuple[int, np.ndarray] | None = None
        # A distributed process never raises on SIGINT (mmnb.dist): all ranks agree to stop.
        self._guard = _InterruptGuard(enabled=not par.distributed)
        self._stop_said = False  # a stop event was emitted by this fit()
        self._autocast = _AUTOCAST.get(train_config.dtype)
        if self._autocast is torch.bfloat16 and self.device.type == "cuda":
            if not torch.cuda.is_bf16_supported():
                raise ValueError("dtype bf16 is not supported by this GPU; use --dtype fp16")
        # fp16 needs loss scaling; the scaler's state (scale, growth tracker) is checkpointed.
        self.scaler = par.grad_scaler(train_config.dtype == "fp16")
        self.skipped = 0  # optimizer steps the scaler skipped for non-finite gradients
        # Called with (step, global micro-batch, sample indices) before each micro-batch.
        self.on_batch: Callable[[int, int, np.ndarray], None] | None = None
        self._agreed = _NO_FLAGS  # the stop flags all ranks agreed on at the last boundary
        self._session_start = 0.0
        self._compiled = False  # a compiled step has run (the compile cost is paid)
        self._primed = False  # DDP's gradient buckets are in their final order (_prime)

    # ---- control from other threads / front-ends ----
    def stop(self) -> None:
        """Stop at the next optimizer-step boundary, with a checkpoint."""
        self._stop.set()

    def request_checkpoint(self, tags: list[str] = ()) -> Future | None:
        """Checkpoint at the next optimizer-step boundary; the future gets what was saved.

        None when `fit()` is not running: the trainer is idle at a boundary, save directly.
        """
        future: Future = Future()
        with self._requests_lock:
            if not self._running:
                return None
            self._requests.append((future, list(tags)))
        return future

    def _take_requests(self) -> list[tuple[Future, list[str]]]:
        with self._requests_lock:
            taken, self._requests = self._requests, []
        return taken

    def emit(self, kind: str, *, at: int | None = None, **info: Any) -> None:
        """Tell the listeners; `at` is the step the event is about (default: the current one)."""
        self._stop_said = self._stop_said or kind == "stop"
        event = Event(kind, self.step if at is None else at, info)
        for listener in list(self.listeners):
            listener(event)

    @property
    def finished(self) -> bool:
        return self.step >= self.plan.end

    # ---- the loop ----
    def fit(self) -> str:
        """Train until the plan ends or a stop condition holds; return the StopReason.

        KeyboardInterrupt is re-raised after checkpointing the last completed step, so a
        notebook's "Run All" stops at this cell.
        """
        with self._requests_lock:
            self._running = True
        self._stop_said = False
        try:
            return self._fit()
        except Exception as err:
            self._settle_save()
            # Front-ends must not keep showing "training": say how it ended, then re-raise.
            if not self._stop_said:
                self.emit("stop", reason=StopReason.FAILED, error=f"{type(err).__name__}: {err}")
            raise
        finally:
            with self._requests_lock:  # from here on a request is answered by the caller
                self._running = False
            for future, _ in self._take_requests():  # only if fit() ended by an exception
                future.set_exception(RuntimeError("training ended before the checkpoint"))

    def _fit(self) -> str:
        cfg = self.config
        start = self._session_start = time.perf_counter()
        self._stop.clear()
        self._agreed = _NO_FLAGS
        with self._guard, _flush_denormals(), _precision(self.device, cfg.tf32):
            self.emit(
                "start",
                total=self.plan.end,
                steps_per_epoch=self.steps_per_epoch,
                epoch=self.epoch,  # where the session starts, for progress displays
                epoch_step=self.position // self.samples_per_step,
                threads=torch.get_num_threads(),  # bitwise resume needs the same count
            )
            threads = torch.get_num_threads()
            if self._saved_threads not in (None, threads):
                # CPU kernels split their reductions by thread count (inductor's compiled
                # ones too): the continuation is exact only with the count it was trained with.
                self.emit(
                    "notice",
                    text=f"the checkpoint of step {self.saved_step} was written with "
                    f"{self._saved_threads} threads and this process has {threads}: training "
                    "goes on, but not bitwise as it would have with "
                    f"{self._saved_threads} (set OMP_NUM_THREADS={self._saved_threads} to "
                    "continue exactly)",
                )
            self._saved_threads = None  # said once
            if cfg.compile and not self._compiled:
                self.emit(
                    "notice",
                    text="compiling the model (torch.compile): the first step takes longer",
                )
            if self.parallel.mode == "ddp" and not self._primed:
                self._prime()
            if cfg.async_save and self.parallel.distributed:
                self.emit(
                    "notice",
                    text="--async-save is off with several processes (see "
                    "docs/distributed.md): each checkpoint is written at its step",
                )
            try:
                while True:
                    reason = self._stop_reason(start)
                    if reason is not None:
                        break
                    if self.at_boundary is not None:
                        self.at_boundary(self)
                    t0 = time.perf_counter()
                    try:
                        self._train_step()
                    except _RolledBack:
                        continue  # from the restored boundary (its own elapsed time)
                    self._compiled = cfg.compile
                    self.elapsed += time.perf_counter() - t0
                    reasons = self._checkpoint_reasons()
                    if cfg.stop_at is not None and self.step == cfg.stop_at:
                        reasons.append(StopReason.STOP_AT)
                    requests = self._take_requests()
                    if requests or self._agreed["requested"]:
                        reasons.append("requested")
                    if self._agreed["interrupt"]:
                        # Every rank saw the same flag at the same boundary: stop here together.
                        self.checkpoint([*reasons, "interrupt"], requests=requests)
                        self.emit("stop", reason="interrupt")
                        raise _AgreedInterrupt
                    self.finish_save(wait=False)
                    if reasons:
                        self.checkpoint(reasons, requests=requests, background=True)
            except _AgreedInterrupt:
                raise KeyboardInterrupt from None
            except KeyboardInterrupt:
                # Gradients of an unfinished accumulation window are discarded; counters, data
                # position and the dropout stream only ever advance at a boundary.
                self.optimizer.zero_grad(set_to_none=True)
                self.checkpoint(["interrupt"])
                self.emit("stop", reason="interrupt")
                raise
            with self._requests_lock:  # from here on a request is answered by the caller
                self._running = False
            requests = self._take_requests()  # asked for before the loop ended
            final = [] if reason in (StopReason.DONE, StopReason.STOP_AT) else [reason]
            if self.parallel.any(bool(requests)):
                final.append("requested")
            if final:
                self.checkpoint(final, requests=requests)
            self.finish_save(wait=True)  # the end of training waits for the commit in flight
            self.emit("stop", reason=reason)
        return reason

    def _prime(self) -> None:
        """A backward of a zero loss through DDP before the first real step of a session.

        DDP re-buckets the gradients after the first backward of a module, in the order they
        became ready; without this the first step of every session would reduce with the
        initial buckets and the later ones with the re-built ones. With 3+ ranks ring
        all-reduce adds each element's values in an order that depends on its place in the
        bucket, so a resumed run would differ from a straight one in the last bits. After this
        throwaway pass (same graph as a step, a zero loss, dropout from a throwaway stream,
        the gradients dropped) every real step of every session uses the same buckets.
        """
        cfg = self.config
        order = self.epoch_indices(self.epoch)
        lo = self.position + self.parallel.rank * self.accum * cfg.batch_size
        input_ids, labels = self.dataset.batch(order[lo : lo + cfg.batch_size])
        input_ids, labels = input_ids.to(self.device), labels.to(self.device)
        generator = torch.Generator(self.device).manual_seed(0)
        self.module.train()
        with torch.autocast(
            self.device.type, self._autocast or torch.float32, enabled=self._autocast is not None
        ):
            loss, _ = self.objective(self.module, input_ids, labels, generator)
        (loss * 0.0).backward()
        self.optimizer.zero_grad(set_to_none=True)
        self._primed = True

    def _stop_reason(self, start: float) -> str | None:
        cfg = self.config
        if self.finished:
            return StopReason.DONE
        if cfg.stop_at is not None and self.step >= cfg.stop_at:
            return StopReason.STOP_AT
        if self.parallel.distributed:  # what every rank agreed on at the last boundary
            if self._agreed["stop"]:
                return StopReason.REQUESTED
            if self._agreed["time_budget"]:
                return StopReason.TIME_BUDGET
            return None
        if self._stop.is_set():
            return StopReason.REQUESTED
        if cfg.time_budget is not None and time.perf_counter() - start >= cfg.time_budget:
            return StopReason.TIME_BUDGET
        return None

    def _local_flags(self) -> list[float]:
        """This rank's stop conditions that are not a pure function of the step (_FLAGS)."""
        budget = self.config.time_budget
        with self._requests_lock:
            requested = bool(self._requests)
        return [
            float(self.parallel.interrupted),
            float(self._stop.is_set()),
            float(requested),
            float(budget is not None and time.perf_counter() - self._session_start >= budget),
        ]

    def _checkpoint_reasons(self) -> list[str]:
        reasons = []
        if self.finished:
            reasons.append("end")
        if self.position == 0:
            reasons.append("epoch")
        if self.step == self.plan.decay_start:
            reasons.append("decay_start")
        if self.config.save_every and self.step % self.config.save_every == 0:
            reasons.append("every")
        if self.step in self.repair_steps:
            reasons.append("repair")
        return reasons

    @property
    def async_save(self) -> bool:
        """Whether in-loop checkpoints are written in the background (`config.async_save`).
        Never with several processes: a sharded commit is collective (gathers, barriers), and
        collectives from a second thread would interleave with the step's own all-reduces in an
        order the ranks need not agree on."""
        if self.state_writer is None or self.parallel.distributed:
            return False
        if self.config.async_save is not None:
            return self.config.async_save
        return state_bytes(self.optimizer) > AUTO_BYTES

    def checkpoint(
        self,
        reasons: list[str],
        tags: list[str] = (),
        requests: list[tuple[Future, list[str]]] = (),
        *,
        background: bool = False,
    ) -> Any:
        """Save the state at this boundary through `saver`; return what it returned.

        With `background` (and async saves on) the state is handed to a background writer and
        None is returned; the `checkpoint` event and the requests' results follow once it is
        committed (`finish_save`). Commits keep step order: a save waits for the one in flight.
        """
        tags = sorted({*tags, *(t for _, ts in requests for t in ts)})
        self.finish_save(wait=True)
        if background and self.async_save:
            t0 = time.perf_counter()
            job = self._writer.submit(self.state_writer, self.state_dict(), reasons, tags)
            self._pending = (job, list(requests))
            self.checkpoint_seconds += time.perf_counter() - t0
            return None
        saved = None
        try:
            if self.saver is not None:
                t0 = time.perf_counter()
                with self._guard.critical():  # a Ctrl-C during the write lands after the commit
                    saved = self.saver(self, reasons, tags)
                self.checkpoint_seconds += time.perf_counter() - t0
                self.saved_step = self.step
        except BaseException as err:
            for future, _ in requests:
                future.set_exception(err)
            raise
        for future, _ in requests:
            future.set_result(saved)
        self.emit("checkpoint", reasons=reasons, tags=tags, saved=saved)
        return saved

    def _settle_save(self) -> None:
        """After a failure: wait for the save in flight too (what it committed is kept). Its
        own error, if any, is told as a notice: the failure being raised is the one to report."""
        try:
            self.finish_save(wait=True)
        except Exception as err:
            self.emit("notice", text=f"the checkpoint written in the background failed: {err}")

    def finish_save(self, wait: bool) -> None:
        """Report the checkpoint written in the background once it is committed (its event,
        its requests' results); with `wait`, wait for it (and say so). Re-raises its error."""
        if self._pending is None:
            return
        job, requests = self._pending
        if not job.done.is_set():
            if not wait:
                return
            self.emit("notice", text=f"waiting for the checkpoint of step {job.step} to be written")
            t0 = time.perf_counter()
            with self._guard.critical():  # a Ctrl-C while waiting lands after the commit
                job.done.wait()
            self.checkpoint_seconds += time.perf_counter() - t0
        self._pending = None
        try:
            saved = job.wait()
        except BaseException as err:
            for future, _ in requests:
                future.set_exception(err)
            raise
        self.saved_step = job.step
        for future, _ in requests:
            future.set_result(saved)
        self.emit("checkpoint", at=job.step, reasons=job.reasons, tags=job.tags, saved=saved)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.dataset), self.config.seed, epoch))
        return self._order[1]

    def _train_step(self) -> None:
        cfg, par, module = self.config, self.parallel, self.module
        lr = self.plan.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        module.train()
        order = self.epoch_indices(self.epoch)
        loss_sum = torch.zeros((), device=self.device)
        extra_sums = {name: torch.zeros((), device=self.device) for name in self.objective.metrics}
        tokens = 0
        batch, accum = cfg.batch_size, self.accum
        autocast = self._autocast
        for micro in range(accum):
            # This rank's micro-batches are its slice of the step's window (class docstring).
            index = par.rank * accum + micro
            lo = self.position + index * batch
            indices = order[lo : lo + batch]
            if self.on_batch is not None:
                self.on_batch(self.step, index, indices)
            generator = None
            if self.model_config.dropout > 0:
                # A mask stream per (step, global micro-batch): the same at any world size.
                seed = _mix_seed(cfg.seed, self.step, index)
                generator = torch.Generator(self.device).manual_seed(seed)
            input_ids, labels = self.dataset.batch(indices)
            input_ids = input_ids.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with par.sync_gradients(module, self.model, micro == accum - 1):
                with torch.autocast(
                    self.device.type, autocast or torch.float32, enabled=autocast is not None
                ):
                    loss, extras = self.objective(module, input_ids, labels, generator)
                if self.inject_nonfinite == self.step + 1 and micro == 0:
                    self.inject_nonfinite = None
                    loss = loss * float("nan")
                self.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach()
            for name, value in extras.items():
                extra_sums[name] += value
            tokens += input_ids.numel()
        names = list(extra_sums)
        if par.distributed:
            # One all-reduce per step: the loss, tokens and objective metrics of every rank,
            # and the stop flags.
            stats = torch.tensor(
                [
                    loss_sum.item(),
                    float(tokens),
                    *(extra_sums[n].item() for n in names),
                    *self._local_flags(),
                ],
                dtype=torch.float64,
                device=self.device,
            )
            par.all_sum(stats)
            stats = stats.tolist()
            # The sum in float32, as one process accumulating every micro-batch would have it.
            total = torch.tensor(stats[0], dtype=torch.float32)
            micro_batches = par.world_size * accum
            loss = (total / micro_batches).item()
            tokens = int(stats[1])
            extra_means = [x / micro_batches for x in stats[2 : 2 + len(names)]]
            flags = stats[2 + len(names) :]
            self._agreed = {name: value > 0 for name, value in zip(_FLAGS, flags, strict=True)}
        else:
            loss = (loss_sum / accum).item()
            extra_means = [(extra_sums[n] / accum).item() for n in names]
        params = [p for p in self.model.parameters() if p.grad is not None]
        self.scaler.unscale_(self.optimizer)  # (no-op unless fp16)
        # clip_grad_norm_ split in its two halves (bitwise the same) so that a non-finite step
        # is seen before clipping scales the gradients and before the optimizer applies them.
        # The norm is global: DDP's gradients are averaged already, FSDP2's are reduced here.
        grad_norm = par.grad_norm(params)
        apply = True
        overflow = self.scaler.is_enabled() and math.isfinite(loss)  # fp16: the scaler's job
        if not (math.isfinite(loss) and (overflow or math.isfinite(grad_norm.item()))):
            apply = self._anomaly(Anomaly(self.step + 1, loss, grad_norm.item(), lr))
        elif self.spike_check is not None and (spike := self.spike_check(self, loss)):
            apply = self._anomaly(Anomaly(self.step + 1, loss, grad_norm.item(), lr, spike))
        if self._pending is not None:
            # A save in the background is copying the weights and moments: they change next.
            t0 = time.perf_counter()
            self._pending[0].captured.wait()
            self.checkpoint_seconds += time.perf_counter() - t0
        with self._guard.critical():
            if apply:
                clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
                torch.nn.utils.clip_grads_with_norm_(params, clip, grad_norm)
            if self.scaler.is_enabled():
                scale = self.scaler.get_scale()
                if apply:
                    self.scaler.step(self.optimizer)  # skipped when a gradient is not finite
                self.scaler.update()
                self.skipped += int(self.scaler.get_scale() < scale)
            elif apply:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.tokens += tokens
            self.position += self.samples_per_step
            if self.position >= self.steps_per_epoch * self.samples_per_step:
                self.epoch, self.position = self.epoch + 1, 0
            m = self.metrics
            m["step"].append(self.step)
            m["loss"].append(loss)
            m["lr"].append(lr)
            m["grad_norm"].append(grad_norm.item())
            m["tokens"].append(self.tokens)
            m["time"].append(self.elapsed)
            for name, value in zip(names, extra_means, strict=True):
                m[name].append(value)
        if self.position == 0:
            self.emit("epoch", epoch=self.epoch)
        if self.step % cfg.log_every == 0 or self.finished:
            self.emit(
                "step",
                loss=m["loss"][-1],
                lr=lr,
                tokens=self.tokens,
                grad_norm=m["grad_norm"][-1],
                **{name: m[name][-1] for name in self.objective.metrics},
            )

    def _anomaly(self, anomaly: Anomaly) -> bool:
        """Ask the anomaly policy; True to apply the update anyway (never by default)."""
        self.finish_save(wait=True)  # a rollback reads the store: the commit in flight first
        with self._guard.critical():  # a rollback restores the whole state or nothing
            action = self.on_anomaly(self, anomaly)
        if action == AnomalyAction.SKIP:
            return False
        self.optimizer.zero_grad(set_to_none=True)
        if action == AnomalyAction.ROLLBACK:
            raise _RolledBack
        if action != AnomalyAction.STOP:
            raise ValueError(
                f"anomaly policy returned {action!r}; expected 'stop', 'skip' or 'rollback'"
            )
        error = NonFiniteError(anomaly, self.saved_step)
        self.emit("stop", reason="anomaly", text=str(error))
        raise error

    # ---- state ----
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, as tensors, arrays and JSON-able values (no objects).

        With FSDP2 the weights and moments are DTensors (this rank's rows), from
        `torch.distributed.checkpoint.state_dict`; the store writes each rank's rows to its
        shard file. Distributed, every rank calls this (it gathers the RNG states).
        """
        par = self.parallel
        names = self.param_names
        optim = self.optimizer.state_dict()
        state = {names[i]: dict(s) for i, s in optim["state"].items()}
        groups = [
            {
                **{k: v for k, v in g.items() if k != "params"},
                "params": [names[i] for i in g["params"]],
            }
            for g in optim["param_groups"]
        ]
        # A LoRA checkpoint holds the adapters; only the first of a run started as LoRA holds
        # the base too (it is the base the later ones refer to, see mmnb.stages).
        adapters_only = self.lora and "base" in self.frozen
        if par.mode == "fsdp":
            from torch.distributed.checkpoint import state_dict as dcp

            model_state = dcp.get_model_state_dict(self.model)
            # Only once AdamW has state: on an empty optimizer get_optimizer_state_dict takes
            # a zero-gradient step to create it, and its step count would then be off by one.
            if self.optimizer.state:
                sharded = dcp.get_optimizer_state_dict(self.model, self.optimizer)
                state, groups = sharded["state"], sharded["param_groups"]
        elif adapters_only:
            model_state = lora.adapter_state(self.model)
        else:
            model_state = self.model.state_dict()
        rng = rng_state(self.device)
        if par.distributed:  # every rank's streams, for that rank when resumed at this size
            ranks = par.gather(rng)
            if ranks is not None:
                rng["ranks"] = {str(r): s for r, s in enumerate(ranks)}
        state = {
            "model": model_state,
            "optim": {"state": state, "param_groups": groups},
            "schedule": {"plan": self.plan.to_dict(), "step": self.step},
            "rng": rng,
            "data": {
                "epoch": self.epoch,
                "position": self.position,
                "seed": self.config.seed,
                "num_samples": len(self.dataset),
                "fingerprint": self.dataset.fingerprint,
            },
            "trainer": {
                "step": self.step,
                "epoch": self.epoch,
                "tokens": self.tokens,
                "elapsed": self.elapsed,
                "world_size": par.world_size,
                "mode": par.mode,
                "threads": torch.get_num_threads(),  # a resume with another count warns
            },
            "metrics": {k: np.asarray(v, dtype=np.float64) for k, v in self.metrics.items()},
        }
        if self.scaler.is_enabled():
            state["scaler"] = {**self.scaler.state_dict(), "skipped": self.skipped}
        if self.frozen:
            state["frozen"] = dict(self.frozen)
        return state

    def load_base(self, weights: dict[str, torch.Tensor]) -> None:
        """The frozen base weights of a LoRA stage (every key of a MiniMind state dict)."""
        self._load_weights(weights, lora.base_state(self.model))

    def load_counters(self, sd: dict[str, Any], *, restore_rng: bool = True) -> None:
        """Plan, counters, data position and metrics of `sd`, not its weights or optimizer:
        the start of a stage whose trainable parameters differ from the checkpoint's."""
        self.plan = Plan.from_dict(sd["schedule"]["plan"])
        t = sd["trainer"]
        self.step, self.epoch, self.tokens = int(t["step"]), int(t["epoch"]), int(t["tokens"])
        self.elapsed = float(t["elapsed"])
        threads = t.get("threads")  # (checkpoints before it was recorded have none)
        self._saved_threads = threads if isinstance(threads, int) and threads > 0 else None
        self.position = int(sd["data"]["position"])
        # A metric this objective logs and the checkpoint's did not (DPO's rewards after an LM
        # stage) is NaN for the steps before: every metric stays aligned with "step".
        steps = len(sd["metrics"]["step"])
        self.metrics = {
            k: [float(x) for x in sd["metrics"][k]] if k in sd["metrics"] else [math.nan] * steps
            for k in self.metric_names
        }
        self.saved_step = self.step  # the state came from a checkpoint of this step
        scaler = dict(sd.get("scaler") or {})
        self.skipped = int(scaler.pop("skipped", 0))
        if scaler and self.scaler.is_enabled():
            self.scaler.load_state_dict(scaler)
        if restore_rng:
            rng = sd["rng"]
            # This rank's own streams when the checkpoint has them (same world size).
            rng = rng.get("ranks", {}).get(str(self.parallel.rank), rng)
            set_rng_state(rng, self.device)

    def _load_weights(
        self, weights: dict[str, torch.Tensor], into: dict[str, torch.Tensor]
    ) -> None:
        missing = sorted(set(into) - set(weights))
        extra = sorted(set(weights) - set(into))
        if missing or extra:
            what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
            raise ValueError(f"checkpoint weights do not fit this model ({what})")
        with torch.no_grad():
            for name, tensor in into.items():
                tensor.copy_(weights[name])

    def load_state_dict(self, sd: dict[str, Any], *, restore_rng: bool = True) -> None:
        """Restore `sd`, whose tensors may be whole tensors or `TensorRef`s not read yet
        (`store.sharded.read_lazy`): each rank then reads only what it holds."""
        optim = sd["optim"]
        if self.parallel.mode == "fsdp":
            _load_sharded(self.model, self.optimizer, sd["model"], optim)
        else:
            weights = {k: _whole(v) for k, v in sd["model"].items()}
            if self.lora:  # the adapters; the base came through load_base
                if any(lora.MARK not in k for k in weights):  # a LoRA run's first: base too
                    self.load_base({k: v for k, v in weights.items() if lora.MARK not in k})
                adapters = {k: v for k, v in weights.items() if lora.MARK in k}
                self._load_weights(adapters, lora.adapter_state(self.model))
            else:
                self.model.load_state_dict(weights)
            names = self.param_names
            index = {n: i for i, n in enumerate(names)}
            self.optimizer.load_state_dict(
                {
                    # A loaded checkpoint's tensors are copy-on-write views of its file
                    # (`Run.load`); the optimizer keeps the tensors it is given, so it gets its
                    # own copies: training must not keep the file mapped (a checkpoint deleted
                    # by retention would hold its space).
                    "state": {
                        index[n]: _own({k: _whole(v) for k, v in s.items()})
                        for n, s in optim["state"].items()
                    },
                    "param_groups": [
                        {**g, "params": [index[n] for n in g["params"]]}
                        for g in optim["param_groups"]
                    ],
                }
            )
        # References the checkpoint records; those it does not (a LoRA run's first checkpoint
        # is its own base) stay as they are.
        self.frozen = {**self.frozen, **sd.get("frozen", {})}
        # Hyperparameters come from this trainer's config (a branch may change them); lr is
        # set from the plan at every step.
        for group in self.optimizer.param_groups:
            group.update(
                betas=(self.config.beta1, self.config.beta2),
                eps=self.config.eps,
                weight_decay=self.config.weight_decay,
            )
        self.load_counters(sd, restore_rng=restore_rng)


def _own(slots: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in slots.items()}


@contextlib.contextmanager
def _flush_denormals() -> Iterator[None]:
    """Treat denormal floats as zero while training (the CPU default is off).

    Late in training, AdamW's second moments and some activations reach the denormal range,
    where x86 arithmetic is up to 100x slower: a tiny-preset step was seen to go from 65 ms to
    2.7 s. Flushing is deterministic, so it is part of every run's trajectory.
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The global RNG streams: torch CPU, CUDA, numpy's legacy global, `random`.

    CUDA: the state of `device` when it is a GPU (a rank saves its own GPU's), else of every
    GPU this process has already initialised.
    """
    np_state = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": np.asarray(np_state[1], dtype=np.uint32),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": version,
            "state": np.asarray(py_state, dtype=np.uint64),
            "gauss": gauss,
        },
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = {str(device.index): torch.cuda.get_rng_state(device)}
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = {str(i): s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np.asarray(n["keys"], dtype=np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        count = torch.cuda.device_count()
        for index, value in state["cuda"].items():
            if device is not None and device.type == "cuda" and int(index) != device.index:
                continue  # another rank's GPU
            if int(index) < count:
                torch.cuda.set_rng_state(torch.as_tensor(value, dtype=torch.uint8), int(index))


@contextlib.contextmanager
def _precision(device: torch.device, tf32: bool) -> Iterator[None]:
    """CUDA numerics while training: TF32 only when asked for, deterministic algorithms.

    Exact resume needs every kernel to be deterministic; on CUDA that is
    `torch.use_deterministic_algorithms(True)` (with cuBLAS's fixed workspace, set by
    `mmnb.dist` before CUDA starts). CPU kernels are deterministic for a fixed thread count.
    """
    if device.type != "cuda":
        yield
        return
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
    )
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.use_deterministic_algorithms(saved[2])
        torch.backends.cudnn.benchmark = saved[3]


def _whole(value: Any) -> Any:
    """A tensor from a checkpoint tree: read now if it is a `TensorRef`."""
    return value.read() if hasattr(value, "read") else value


def _load_sharded(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_tree: dict[str, Any],
    optim_tree: dict[str, Any],
) -> None:
    """Load a checkpoint of any layout into an FSDP2 model, reading only this rank's rows.

    The model's own sharded state dict says which rows of each tensor this rank holds; those
    rows are read (from a virtual dataset over shard files, or from a whole dataset) and set
    through `torch.distributed.checkpoint.state_dict.set_state_dict`.
    """
    from torch.distributed.checkpoint import state_dict as dcp
    from torch.distributed.tensor import DTensor

    def local(target: Any, value: Any) -> Any:
        if not isinstance(target, DTensor):
            return _whole(value).to(target.device)
        (chunk,) = target.__create_chunk_list__()
        start, rows = chunk.offsets[0], chunk.sizes[0]
        if hasattr(value, "read"):
            part = value.read((start, start + rows))
        else:
            part = value[start : start + rows].clone()  # (not a view of a mapped file)
        return DTensor.from_local(
            part.to(target.device, target.dtype),
            target.device_mesh,
            target.placements,
            shape=target.shape,
            stride=target.stride(),
        )

    model_target = dcp.get_model_state_dict(model)
    model_state = {name: local(t, model_tree[name]) for name, t in model_target.items()}
    dcp.set_model_state_dict(model, model_state)
    if not optim_tree["state"]:  # a checkpoint before the first step: AdamW starts empty
        optimizer.state.clear()
        return
    # (This creates AdamW's state by a zero-gradient step; the checkpoint's replaces all of it.)
    optim_target = dcp.get_optimizer_state_dict(model, optimizer)
    optim_state = {
        name: {slot: local(t, optim_tree["state"][name][slot]) for slot, t in slots.items()}
        for name, slots in optim_target["state"].items()
    }
    dcp.set_optimizer_state_dict(
        model,
        optimizer,
        {"state": optim_state, "param_groups": optim_tree["param_groups"]},
    )
