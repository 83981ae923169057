"""LoRA: low-rank adapters on chosen linear layers of a frozen MiniMind, written here in a page.

`y = W x + (alpha / rank) * B (A x)` with A [rank, in] drawn N(0, 0.02) and B [out, rank] zero
at the start, as MiniMind's `model_lora.py` does (so the adapted model starts equal to its base).
The adapter sits on the layer as `<layer>.lora.A` / `<layer>.lora.B`, MiniMind's key names
(`model.layers.0.self_attn.q_proj.lora.A.weight`), and is added by a forward hook; the layer's
own weight keeps its key. Everything but the adapters is frozen.

Why not `peft`: the whole mechanism is these few lines; a dependency would bring its own
state-dict naming, its own init RNG use (the global one) and wrapping that hides MiniMind's keys.

MiniMind applies LoRA to every square linear layer (q_proj and o_proj in its GQA models) with
no scaling; that is `targets=("q_proj", "o_proj")` with `alpha = rank`, the defaults here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

DEFAULT_TARGETS = ("q_proj", "o_proj")  # MiniMind's choice: its square linear layers
MARK = ".lora."  # in every adapter key, in no base key


class LoRA(nn.Module):
    """The adapter of one linear layer: x → B(A x), in MiniMind's layout."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.B(self.A(x))


def _add_adapter(module: nn.Linear, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
    if not module.lora_enabled:
        return output
    return output + module.lora(args[0]) * module.lora_scale


def targets_of(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """'q_proj, v_proj' → ('q_proj', 'v_proj'); None → MiniMind's default."""
    if text is None:
        return DEFAULT_TARGETS
    items = text.split(",") if isinstance(text, str) else list(text)
    names = tuple(dict.fromkeys(t.strip() for t in items if t.strip()))
    if not names:
        raise ValueError("lora_targets names no layer (e.g. q_proj,o_proj)")
    return names


def linear_names(model: nn.Module) -> list[str]:
    """The last name component of every adaptable linear layer (the tied LM head excluded)."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name != "lm_head" and MARK not in f"{name}."
        }
    )


def apply(
    model: nn.Module, rank: int, alpha: float, targets: Sequence[str], seed: int
) -> list[str]:
    """Add adapters to the linear layers named `targets`, freeze everything else, and return the
    adapter parameter names. A is drawn from a generator seeded with `seed` (never the global
    RNG), in module order: the same adapters on every run with that seed."""
    if rank <= 0:
        raise ValueError(f"lora_rank must be positive, got {rank}")
    have = linear_names(model)
    unknown = [t for t in targets if t not in have]
    if unknown:
        raise ValueError(
            f"lora_targets: no linear layer named {unknown[0]!r} (choose from {', '.join(have)})"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name == "lm_head":
            continue
        if name.rsplit(".", 1)[-1] not in targets or hasattr(module, "lora"):
            continue
        weight = module.weight
        lora = LoRA(module.in_features, module.out_features, rank).to(weight.device)
        with torch.no_grad():
            lora.A.weight.copy_(torch.empty(lora.A.weight.shape).normal_(0.0, 0.02, generator=g))
            lora.B.weight.zero_()
        module.lora = lora
        module.lora_scale = alpha / rank
        module.lora_enabled = True
        module.register_forward_hook(_add_adapter)
    return [n for n, p in model.named_parameters() if MARK in n]


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if MARK in k}


def base_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if MARK not in k}


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """The base model alone for a while (a DPO reference that is the LoRA base)."""
    layers = [m for m in model.modules() if hasattr(m, "lora_enabled")]
    for m in layers:
        m.lora_enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.lora_enabled = True


def merge(base: dict[str, Tensor], adapters: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """Base weights with every adapter folded in: W + scale * B @ A (in fp32, then W's dtype)."""
    merged = dict(base)
    for key in adapters:
        if not key.endswith(".lora.A.weight"):
            continue
        layer = key[: -len(".lora.A.weight")]
        a, b = adapters[key], adapters[f"{layer}.lora.B.weight"]
        w = base[f"{layer}.weight"]
        merged[f"{layer}.weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    if "lm_head.weight" in merged:  # the head stays tied to the embedding
        merged["lm_head.weight"] = merged["model.embed_tokens.weight"]
    return merged


__all__ = [
    "DEFAULT_TARGETS",
    "LoRA",
    "adapter_state",
    "apply",
    "base_state",
    "disabled",
    "linear_names",
    "merge",
    "targets_of",
]
