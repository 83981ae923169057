"""Weights from elsewhere: a MiniMind `.pth`, a safetensors file, a Hugging Face model folder or
another run's checkpoint (`RUN@STEP`) as a MiniMind state dict, a config and a tokenizer.

`torch.load(weights_only=True)` of a `.pth` (or a folder's `pytorch_model.bin`) the user names
is the only unpickling of a file mmnb ever does: once, at import, and PyTorch's restricted
unpickler refuses anything but tensors and plain containers. (The ranks of one distributed job
exchange small values through torch.distributed's object collectives, which pickle; those bytes
come from the job's own processes, never from a store: see docs/distributed.md.) The file's SHA-256 goes into the new run's
lineage; from then on the run's own checkpoints hold the weights.

The config is inferred from the tensor shapes where the source has none, and whatever the user
or the source says is checked against the shapes: a mismatch names the key and both shapes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import xxhash
from torch import Tensor

from . import hf
from . import safetensors_format as sf
from .config import MODEL_ALIASES, MODEL_FIELDS, PRESETS, ModelConfig, config_from_dict
from .model import MiniMind
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .store import Store

# Fields the tensor shapes decide (the rest: eps, rope, routing, come from a config or preset).
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "qk_norm",
    "use_moe",
    "num_experts",
    "num_shared_experts",
)
_RUN_STEP = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._+-]{0,99})(?:@(\d+))?$")


@dataclass
class Source:
    """Weights to start from, in MiniMind's key names, and what came with them."""

    where: str  # what the user named, for messages
    kind: str  # minimind (.pth) | safetensors | hf | run
    state: dict[str, Tensor]
    config: dict[str, Any]  # model fields the source states (empty for a bare .pth)
    tokenizer_json: str | None  # the tokenizer the weights were trained with, if it came along
    lineage: dict[str, Any]  # recorded in the new run: source, format, SHA-256 / checkpoint


# ---- reading ---------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(state: dict[str, Tensor]) -> str:
    """XXH3-128 over every tensor's name, dtype, shape and bytes, in name order."""
    h = xxhash.xxh3_128()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        if t.numel():
            h.update(memoryview(raw.numpy()).cast("B"))
    return h.hexdigest()


def read_pth(path: Path) -> dict[str, Tensor]:
    """A `.pth` state dict through PyTorch's restricted unpickler; one line on any problem."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, …
        text = str(err)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise ValueError(
                f"{path}: refused by torch.load(weights_only=True): it holds a Python object "
                f"({found.group(1)}), not only tensors; mmnb loads plain state dicts only"
            ) from None
        inner = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        reason = inner.group(1).strip() if inner else (text.strip().splitlines() or [""])[0]
        raise ValueError(
            f"{path}: not a readable PyTorch state dict ({reason or type(err).__name__})"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # MiniMind's resume checkpoints keep the weights under "model"
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise ValueError(f"{path}: not a state dict (a mapping of names to tensors)")
    # DDP and torch.compile prefixes, stripped as MiniMind's own loaders do.
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in obj.items()}


def read_source(spec: str, store: Store | None = None) -> Source:
    """The weights `spec` names: a file, a model folder, or RUN@STEP / RUN of `store`."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _read_hf_folder(path, spec)
    if path.is_file():
        if _looks_like_safetensors(path):
            return _read_safetensors(path, spec)
        state = read_pth(path)
        lineage = {"source": str(path.resolve()), "format": "minimind", "sha256": sha256_file(path)}
        return Source(spec, "minimind", state, {}, _adjacent_tokenizer(path), lineage)
    match = _RUN_STEP.match(spec)
    if match and store is not None and (store.path / match.group(1) / "run.h5").is_file():
        return _read_run(store, match.group(1), match.group(2), spec)
    raise ValueError(
        f"--init-from {spec!r}: no such file, folder or run (give a MiniMind .pth, a "
        ".safetensors file, a Hugging Face model folder, or RUN@STEP of this store)"
    )


def _looks_like_safetensors(path: Path) -> bool:
    # By content, not name: 8 bytes of header length, then the JSON header's "{".
    with open(path, "rb") as f:
        return f.read(9)[8:] == b"{"


def _adjacent_tokenizer(path: Path) -> str | None:
    candidate = path.parent / "tokenizer.json"
    return candidate.read_text(encoding="utf-8") if candidate.is_file() else None


def _read_safetensors(path: Path, spec: str) -> Source:
    try:
        state, meta = sf.read(path)
    except sf.SafetensorsError as err:
        raise ValueError(str(err)) from None
    config: dict[str, Any] = {}
    if "config" in meta:  # written by `mmnb export --format safetensors`
        try:
            config = dataclasses.asdict(config_from_dict(json.loads(meta["config"]))[0])
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{path}: unreadable mmnb config in the metadata ({err})") from None
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    lineage = {"source": str(path.resolve()), "format": "safetensors", "sha256": sha256_file(path)}
    tokenizer = meta.get("tokenizer") or _adjacent_tokenizer(path)
    return Source(spec, "safetensors", state, config, tokenizer, lineage)


def _read_hf_folder(folder: Path, spec: str) -> Source:
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{folder}: no config.json (not a Hugging Face model folder)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path}: unreadable ({err})") from None
    files: list[Path] = []
    tensors: dict[str, Tensor] = {}
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        for name in names:  # confined to the folder: a shard name is a plain file name
            if Path(name).name != name:
                raise ValueError(f"{index}: shard {name!r} is not a file in the folder")
        files = [folder / n for n in names]
    elif (folder / "pytorch_model.bin").is_file():
        files = [folder / "pytorch_model.bin"]
    else:
        raise ValueError(f"{folder}: no model.safetensors or pytorch_model.bin")
    for file in files:
        if file.suffix == ".bin":
            tensors.update(read_pth(file))
        else:
            try:
                tensors.update(sf.read(file)[0])
            except sf.SafetensorsError as err:
                raise ValueError(str(err)) from None
    fields, state = hf.from_hf(config, tensors, str(folder))
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    tok = folder / "tokenizer.json"
    lineage = {
        "source": str(folder.resolve()),
        "format": "hf",
        "sha256": {f.name: sha256_file(f) for f in files},
    }
    tokenizer = tok.read_text(encoding="utf-8") if tok.is_file() else None
    return Source(spec, "hf", state, fields, tokenizer, lineage)


def _read_run(store: Store, name: str, step: str | None, spec: str) -> Source:
    from .frozen import checkpoint_weights  # store-side reading lives with the references

    run = store.run(name)
    info = run.step_info(int(step)) if step is not None else run.latest()
    if info is None:
        raise ValueError(f"--init-from {spec!r}: run {name!r} has no checkpoint")
    state = checkpoint_weights(run, info.step)
    config = dataclasses.asdict(config_from_dict(run.config_dict())[0])
    config.pop("dropout", None)  # a training choice of that run, not part of the weights
    lineage = {"source": spec, "format": "run", "run": name, "step": info.step}
    lineage["digest"] = weights_digest(state)
    return Source(spec, "run", state, config, run.tokenizer_json(), lineage)


# ---- config from shapes, and the check -------------------------------------------------------


def _family(state: dict[str, Tensor]) -> str:
    """The preset whose generation these tensors look like (qk-norm: minimind-3)."""
    qk = any(k.endswith("self_attn.q_norm.weight") for k in state)
    moe = any(k.endswith(".mlp.gate.weight") for k in state)
    return ("minimind3" if qk else "minimind2") + ("-moe" if moe else "")


def infer_config(
    source: Source, preset: str | None, overrides: dict[str, Any]
) -> tuple[ModelConfig, str, list[str]]:
    """(model config, preset name, notices) for `source`, checked against its tensors.

    Precedence, lowest first: the generation's preset, what the shapes say, the source's own
    config, an explicitly given preset, explicit model flags. The notices say what had to be
    assumed because neither the shapes nor anything given decides it.
    """
    state, where = source.state, source.where
    overrides = {MODEL_ALIASES.get(k, k): v for k, v in overrides.items() if v is not None}
    family = _family(state)
    chosen = preset or family
    notes: list[str] = []
    given = dict(source.config)
    if preset is not None:
        given.update(PRESETS[preset]["model"])
    given.update(overrides)

    emb = state.get("model.embed_tokens.weight")
    if emb is None or emb.dim() != 2:
        raise ValueError(f"{where}: missing key model.embed_tokens.weight (not a MiniMind model)")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    fields: dict[str, Any] = dict(PRESETS[family]["model"])
    fields.update(
        vocab_size=emb.shape[0],
        hidden_size=emb.shape[1],
        num_hidden_layers=max(layers) + 1 if layers else 0,
        qk_norm="model.layers.0.self_attn.q_norm.weight" in state,
        use_moe="model.layers.0.mlp.gate.weight" in state,
    )
    p = "model.layers.0."
    if fields["use_moe"]:
        fields["num_experts"] = state[f"{p}mlp.gate.weight"].shape[0]
        shared = {
            m.group(1) for k in state if (m := re.match(rf"{p}mlp\.shared_experts\.(\d+)\.", k))
        }
        fields["num_shared_experts"] = len(shared)
        ffn = state.get(f"{p}mlp.experts.0.gate_proj.weight")
    else:
        fields["num_shared_experts"] = 0
        ffn = state.get(f"{p}mlp.gate_proj.weight")
    if ffn is not None:
        fields["intermediate_size"] = ffn.shape[0]
    q, k = state.get(f"{p}self_attn.q_proj.weight"), state.get(f"{p}self_attn.k_proj.weight")
    if fields["qk_norm"]:
        d = state[f"{p}self_attn.q_norm.weight"].shape[0]
    else:  # without qk-norm the head count is not in the shapes: take the given one
        heads = given.get("num_attention_heads", fields["num_attention_heads"])
        if "num_attention_heads" not in given:
            notes.append(
                f"{where}: the attention head count is not in the tensor shapes (no qk-norm); "
                f"assumed {heads}, as MiniMind2 has it; give --heads if that is wrong"
            )
        d = q.shape[0] // heads if q is not None and heads else None
    if d and q is not None and k is not None:
        fields.update(head_dim=d, num_attention_heads=q.shape[0] // d)
        fields["num_key_value_heads"] = k.shape[0] // d
    fields.update(given)
    if "head_dim" not in given and "hidden_size" in overrides and not fields["qk_norm"]:
        fields["head_dim"] = None  # derived from an explicitly changed width
    unknown = [k for k in fields if k not in MODEL_FIELDS]
    if unknown:
        raise ValueError(f"{where}: unknown model field {unknown[0]!r}")
    cfg = ModelConfig(**fields)
    cfg.validate()
    check_state(state, cfg, where)
    return cfg, chosen, notes


def check_state(state: dict[str, Tensor], cfg: ModelConfig, where: str) -> None:
    """Raise ValueError naming the first key whose presence or shape the config contradicts."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MiniMind(cfg).state_dict().items()}
    for key, shape in expected.items():
        if key not in state:
            raise ValueError(f"{where}: missing key {key} (the config expects shape {shape})")
        if not state[key].is_floating_point():
            raise ValueError(f"{where}: {key} has dtype {state[key].dtype}, not a float type")
        if tuple(state[key].shape) != shape:
            raise ValueError(
                f"{where}: {key} has shape {tuple(state[key].shape)}; the config expects {shape}"
            )
    for key in state:
        if key not in expected:
            raise ValueError(
                f"{where}: unexpected key {key} with shape {tuple(state[key].shape)} "
                "(no such weight in a MiniMind model of this config)"
            )
    head, emb = state["lm_head.weight"], state["model.embed_tokens.weight"]
    if head is not emb and not torch.equal(head.float(), emb.float()):
        raise ValueError(
            f"{where}: lm_head.weight differs from model.embed_tokens.weight; MiniMind ties them"
        )


def tokenizer_for_source(source: Source, tokenizer_path: str | None) -> Tokenizer:
    """The tokenizer named, else the one that came with the weights; never a new one."""
    if tokenizer_path is not None:
        return Tokenizer.from_file(Path(tokenizer_path).expanduser())
    if source.tokenizer_json is None:
        raise ValueError(
            f"{source.where} holds no tokenizer: give --tokenizer (for MiniMind, its "
            "model/tokenizer.json); token ids mean nothing without the tokenizer they came from"
        )
    return Tokenizer.from_json(source.tokenizer_json)


__all__ = [
    "Source",
    "check_state",
    "infer_config",
    "read_pth",
    "read_source",
    "sha256_file",
    "tokenizer_for_source",
    "weights_digest",
]
