"""What a training step minimises: the language-modelling loss, or DPO's preference loss.

The trainer calls `objective(model, input_ids, labels, generator)` for each micro-batch and
gets `(loss, metrics)`; everything else about a step (accumulation, clipping, AdamW, counters)
is the same for both. Metrics are detached scalars the trainer averages over the step and
logs under `objective.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Reference = Callable[[Tensor], Tensor]  # input_ids [N, T] -> logits [N, T, V], no grad


class LanguageModelling:
    """Next-token cross-entropy on the labelled tokens (plus the MoE aux loss)."""

    name = "lm"
    metrics: tuple[str, ...] = ()

    def __call__(
        self, model: nn.Module, input_ids: Tensor, labels: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return model(input_ids, labels, generator=generator).loss, {}


def sequence_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of log p(label) over each row's labelled positions (labels shifted here): [N]."""
    targets = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="none",
    )
    return -nll.view(targets.shape).sum(dim=1)


class DirectPreference:
    """DPO (Rafailov et al. 2023): -log σ(β [(log π_c - log π_r) - (log ref_c - log ref_r)]).

    The batch holds B chosen rows then their B rejected rows (`PreferenceDataset.batch`); the
    log-probabilities are sums over the assistant tokens. `reference` gives the frozen
    reference model's logits; it is installed by the trainer before the first step.
    Metrics: reward_margin = mean β[(log π_c - log ref_c) - (log π_r - log ref_r)] and
    reward_accuracy = share of pairs whose chosen reward exceeds the rejected one.
    """

    name = "dpo"
    metrics = ("reward_margin", "reward_accuracy")

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.reference: Reference | None = None

    def __call__(
        self, model: nn.Module, input_ids: Tensor, labels: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if self.reference is None:
            raise RuntimeError("the DPO reference model is not installed")
        with torch.no_grad():
            ref = sequence_logps(self.reference(input_ids), labels)
        out = model(input_ids, generator=generator)
        policy = sequence_logps(out.logits, labels)
        rewards = self.beta * (policy - ref)  # [2B]: implicit rewards
        chosen, rejected = rewards.chunk(2)
        loss = -F.logsigmoid(chosen - rejected).mean() + out.aux_loss
        margin = (chosen - rejected).detach()
        return loss, {
            "reward_margin": margin.mean(),
            "reward_accuracy": (margin > 0).float().mean(),
        }


def objective_for(name: str, beta: float) -> LanguageModelling | DirectPreference:
    return DirectPreference(beta) if name == "dpo" else LanguageModelling()


__all__ = ["DirectPreference", "LanguageModelling", "objective_for", "sequence_logps"]
