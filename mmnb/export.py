"""`mmnb export`: a checkpoint as a MiniMind `.pth`, a Hugging Face model folder or safetensors.

- `minimind`: the state dict exactly as MiniMind's trainers save it (`torch.save` of every key,
  `lm_head.weight` included, half precision unless `dtype` says otherwise), loadable by its
  `MiniMindForCausalLM` with `strict=True`, its `eval_llm.py` and `serve_openai_api.py`;
- `hf`: a folder `transformers` loads without `trust_remote_code` (`hf.architecture` picks the
  class) with config.json, model.safetensors, tokenizer files and generation_config.json;
- `safetensors`: the state dict alone (the tied `lm_head.weight` once, as the embedding), with
  the run, step, config and tokenizer in its metadata, so `--init-from` needs nothing else.

A LoRA checkpoint exports its adapters merged into its base with `merge_lora`; without it,
`minimind` writes the adapters alone as MiniMind's `save_lora` does (`….lora.A/B.weight`,
the scale folded into B) and `safetensors` the adapters with their base reference.

Outputs are written under a temporary name and renamed into place; an existing target is
refused, never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import __version__, hf, lora
from . import safetensors_format as sf
from .config import ModelConfig, TrainConfig, config_from_dict, config_to_dict
from .frozen import checkpoint_weights
from .store import Run
from .tokenizer import Tokenizer

FORMATS = ("minimind", "hf", "safetensors")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_DTYPE = {"minimind": "fp16", "hf": "fp32", "safetensors": "fp32"}
SUFFIX = {"minimind": ".pth", "hf": "-hf", "safetensors": ".safetensors"}


@dataclass
class Exported:
    path: Path
    format: str
    dtype: str
    step: int
    architecture: str | None  # the transformers class of an hf export
    bytes: int


def export(
    run: Run,
    step: int | None = None,
    *,
    format: str = "hf",
    out: str | os.PathLike[str] | None = None,
    dtype: str | None = None,
    merge_lora: bool = False,
) -> Exported:
    """Write checkpoint `step` of `run` (the newest by default) as `format` to `out`."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    dtype = dtype or DEFAULT_DTYPE[format]
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if step is None:
        latest = run.latest()
        if latest is None:
            raise ValueError(f"run {run.name!r} has no checkpoint to export")
        step = latest.step
    run.step_info(step)  # a missing step is one clear StoreError
    target = Path(out if out is not None else f"{run.name}-{step}{SUFFIX[format]}").expanduser()
    if target.exists():
        raise ValueError(f"{target} exists; remove it or choose another --out")
    model_cfg, train_cfg = config_from_dict(run.config_dict())
    adapters_only = False
    if train_cfg.lora_rank and not merge_lora:
        if format == "hf":
            raise ValueError(
                f"run {run.name!r} trains LoRA adapters; transformers' classes have none: "
                "export it with --merge-lora (or its adapters alone as minimind or safetensors)"
            )
        state = _adapters(run, step, train_cfg, scaled=format == "minimind")
        adapters_only = True
    elif merge_lora and not train_cfg.lora_rank:
        raise ValueError(f"--merge-lora: run {run.name!r} has no LoRA adapters to merge")
    else:
        # A LoRA checkpoint: adapters merged into its base. Otherwise views of the checkpoint
        # file's bytes (mmap, checksums verified): exporting is one write, not read+copy+write.
        state = checkpoint_weights(run, step, mapped=True)
    tokenizer = Tokenizer.from_json(run.tokenizer_json())
    arch = None
    if format == "minimind":
        size = write_minimind(state, target, DTYPES[dtype])
    elif format == "safetensors":
        meta = {
            "run": run.name,
            "step": str(step),
            "config": json.dumps(config_to_dict(model_cfg, train_cfg)),
            "tokenizer": tokenizer.to_json(),
        }
        if adapters_only:  # the base they belong to, and their scale alpha / rank
            meta["lora_base"] = json.dumps(run.load(step, groups=("frozen",))["frozen"]["base"])
        size = write_safetensors(state, target, DTYPES[dtype], meta)
    else:
        arch = hf.architecture(model_cfg)
        size = write_hf(state, model_cfg, tokenizer, target, DTYPES[dtype])
    return Exported(target, format, dtype, step, arch, size)


def _adapters(run: Run, step: int, train_cfg: TrainConfig, scaled: bool) -> dict[str, Tensor]:
    """A LoRA checkpoint's adapters under MiniMind's names (`….q_proj.lora.A.weight`). For
    MiniMind's own `load_lora` (no alpha) the scale alpha/rank is folded into B."""
    state = run.load(step, groups=("model",))["model"]
    adapters = {k: v for k, v in sorted(state.items()) if lora.MARK in k}
    if not adapters:  # the first checkpoint of a run started as LoRA also holds its base
        raise ValueError(f"{run.name}@{step} holds no trained adapters yet")
    scale = (train_cfg.lora_alpha or train_cfg.lora_rank) / train_cfg.lora_rank
    if scaled and scale != 1:
        adapters = {k: v * scale if k.endswith(".B.weight") else v for k, v in adapters.items()}
    return adapters


def _temporary(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


def write_minimind(state: dict[str, Tensor], target: Path, dtype: torch.dtype) -> int:
    """`torch.save({k: v.to(dtype)})` as MiniMind's trainers do (`v.half()` by default)."""
    tmp = _temporary(target)
    try:
        torch.save({k: v.detach().to("cpu", dtype) for k, v in state.items()}, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target.stat().st_size


def _cast(state: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    # The tied head is the embedding: stored once, as transformers and MiniMind's loaders expect.
    return {k: v.detach().to(dtype) for k, v in state.items() if k != "lm_head.weight"}


def write_safetensors(
    state: dict[str, Tensor], target: Path, dtype: torch.dtype, metadata: dict[str, str]
) -> int:
    tmp = _temporary(target)
    meta = {"format": "pt", "producer": f"mmnb {__version__}", **metadata}
    try:
        size = sf.write(tmp, _cast(state, dtype), meta)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


def write_hf(
    state: dict[str, Tensor],
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    target: Path,
    dtype: torch.dtype,
    max_length: int = hf.MAX_POSITIONS,
) -> int:
    """A transformers model folder; the whole folder appears at `target` at once."""
    config = hf.config_json(cfg, dtype)  # refuses a model no standard class computes
    tmp = _temporary(target)
    tmp.mkdir()
    try:
        size = sf.write(
            tmp / "model.safetensors", hf.to_hf(_cast(state, dtype), cfg), {"format": "pt"}
        )
        texts = {
            "config.json": json.dumps(config, indent=2),
            "generation_config.json": json.dumps(hf.generation_config(tokenizer), indent=2),
            **hf.tokenizer_files(tokenizer, max_length),
        }
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
            size += len(text.encode())
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return size


__all__ = ["DTYPES", "FORMATS", "Exported", "export", "write_hf", "write_minimind"]
