"""How a checkpoint enters a trainer when the stage may differ: LoRA on or off, DPO or not.

The rules, applied where a run resumes or branches (`api._restore`):

- Same trainable parameters as the checkpoint (no LoRA on either side, or the same LoRA rank,
  alpha and targets): weights, AdamW state and counters are loaded as for any resume; a LoRA
  checkpoint's base comes from the reference it carries, verified.
- At a branch point where they differ (LoRA added, changed or removed): the new stage starts
  from the checkpoint's full weights (adapters merged) with a fresh AdamW and fresh adapters
  (drawn from the seed, so resuming at the branch point redraws the same ones); a LoRA stage
  refers to that checkpoint as its frozen base. Counters, plan and metrics carry on.
- A run that is LoRA or DPO from its start (`mmnb train --lora-rank …`) writes its step-0
  checkpoint whole; that checkpoint is its base and its reference, and later ones refer to it.
- DPO: the reference model is the branch point where the objective became `dpo`, and a later
  branch or resume of that stage keeps it. When it is also the LoRA base, the reference is the
  policy with its adapters switched off: no second copy of the weights in memory.
"""

from __future__ import annotations

from typing import Any

import torch

from . import frozen, lora
from .config import TrainConfig
from .store import Run, Store
from .train import Trainer

LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")


def _lora_key(cfg: TrainConfig) -> tuple:
    if not cfg.lora_rank:
        return ()
    return (cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank, lora.targets_of(cfg.lora_targets))


def load(
    trainer: Trainer,
    state: dict[str, Any],
    store: Store,
    owner: Run,
    old: TrainConfig,
    at_branch: bool,
) -> None:
    """Put checkpoint `state` (written by run `owner` under train config `old`) into `trainer`,
    with the frozen weights its stage refers to."""
    step = int(state["trainer"]["step"])
    cfg = trainer.config
    recorded = dict(state.get("frozen", {}))
    if at_branch and _lora_key(old) != _lora_key(cfg):
        weights = frozen.checkpoint_weights(owner, step)
        if trainer.lora:
            trainer.load_base(weights)
        else:
            trainer.model.load_state_dict(weights)
        trainer.load_counters(state)
        trainer.frozen = {"base": frozen.reference(owner, step)} if trainer.lora else {}
    else:
        if trainer.lora and "base" in recorded:
            trainer.load_base(frozen.resolve(store, recorded["base"]))
        elif trainer.lora:  # the first checkpoint of a LoRA run holds its base itself
            recorded["base"] = frozen.reference(owner, step)
        trainer.load_state_dict(state)
        trainer.frozen = {k: v for k, v in recorded.items() if k == "base" and trainer.lora}
    if cfg.objective != "dpo":
        return
    if at_branch and old.objective != "dpo":
        ref = frozen.reference(owner, step)  # the stage's start is its reference
    elif "reference" in recorded:
        ref = recorded["reference"]
    else:  # the first checkpoint of a run that trains DPO from its start is its reference
        ref = frozen.reference(owner, step)
    trainer.frozen["reference"] = ref
    install_reference(trainer, store, ref)


def install_reference(trainer: Trainer, store: Store, ref: dict[str, Any]) -> None:
    """Give the DPO objective its frozen reference model's logits."""
    model = trainer.model
    if trainer.lora and trainer.frozen.get("base") == ref:

        def logits(input_ids: torch.Tensor) -> torch.Tensor:
            was = model.training
            model.eval()  # no dropout: the reference is a fixed function
            try:
                with lora.disabled(model):
                    return model(input_ids).logits
            finally:
                model.train(was)

    else:
        reference = frozen.build_model(store.run(ref["run"]), int(ref["step"]), ref["digest"])
        reference.to(trainer.device)

        def logits(input_ids: torch.Tensor) -> torch.Tensor:
            return reference(input_ids).logits

    trainer.objective.reference = logits


__all__ = ["LORA_FIELDS", "install_reference", "load"]
