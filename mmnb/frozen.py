"""Frozen weights a stage refers to instead of copying: a LoRA run's base, a DPO run's reference.

A reference is `{"run", "step", "digest"}`: a checkpoint of the same store and the digest of the
weights it holds. For a full checkpoint that is `weights_digest` of its model tensors; a LoRA
checkpoint holds only adapters, so its digest covers the adapters and its own base reference's
digest (no float arithmetic is involved: the digest is the same on every machine). Resolving a
reference reads that checkpoint — a LoRA checkpoint through its base, recursively — recomputes
the digest and refuses a mismatch, so a rewritten or corrupted base never silently changes a run.

The base or reference checkpoint is the branch point of the stage (or a checkpoint the stage's
parent referred to), so the store's rule that a branch point is never deleted keeps it alive.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import TYPE_CHECKING, Any

import torch
import xxhash
from torch import Tensor

from . import lora
from .config import ModelConfig, TrainConfig, config_from_dict
from .model import MiniMind
from .store import StoreError
from .store.streamed import streamed_checkpoint

if TYPE_CHECKING:
    from .store import Run, Store

MAX_DEPTH = 64  # LoRA on LoRA on …: a cycle in a hostile store must not recurse forever


def model_keys(cfg: ModelConfig) -> list[str]:
    """State-dict keys of a MiniMind model of `cfg`, in module order (as torch.save writes)."""
    return list(_model_keys(json.dumps(dataclasses.asdict(cfg), sort_keys=True)))


@functools.lru_cache(maxsize=16)
def _model_keys(cfg_json: str) -> tuple[str, ...]:
    with torch.device("meta"):
        return tuple(MiniMind(ModelConfig(**json.loads(cfg_json))).state_dict())


def _configs(run: Run) -> tuple[ModelConfig, TrainConfig]:
    return config_from_dict(run.config_dict())


def _digest(state: dict[str, Any], train: TrainConfig) -> str:
    from .weights import weights_digest

    own = weights_digest(state["model"])
    base = state.get("frozen", {}).get("base")
    if not train.lora_rank or base is None:  # full weights (a LoRA run's first: base + adapters)
        return own
    return xxhash.xxh3_128_hexdigest(f"{own}|{base['digest']}".encode())


def _base_of(state: dict[str, Any], run: Run, depth: int) -> dict[str, Tensor]:
    """The base weights of a LoRA checkpoint: referred to, or (the run's first) held in it."""
    ref = state.get("frozen", {}).get("base")
    if ref is None:
        return {k: v for k, v in state["model"].items() if lora.MARK not in k}
    holder = run.store.run(ref["run"])
    return checkpoint_weights(holder, int(ref["step"]), _digest_=ref["digest"], _depth=depth + 1)


def _load(run: Run, step: int, digest: str | None, depth: int) -> tuple[dict[str, Any], Any]:
    if depth > MAX_DEPTH:
        raise StoreError(f"frozen-weight references nest deeper than {MAX_DEPTH} at {run.name}")
    state = run.load(step, groups=("model", "frozen"))
    model_cfg, train_cfg = _configs(run)
    if digest is not None and _digest(state, train_cfg) != digest:
        raise StoreError(
            f"the frozen weights at {run.name}@{step} do not match the digest recorded when "
            "they were referred to; they were changed or corrupted"
        )
    return state, (model_cfg, train_cfg)


def checkpoint_weights(
    run: Run,
    step: int,
    *,
    mapped: bool = False,
    streamed: bool = False,
    _digest_: str | None = None,
    _depth: int = 0,
):
    """The full model weights of `run` at `step` — a LoRA checkpoint's adapters merged into its
    base — with MiniMind's keys in module order, in the dtype they were saved in.

    For a caller that only passes the bytes on: `mapped`, read-only tensors over an mmap of the
    checkpoint file (checksums verified; never write into them); `streamed`, where the file
    allows, `mmnb.store.streamed.Streamed` sources that verify their bytes while a writer
    copies them (`streamed.whole` makes one a tensor)."""
    if mapped or streamed:
        model_cfg, train_cfg = _configs(run)
        if train_cfg.lora_rank:
            tensors = None
        else:
            tensors = streamed_checkpoint(run, step) if streamed else _mapped(run, step)
        if tensors is not None:
            return {k: tensors[k] for k in model_keys(model_cfg)}
    state, (model_cfg, train_cfg) = _load(run, step, _digest_, _depth)
    weights = state["model"]
    if train_cfg.lora_rank:
        adapters = {k: v for k, v in weights.items() if lora.MARK in k}
        weights = lora.merge(_base_of(state, run, _depth), adapters, _scale(train_cfg))
    return {k: weights[k] for k in model_keys(model_cfg)}


def _mapped(run: Run, step: int) -> dict[str, Tensor] | None:
    import warnings

    from .store.h5state import numpy_to_tensor

    views = run.mapped(step, "model")  # checked like a load (mmnb.store.mapped)
    if views is None:
        return None
    with warnings.catch_warnings():  # read-only memory: torch warns that it cannot write it
        warnings.simplefilter("ignore", UserWarning)
        return {k: numpy_to_tensor(array, dtype) for k, (array, dtype) in views.items()}


def _scale(train: TrainConfig) -> float:
    return (train.lora_alpha or train.lora_rank) / train.lora_rank


def reference(run: Run, step: int) -> dict[str, Any]:
    """A reference to the weights of `run` at `step`, recorded where it is used."""
    owner = run.step_info(step).run  # the run that wrote it (a branch inherits early steps)
    holder = run.store.run(owner)
    state, (_, train_cfg) = _load(holder, step, None, 0)
    return {"run": owner, "step": step, "digest": _digest(state, train_cfg)}


def resolve(store: Store, ref: dict[str, Any]) -> dict[str, Tensor]:
    """The full weights `ref` refers to, verified against its digest."""
    return checkpoint_weights(store.run(ref["run"]), int(ref["step"]), _digest_=ref["digest"])


def build_model(run: Run, step: int, digest: str | None = None) -> MiniMind:
    """The model of a checkpoint in eval mode, frozen, computing exactly what it computed while
    training: a LoRA checkpoint gets its adapters on its base (not merged)."""
    state, (model_cfg, train_cfg) = _load(run, step, digest, 0)
    with torch.device("meta"):
        model = MiniMind(model_cfg)
    if train_cfg.lora_rank:
        model.to_empty(device="cpu")
        model.lm_head.weight = model.model.embed_tokens.weight
        targets = lora.targets_of(train_cfg.lora_targets)
        alpha = train_cfg.lora_alpha or train_cfg.lora_rank
        lora.apply(model, train_cfg.lora_rank, alpha, targets, seed=0)
        base = _base_of(state, run, 0)
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                tensor.copy_(state["model"][name] if lora.MARK in name else base[name])
    else:
        model.load_state_dict(state["model"], assign=True)
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True unties; tie again
    model.requires_grad_(False)
    return model.eval()


__all__ = ["build_model", "checkpoint_weights", "model_keys", "reference", "resolve"]
