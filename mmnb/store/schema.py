"""What a checkpoint of a given config may contain, checked before anything is allocated.

The run's config decides the model's parameter names, shapes and dtypes (built on the meta
device: no memory), hence AdamW's state; RNG states and metrics have fixed or bounded sizes.
A manifest entry outside these rules, or JSON values of the wrong type, make the checkpoint
corrupt. Extend `dataset_rule` (and `check_json`) when a new kind of state is stored.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import lora
from ..config import config_from_dict
from ..model import MiniMind
from ..objective import objective_for
from ..train import METRIC_NAMES
from .errors import StoreError

# torch dtypes a checkpoint may hold, and how their bits are stored (bf16 has no HDF5 type).
TORCH_STORAGE = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
NUMPY_STORAGE = {name: np.dtype(name).newbyteorder("<") for name in ("uint32", "uint64", "float64")}
MAX_RNG_BYTES = 1 << 20
_CUDA = re.compile(r"^\d{1,3}$")
_RANK = re.compile(r"^(0|[1-9][0-9]{0,5})$")  # a rank of a torchrun job


@dataclass(frozen=True)
class ModelSpec:
    """What a config's trainer holds: state-dict entries (shape, torch dtype), the parameters
    the optimizer keys its state by, and the metrics it logs."""

    entries: dict[str, tuple[tuple[int, ...], str]]
    params: frozenset[str]  # trainable named_parameters (tied weights once): the optimizer's keys
    metrics: tuple[str, ...]
    lora: bool  # a LoRA stage: a checkpoint may hold its adapters only

    def adapters(self) -> list[str]:
        return [n for n in self.entries if lora.MARK in n]


@functools.lru_cache(maxsize=16)
def _spec(config_json: str) -> ModelSpec:
    model_cfg, train_cfg = config_from_dict(json.loads(config_json))
    with torch.device("meta"):
        model = MiniMind(model_cfg)
    if train_cfg.lora_rank:  # as the trainer builds it (the values drawn do not matter here)
        lora.apply(
            model,
            train_cfg.lora_rank,
            train_cfg.lora_alpha or train_cfg.lora_rank,
            lora.targets_of(train_cfg.lora_targets),
            0,
        )
    entries = {
        name: (tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for name, t in model.state_dict().items()
    }
    params = frozenset(n for n, p in model.named_parameters() if p.requires_grad)
    metrics = METRIC_NAMES + objective_for(train_cfg.objective, train_cfg.dpo_beta).metrics
    return ModelSpec(entries, params, metrics, bool(train_cfg.lora_rank))


def model_spec(config: dict[str, Any]) -> ModelSpec:
    """The spec of a run's config dict (ValueError if the config itself is invalid)."""
    try:
        return _spec(json.dumps(config, sort_keys=True))
    except (TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"invalid config ({err})") from None


@dataclass(frozen=True)
class Rule:
    """What one dataset must be: its storage dtype, shape, and torch dtype (None: numpy)."""

    storage: np.dtype
    shape: tuple[int, ...]
    torch_dtype: str | None


def dataset_rule(path: str, entry: dict[str, Any], spec: ModelSpec, step: int) -> Rule:
    """The rule for the manifest entry `entry` of dataset `path`; ValueError if none allows it.

    `entry` holds the declared `torch` or `numpy` dtype and `shape` (checked here against the
    config, before the dataset is opened).
    """
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(n, 0) for n in shape):
        raise ValueError(f"{path}: invalid shape {shape!r}")
    shape_t = tuple(shape)
    torch_name, numpy_name = entry.get("torch"), entry.get("numpy")
    parts = path.split("/")

    def tensor(expected_shape: tuple[int, ...], dtype: str) -> Rule:
        if torch_name != dtype or shape_t != expected_shape:
            raise ValueError(
                f"{path} is declared {torch_name or numpy_name} {list(shape_t)}; the config "
                f"implies {dtype} {list(expected_shape)}"
            )
        return Rule(TORCH_STORAGE[dtype], shape_t, dtype)

    def bytes_1d(limit: int) -> Rule:
        if torch_name != "uint8" or len(shape_t) != 1 or shape_t[0] > limit:
            raise ValueError(f"{path} must be at most {limit} bytes of uint8")
        return Rule(TORCH_STORAGE["uint8"], shape_t, "uint8")

    def array(dtype: str, expected_shape: tuple[int, ...]) -> Rule:
        if numpy_name != dtype or shape_t != expected_shape:
            raise ValueError(f"{path} must be a {dtype} array of shape {list(expected_shape)}")
        return Rule(NUMPY_STORAGE[dtype], shape_t, None)

    group = parts[0]
    if group == "model" and len(parts) == 2 and parts[1] in spec.entries:
        return tensor(*spec.entries[parts[1]])
    if group == "optim" and len(parts) == 4 and parts[1] == "state" and parts[2] in spec.params:
        param_shape, param_dtype = spec.entries[parts[2]]
        if parts[3] in ("exp_avg", "exp_avg_sq"):
            return tensor(param_shape, param_dtype)
        if parts[3] == "step":
            return tensor((), "float32")
    if group == "rng" and len(parts) >= 4 and parts[1] == "ranks" and _RANK.match(parts[2]):
        # A distributed run's streams of every rank (mmnb.dist): each is a whole rng group.
        return dataset_rule("/".join(["rng", *parts[3:]]), entry, spec, step)
    if group == "rng":
        if parts[1:] == ["torch"]:
            return bytes_1d(MAX_RNG_BYTES)
        if len(parts) == 3 and parts[1] == "cuda" and _CUDA.match(parts[2]):
            return bytes_1d(MAX_RNG_BYTES)
        if parts[1:] == ["numpy", "keys"]:
            return array("uint32", (624,))
        if parts[1:] == ["python", "state"]:
            return array("uint64", (625,))
    if group == "metrics" and len(parts) == 2 and parts[1] in spec.metrics:
        if numpy_name != "float64" or len(shape_t) != 1 or shape_t[0] > step:
            raise ValueError(f"{path} must be float64 with at most {step} values (one per step)")
        return Rule(NUMPY_STORAGE["float64"], shape_t, None)
    if group == "scaler" and len(parts) == 2:
        if torch_name in ("float32", "int64", "int32") and math.prod(shape_t) <= 16:
            return Rule(TORCH_STORAGE[torch_name], shape_t, torch_name)
    raise ValueError(f"unexpected dataset {path} ({torch_name or numpy_name} {list(shape_t)})")


def check_complete(groups: tuple[str, ...], datasets: dict[str, Any], spec: ModelSpec) -> None:
    """Every dataset a loaded group needs is present (a missing one is corruption)."""
    have = set(datasets)
    if "model" in groups:
        held = {p.split("/", 1)[1] for p in have if p.startswith("model/")}
        if not (spec.lora and held == set(spec.adapters())):  # else: every entry
            missing = [n for n in spec.entries if n not in held]
            if missing:
                raise ValueError(f"model/{missing[0]} is missing")
    if "optim" in groups:
        names = {p.split("/")[2] for p in have if p.startswith("optim/state/")}
        for name in names:
            for slot in ("step", "exp_avg", "exp_avg_sq"):
                if f"optim/state/{name}/{slot}" not in have:
                    raise ValueError(f"optim/state/{name}/{slot} is missing")
    if "rng" in groups:
        for path in ("rng/torch", "rng/numpy/keys", "rng/python/state"):
            if path not in have:
                raise ValueError(f"{path} is missing")
    if "metrics" in groups:
        lengths = set()
        for name in spec.metrics:
            if f"metrics/{name}" not in have:
                raise ValueError(f"metrics/{name} is missing")
            lengths.add(tuple(datasets[f"metrics/{name}"]["shape"]))
        if len(lengths) != 1:
            raise ValueError("the metrics arrays differ in length")


def _is_int(value: Any, low: int | None = None) -> bool:
    ok = isinstance(value, int) and not isinstance(value, bool)
    return ok and (low is None or value >= low)


def _is_number(value: Any) -> bool:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return ok and math.isfinite(value)


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def check_json(group: str, values: dict[str, Any], spec: ModelSpec, step: int) -> None:
    """The JSON leaves of a state group have the types (and ranges) loading relies on."""

    def field(name: str, test: Any, rule: str) -> Any:
        value = values.get(name)
        _require(name in values and test(value), f"{group}.{name} must be {rule}, got {value!r}")
        return value

    if group == "trainer":
        _require(field("step", _is_int, "an integer") == step, f"{group}.step is not {step}")
        field("epoch", lambda v: _is_int(v, 0), "a non-negative integer")
        field("tokens", lambda v: _is_int(v, 0), "a non-negative integer")
        field("elapsed", lambda v: _is_number(v) and v >= 0, "a non-negative number")
        field("world_size", lambda v: _is_int(v, 1), "a positive integer")
    elif group == "data":
        for name in ("epoch", "position", "num_samples"):
            field(name, lambda v: _is_int(v, 0), "a non-negative integer")
        field("seed", _is_int, "an integer")
        field("fingerprint", lambda v: isinstance(v, str), "a string")
    elif group == "schedule":
        _require(field("step", _is_int, "an integer") == step, f"{group}.step is not {step}")
        _check_plan(field("plan", lambda v: isinstance(v, dict), "an object"))
    elif group == "optim":
        groups = field("param_groups", lambda v: isinstance(v, list) and v, "a list")
        seen: list[str] = []
        for g in groups:
            _require(isinstance(g, dict), "optim.param_groups holds a non-object")
            params = g.get("params")
            _require(isinstance(params, list), "optim.param_groups[].params must be a list")
            seen += params
            for key, value in g.items():
                if key == "params":
                    continue
                ok = (
                    value is None
                    or isinstance(value, bool)
                    or _is_number(value)
                    or (isinstance(value, list) and all(_is_number(x) for x in value))
                )
                _require(ok, f"optim.param_groups[].{key} has an invalid value {value!r}")
        _require(
            len(seen) == len(set(seen)) and set(seen) == spec.params,
            "optim.param_groups do not name each model parameter once",
        )
    elif group == "rng/numpy":
        field("pos", lambda v: _is_int(v, 0) and v <= 624, "an integer in [0, 624]")
        field("has_gauss", lambda v: v in (0, 1) and _is_int(v), "0 or 1")
        field("cached_gaussian", _is_number, "a finite number")
    elif group == "frozen":  # references to frozen weights (mmnb.frozen)
        for key, ref in values.items():
            _require(
                isinstance(ref, dict)
                and isinstance(ref.get("run"), str)
                and _is_int(ref.get("step"), 0)
                and isinstance(ref.get("digest"), str),
                f"frozen.{key} is not a reference {{run, step, digest}}: {ref!r}",
            )
    elif group == "rng/python":
        field("version", lambda v: v == 3 and _is_int(v), "3")
        field("gauss", lambda v: v is None or _is_number(v), "null or a finite number")


_PLAN_FIELDS = {
    "kind": lambda v: v in ("wsd", "cosine", "constant", "minimind"),
    "lr": lambda v: _is_number(v) and v >= 0,
    "total": lambda v: _is_int(v, 1),
    "warmup": lambda v: _is_int(v, 0),
    "min_ratio": lambda v: _is_number(v) and 0 <= v,
    "decay_fraction": lambda v: _is_number(v) and 0 <= v <= 1,
    "decay_shape": lambda v: v in ("linear", "1-sqrt"),
    "start": lambda v: _is_int(v, 0),
}


def _check_plan(plan: dict[str, Any]) -> None:
    _require(set(plan) == set(_PLAN_FIELDS), f"schedule.plan has keys {sorted(plan)}")
    for key, test in _PLAN_FIELDS.items():
        _require(test(plan[key]), f"schedule.plan.{key} is invalid: {plan[key]!r}")


def check_config(config: dict[str, Any]) -> None:
    """The run's config builds and validates (a crafted one is refused before use)."""
    model, train = config_from_dict(config)
    model.validate()
    train.validate()


def non_finite(state: dict[str, Any], mapper: Callable = map) -> str | None:
    """The name of the first weight or optimizer moment of `state` that is not finite.

    `mapper` runs the per-tensor checks (an executor's `map` runs them on worker threads)."""
    tensors = [(f"model.{k}", t) for k, t in state.get("model", {}).items()]
    optim = state.get("optim", {})
    for name, slots in (optim.get("state", {}) if isinstance(optim, dict) else {}).items():
        tensors += [(f"optim.{name}.{k}", t) for k, t in slots.items()]
    finite = mapper(_finite, [t for _, t in tensors])
    return next((name for (name, _), ok in zip(tensors, finite, strict=True) if not ok), None)


def _finite(tensor: Any) -> bool:
    if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel():
        # min and max propagate NaN and are inf if any value is: ~30x faster than
        # isfinite().all(), which this runs on every commit and load.
        low, high = torch.aminmax(tensor.detach())
        return bool(torch.isfinite(low) & torch.isfinite(high))
    return True


def check_finite(state: dict[str, Any], step: int) -> None:
    """No non-finite weight or optimizer moment is ever committed."""
    name = non_finite(state)
    if name is not None:
        raise StoreError(f"refusing to checkpoint step {step}: {name} is not finite")
