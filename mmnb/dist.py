"""Distributed training on torch.distributed: rank roles, the process group, DDP and FSDP2.

torchrun (`torch.distributed.run`) starts the processes — locally, on several nodes through its
c10d rendezvous, and again after a failure with `--max-restarts` — and tells each one its place
through the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT,
TORCHELASTIC_RESTART_COUNT). `Parallel.from_env()` reads it; nothing here spawns a process or
opens a socket of its own.

Rank roles: every rank builds the same model, reads its slice of each optimizer step's window
of the epoch order, and loads the checkpoint (the part it needs). Rank 0 alone decides (run
name, which checkpoint to load), holds the run's writer lock, writes the index and the
replicated state, and is the only one with listeners (progress, event stream). What rank 0
decides reaches the others through `decide()`; every rank then acts on the same value.

A SIGINT does not raise in a distributed process: an exception at a random point of one rank
would leave the others waiting in a collective. It sets a flag that the trainer all-reduces at
the next optimizer-step boundary, so every rank stops at the same step, checkpoints it
together and then raises KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

T = TypeVar("T")

MODES = ("single", "ddp", "fsdp")


def resolve_device(spec: str | None = "auto", local_rank: int = 0) -> torch.device:
    """`auto` (the default): CUDA if available (this rank's GPU), else Apple's MPS, else CPU.

    Any other spec is checked by `mmnb.validate.check_device`; `cuda` without an index means
    this process's GPU (LOCAL_RANK) under torchrun.
    """
    from .validate import check_device

    spec = (spec or "auto").strip()
    if spec == "auto":
        if torch.cuda.is_available():
            return _deterministic_cuda(torch.device("cuda", local_rank % torch.cuda.device_count()))
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(check_device(spec))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return _deterministic_cuda(device)


def _deterministic_cuda(device: torch.device) -> torch.device:
    """cuBLAS is deterministic only with a fixed workspace, set before its first handle; the
    trainer turns on `torch.use_deterministic_algorithms` while it trains (train._precision)."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return device


def backend_for(device: torch.device) -> str:
    """nccl between GPUs, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) outside it."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def restart_count() -> int:
    """How often torchrun's agent has restarted this worker group (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def job_id() -> str | None:
    """torchrun's rendezvous id: the same for every rank and every restart of one job."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def session_accum(world_size_planned: int, batch_size: int, accum: int, world_size: int) -> int:
    """Micro-batches per rank that keep the planned global batch at `world_size` processes.

    A run's global batch is `world_size x batch_size x accum` samples of the session that
    planned it; another world size keeps `batch_size` and divides the micro-batches anew.
    """
    micro = world_size_planned * accum  # micro-batches of batch_size per step, all ranks together
    if micro % world_size:
        raise ValueError(
            f"the run's global batch of {micro * batch_size} samples (world_size "
            f"{world_size_planned} x batch_size {batch_size} x accum {accum}) cannot be split "
            f"evenly over {world_size} processes with batch_size {batch_size}: use a number of "
            f"processes that divides {micro}, or branch with another --batch-size/--accum"
        )
    return micro // world_size


@dataclass
class Parallel:
    """This process's place in a (possibly one-process) training job, and its collectives."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "single"  # single | ddp | fsdp
    backend: str | None = None  # the process group's backend; None for one process
    restarts: int = 0  # TORCHELASTIC_RESTART_COUNT
    job: str | None = None  # torchrun's rendezvous id
    interrupted: bool = False  # a SIGINT arrived; acted on at the next step boundary
    _owns_group: bool = False
    _previous_sigint: Any = None

    # ---- life cycle ----
    @classmethod
    def from_env(cls, device: str | None = "auto", shard: bool = False) -> Parallel:
        """Join the job torchrun started (a plain one-process Parallel outside torchrun).

        DDP when there are several processes, FSDP2 with `shard`; the process group uses
        nccl on CUDA and gloo on CPU.
        """
        rank, world, local = env_world()
        dev = resolve_device(device, local)
        par = cls(
            device=dev,
            rank=rank,
            world_size=world,
            local_rank=local,
            restarts=restart_count(),
            job=job_id(),
        )
        if world > 1:
            if dev.type == "mps":
                raise ValueError("--device mps cannot be used by several processes")
            par.mode = "fsdp" if shard else "ddp"
            par.backend = backend_for(dev)
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            if not torch_dist.is_initialized():
                torch_dist.init_process_group(
                    par.backend,
                    store=_attempt_store(rank, world),
                    rank=rank,
                    world_size=world,
                    timeout=_TIMEOUT,
                    device_id=dev if dev.type == "cuda" else None,
                )
                par._owns_group = True
            par._install_sigint()
        return par

    def close(self) -> None:
        """Leave the process group (if this object joined it) and restore SIGINT."""
        if self._previous_sigint is not None:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
        if self._owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
            self._owns_group = False

    def _install_sigint(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handle(signum: int, frame: Any) -> None:
            self.interrupted = True

        self._previous_sigint = signal.signal(signal.SIGINT, handle)

    # ---- roles ----
    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """What a session records in the run's history."""
        return {
            "world_size": self.world_size,
            "mode": self.mode,
            "backend": self.backend,
            "device": self.device.type,
            "restarts": self.restarts,
            "job": self.job,
        }

    # ---- collectives (no-ops for one process) ----
    def barrier(self) -> None:
        if self.distributed:
            torch_dist.barrier()

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` on every rank (pickled between the job's own processes only)."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's `value`, in rank order, on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [value]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        torch_dist.gather_object(value, out, dst=0)
        return out

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.all_sum(t).item() > 0)

    def decide(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 and give its result to every rank.

        If it raises, rank 0 re-raises the error and every other rank raises one of the same
        type and message marked `reported_elsewhere`, so a user sees one line, not N.
        """
        if not self.distributed:
            return fn()
        result: Any = None
        failure: tuple[bool, str] | None = None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:
                from .cli import user_errors, user_message

                user = isinstance(err, user_errors())
                failure = (user, user_message(err) if user else f"{type(err).__name__}: {err}")
                local = err
        result, failure = self.broadcast((result, failure))
        if failure is not None:
            if self.is_main:
                raise local
            error = _rebuild(*failure)
            error.reported_elsewhere = True  # type: ignore[attr-defined]
            raise error
        return result

    # ---- models ----
    def wrap(self, model: torch.nn.Module, compile: bool = False, seq_len: int = 0) -> Any:
        """What the training loop calls: the model (one process), a DDP wrapper (replicated
        weights), or the model sharded in place by FSDP2 (per decoder block and the root) —
        each through `torch.compile` with `compile` (`mmnb.speed.compile_model`, whose wrapper
        shares the model's parameters: state-dict keys do not change). Build the optimizer
        after this: FSDP2 replaces the parameters by DTensors."""
        from .speed import compile_model

        if self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            return compile_model(model, seq_len) if compile else model
        forward = compile_model(model, seq_len) if compile else model
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # DDP around the compiled module (its parameters are the model's): gradients are
            # reduced by DDP's hooks on them, compiled or not. (The trainer primes it before
            # its first step: `Trainer._prime`.)
            return DistributedDataParallel(
                forward, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        return forward

    @contextlib.contextmanager
    def sync_gradients(self, module: Any, model: torch.nn.Module, sync: bool) -> Iterator[None]:
        """Gradient reduction only on the last micro-batch of an optimizer step (DDP's
        `no_sync()` on the others; FSDP2's `set_requires_gradient_sync` on `model`)."""
        if self.mode == "ddp" and not sync:
            with module.no_sync():
                yield
            return
        if self.mode == "fsdp":
            model.set_requires_gradient_sync(sync)
        yield

    def grad_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """The global 2-norm of the gradients of `params`, the same value on every rank."""
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.mode == "fsdp" and hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()  # a DTensor holding each rank's partial norm
        # DDP's gradients are averaged over ranks already: the local norm is the global one.
        return norm

    def grad_scaler(self, enabled: bool) -> torch.amp.GradScaler:
        """fp16's loss scaler; with sharded gradients it agrees across ranks on skipping."""
        if enabled and self.mode == "fsdp":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(self.device.type)
        return torch.amp.GradScaler(self.device.type, enabled=enabled)


_TIMEOUT = datetime.timedelta(minutes=30)  # a collective waits this long for a slow rank


def _attempt_store(rank: int, world: int) -> torch_dist.Store | None:
    """The rendezvous store of this attempt, under torchrun; None elsewhere (env:// then).

    torchrun's agent keeps one store for every restart of the worker group, and the process
    group's keys (each rank's gloo address, nccl's unique id) are not cleared between attempts:
    a restarted rank can read its peer's address from the failed attempt and fail to connect
    (seen with torch 2.13 and gloo). A prefix per attempt keeps each attempt's keys its own.
    """
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    master = not agent_store and rank == 0  # else the agent (or rank 0) hosts it
    store = torch_dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=master,
        timeout=_TIMEOUT,
        multi_tenant=master,
    )
    return torch_dist.PrefixStore(f"mmnb/attempt/{restart_count()}", store)


_LAUNCH_FLAGS = {"--nproc": True, "--max-restarts": True}  # flag -> takes a value


def worker_argv(argv: list[str]) -> list[str]:
    """`argv` without the flags that only the launching process reads (--nproc, ...): what
    every rank of the job `mmnb.launch` starts runs."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in _LAUNCH_FLAGS:
            skip = _LAUNCH_FLAGS[flag] and "=" not in arg
            continue
        out.append(arg)
    return out


def _rebuild(user: bool, message: str) -> Exception:
    """The error rank 0 met, for the other ranks: a user error (ValueError: exit status 2,
    like rank 0's) or a failure (RuntimeError); rank 0 alone reports it."""
    return ValueError(message) if user else RuntimeError(message)


__all__ = [
    "MODES",
    "Parallel",
    "backend_for",
    "env_world",
    "job_id",
    "resolve_device",
    "restart_count",
    "session_accum",
    "worker_argv",
]
