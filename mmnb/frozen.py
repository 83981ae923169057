"""Frozen weights a stage refers to instead of copying: a LoRA run's base, a DPO run's reference.

A reference is `{"run", "step", "digest"}`: a checkpoint of the same store and the
`weights_digest` of the full weights it stands for. Resolving one reads that checkpoint (a LoRA
checkpoint is resolved recursively through its own base and merged), recomputes the digest and
refuses a mismatch, so a rewritten or corrupted base can never silently change a run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .config import ModelConfig, config_from_dict
from .model import MiniMind
from .store import StoreError

if TYPE_CHECKING:
    from .store import Run, Store


def checkpoint_weights(run: Run, step: int) -> dict[str, Tensor]:
    """The full model weights of `run` at `step`: MiniMind's keys in its module order, in the
    dtype they were saved in."""
    state = run.load(step, groups=("model",))["model"]
    return {k: state[k] for k in model_keys(config_from_dict(run.config_dict())[0])}


def model_keys(cfg: ModelConfig) -> list[str]:
    """State-dict keys of a MiniMind model of `cfg`, in module order (as torch.save writes)."""
    with torch.device("meta"):
        return list(MiniMind(cfg).state_dict())


def reference(run: Run, step: int) -> dict[str, Any]:
    """A reference to (run, step), with the digest of the weights it stands for."""
    from .weights import weights_digest

    return {"run": run.name, "step": step, "digest": weights_digest(checkpoint_weights(run, step))}


def resolve(store: Store, ref: dict[str, Any]) -> dict[str, Tensor]:
    """The weights `ref` refers to, verified against its digest."""
    from .weights import weights_digest

    run = store.run(ref["run"])
    state = checkpoint_weights(run, int(ref["step"]))
    if weights_digest(state) != ref["digest"]:
        raise StoreError(
            f"the frozen weights at {ref['run']}@{ref['step']} do not match the digest recorded "
            "when this run referred to them; they were changed or corrupted"
        )
    return state


__all__ = ["checkpoint_weights", "reference", "resolve"]
