"""Learning-rate schedules as data: a `Plan` and a pure function of (plan, optimizer step).

A plan is what a checkpoint stores (never a lambda), so a resumed run computes the same lr,
and an extended WSD run can re-plan its decay without touching the stable phase.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Plan:
    kind: str  # wsd | cosine | constant | minimind
    lr: float  # peak learning rate
    total: int  # planned optimizer steps (the horizon)
    warmup: int = 0  # linear warmup steps, from lr/warmup up to lr
    min_ratio: float = 0.1  # cosine/wsd: lr at the end is lr * min_ratio
    decay_fraction: float = 0.2  # wsd: fraction of `total` spent decaying
    decay_shape: str = "linear"  # wsd: linear | 1-sqrt
    start: int = 0  # optimizer step where this plan begins (a fine-tuning stage starts later)

    @property
    def end(self) -> int:
        """The optimizer step count at which the plan is complete."""
        return self.start + self.total

    @property
    def decay_start(self) -> int | None:
        """wsd: the first optimizer step whose lr is below the stable lr (None otherwise).

        A checkpoint taken here is where an extension continues: everything before it is
        independent of `total`.
        """
        if self.kind != "wsd":
            return None
        return self.start + max(self.warmup, self.total - round(self.decay_fraction * self.total))

    def lr_at(self, step: int) -> float:
        """lr for the optimizer update that turns step `step` into `step + 1` (0-based)."""
        return lr_at(self, step)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(**data)


def lr_at(plan: Plan, step: int) -> float:
    step -= plan.start
    if plan.kind == "minimind":
        # MiniMind's get_lr: cosine from lr (t=0) to lr/10 (t=T), no warmup.
        return plan.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / plan.total)))
    if step < plan.warmup:
        return plan.lr * (step + 1) / plan.warmup
    if plan.kind == "constant":
        return plan.lr
    floor = plan.lr * plan.min_ratio
    if plan.kind == "cosine":
        span = max(plan.total - plan.warmup, 1)
        t = min(max(step - plan.warmup, 0) / span, 1.0)
        return floor + (plan.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))
    if plan.kind == "wsd":
        start = plan.decay_start - plan.start
        if step < start:
            return plan.lr
        # Progress through the decay: the last planned step reaches the floor.
        span = max(plan.total - start, 1)
        t = min((step - start + 1) / span, 1.0)
        remaining = 1 - t if plan.decay_shape == "linear" else 1 - math.sqrt(t)
        return floor + (plan.lr - floor) * remaining
    raise ValueError(f"unknown schedule {plan.kind!r}")
