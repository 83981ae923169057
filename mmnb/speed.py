"""How a training step is made fast without changing what a checkpoint holds.

Two levers, both measured by `benchmarks/bench_vs_minimind.py` (docs/performance.md):

* AdamW's fused kernel (`fused=True`): one pass over each parameter's moments instead of a
  dozen elementwise ops; about 4x faster than the for-loop default on CPU.
* `compile=True`: the model's forward and backward through `torch.compile` (inductor), which
  fuses RMSNorm, RoPE, SwiGLU and the loss into a few kernels. The checkpoint keys do not
  change (the trainer keeps the plain module and compiles a wrapper around it), and a resumed
  run compiles the same graphs, so split-resume stays bitwise.

Compiled numerics differ from eager ones in the last bits (fused kernels round differently), so
`compile` is part of a run's trajectory: a resume keeps it, a branch may change it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .config import TrainConfig
from .model import MiniMind, MoEFeedForward


def make_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW with the trainer's hyperparameters, fused where torch has a kernel for the device."""
    kwargs = dict(
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    if device.type in ("cpu", "cuda"):
        return torch.optim.AdamW(params, fused=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)  # torch picks its best implementation


def compile_model(model: MiniMind, seq_len: int) -> Callable[..., object]:
    """A compiled callable over `model` for training steps of `seq_len` tokens.

    Shapes are static (every batch is [batch_size, seq_len]), so there is exactly one graph and
    the graph a step runs never depends on what ran before it — the property bitwise resume
    needs. Two things would break that, and are handled here:

    * the RoPE tables are filled eagerly first: otherwise the first call traces the code that
      fills them (its own graph, tables computed by inductor) and later calls another;
    * MoE routing has data-dependent shapes (tokens per expert), which would recompile per
      routing pattern until torch gives up and runs eagerly — history-dependent numerics. The
      MoE feed-forward therefore runs eagerly; attention, norms and the rest are compiled.

    Compilation happens in this process (`compile_threads=1`): no worker processes to clean up.
    The first step pays the compile time (seconds for small models, about a minute for 26M
    parameters on two CPU cores); inductor's on-disk cache makes later processes faster.
    """
    device = next(model.parameters()).device
    model._rope(0, seq_len, device)
    for module in model.modules():
        if isinstance(module, MoEFeedForward) and not getattr(module, "_mmnb_eager", False):
            # An instance attribute: the class (and every other model) is untouched.
            module.forward = torch.compiler.disable(module.forward)
            module._mmnb_eager = True
    return torch.compile(model, dynamic=False, options={"compile_threads": 1})


__all__ = ["compile_model", "make_optimizer"]
