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

Outputs are written under a temporary name next to the target, fsynced, and renamed into place
(the folder fsynced too), so the target is complete and durable or absent; an existing target
is refused, never overwritten. For `hf` and `safetensors` each tensor's bytes are read once
from the checkpoint file and verified against their checksum as they are written
(`mmnb.store.streamed`): a corrupt checkpoint fails the export with one line naming the file
and the temporary output is removed; `minimind` writes from a map of the file whose checksums
were verified first (`torch.save` wants whole tensors).
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
from .durable import fsync
from .frozen import checkpoint_weights
from .store import Run
from .store.errors import describe_os_error
from .store.streamed import Streamed
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
        # A LoRA checkpoint: adapters merged into its base. Otherwise the checkpoint file's
        # bytes are passed on, never copied into tensors: streamed (verified while written)
        # into safetensors; for torch.save, an mmap verified first.
        state = checkpoint_weights(
            run, step, mapped=format == "minimind", streamed=format != "minimind"
        )
    tokenizer = Tokenizer.from_json(run.tokenizer_json())
    arch = hf.architecture(model_cfg) if format == "hf" else None
    meta = {}
    if format == "safetensors":
        meta = {
            "run": run.name,
            "step": str(step),
            "config": json.dumps(config_to_dict(model_cfg, train_cfg)),
            "tokenizer": tokenizer.to_json(),
        }
        if adapters_only:  # the base they belong to, and their scale alpha / rank
            meta["lora_base"] = json.dumps(run.load(step, groups=("frozen",))["frozen"]["base"])
    try:
        if format == "minimind":
            size = write_minimind(state, target, DTYPES[dtype])
        elif format == "safetensors":
            size = write_safetensors(state, target, DTYPES[dtype], meta)
        else:
            size = write_hf(state, model_cfg, tokenizer, target, DTYPES[dtype])
    except OSError as err:  # the output's disk: full, read-only, … (nothing is left behind)
        raise ValueError(f"could not write {target}: {describe_os_error(err)}") from None
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


def _publish(tmp: Path, target: Path) -> None:
    """Rename a complete, fsynced `tmp` to `target` and make the rename durable."""
    os.replace(tmp, target)
    fsync(target.parent)


def write_minimind(state: dict[str, Tensor], target: Path, dtype: torch.dtype) -> int:
    """`torch.save({k: v.to(dtype)})` as MiniMind's trainers do (`v.half()` by default)."""
    tmp = _temporary(target)
    try:
        torch.save({k: v.detach().to("cpu", dtype) for k, v in state.items()}, tmp)
        fsync(tmp)
        _publish(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target.stat().st_size


def _cast(state: dict[str, Tensor | Streamed], dtype: torch.dtype) -> dict[str, Tensor | Streamed]:
    # The tied head is the embedding: stored once, as transformers and MiniMind's loaders expect.
    # A streamed tensor is converted chunk by chunk as it is written, only if its dtype differs.
    return {
        k: v.to(dtype) if isinstance(v, Streamed) else v.detach().to(dtype)
        for k, v in state.items()
        if k != "lm_head.weight"
    }


def write_safetensors(
    state: dict[str, Tensor], target: Path, dtype: torch.dtype, metadata: dict[str, str]
) -> int:
    tmp = _temporary(target)
    meta = {"format": "pt", "producer": f"mmnb {__version__}", **metadata}
    try:
        size = sf.write(tmp, _cast(state, dtype), meta)  # fsynced
        _publish(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


def write_hf(
    state: dict[str, Tensor | Streamed],
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    target: Path,
    dtype: torch.dtype,
    max_length: int = hf.MAX_POSITIONS,
) -> int:
    """A transformers model folder; the whole folder appears at `target` at once, durably."""
    config = hf.config_json(cfg, dtype)  # refuses a model no standard class computes
    texts = {
        "config.json": json.dumps(config, indent=2),
        "generation_config.json": json.dumps(hf.generation_config(tokenizer), indent=2),
        **hf.tokenizer_files(tokenizer, max_length),
    }
    tmp = _temporary(target)
    tmp.mkdir()
    try:
        size = 0
        # The small files first: they reach the disk while the weights are being written.
        for name, text in texts.items():
            size += _write_text(tmp / name, text)
        size += sf.write(
            tmp / "model.safetensors", hf.to_hf(_cast(state, dtype), cfg), {"format": "pt"}
        )
        for name in texts:
            fsync(tmp / name)
        fsync(tmp)
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return size


def _write_text(path: Path, text: str) -> int:
    """Write `text` and start its writeback (the caller fsyncs it later); return its size."""
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while len(view):
            view = view[os.write(fd, view) :]
        if hasattr(os, "posix_fadvise"):  # starts writing the dirty pages back (Linux)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return len(data)


__all__ = ["DTYPES", "FORMATS", "Exported", "export", "write_hf", "write_minimind"]
