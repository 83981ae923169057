"""Configuration: two plain dataclasses, presets by name, validation that names the field.

`ModelConfig` is the architecture (it alone builds a `MiniMind`); `TrainConfig` is everything
else a run needs: data, optimisation, schedule, stopping and saving. `resolve()` turns a
preset name plus overrides into both, and `to_dict`/`from_dict` make them JSON for the store.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

FORMAT_VERSION = 1  # version of the JSON written by `config_to_dict`


@dataclass
class ModelConfig:
    """A MiniMind (Llama/Qwen3-style) decoder. Field names follow MiniMind's `MiniMindConfig`."""

    vocab_size: int = 6400  # tokenizer size; embeddings and the tied LM head have this many rows
    hidden_size: int = 512  # width of the residual stream
    num_hidden_layers: int = 8  # decoder blocks
    num_attention_heads: int = 8  # query heads
    num_key_value_heads: int = (
        2  # key/value heads (grouped-query attention); divides the query heads
    )
    head_dim: int | None = None  # per-head width; None means hidden_size // num_attention_heads
    intermediate_size: int | None = None  # SwiGLU width; None means ceil(hidden*pi/64)*64
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon (MiniMind-2 used 1e-5)
    rope_theta: float = 1e6  # RoPE base
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (MiniMind-3)
    dropout: float = 0.0  # residual and attention dropout while training
    use_moe: bool = False  # replace each MLP by a mixture of experts
    num_experts: int = 4  # experts per MoE layer
    num_experts_per_tok: int = 1  # top-k routing
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1
    aux_loss_coef: float = 5e-4  # weight of the router load-balancing loss added to the LM loss

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        if self.intermediate_size is None:
            self.intermediate_size = math.ceil(self.hidden_size * math.pi / 64) * 64

    def validate(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "num_experts",
            "num_experts_per_tok",
        ):
            _positive(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError("num_experts_per_tok must be at most num_experts")
        _non_negative("aux_loss_coef", self.aux_loss_coef)
        _positive("rms_norm_eps", self.rms_norm_eps)
        _positive("rope_theta", self.rope_theta)


SCHEDULES = ("wsd", "cosine", "constant", "minimind")
DTYPES = ("fp32", "bf16")


@dataclass
class TrainConfig:
    """Everything about a run except the architecture. Flag names in the CLI are these, dashed."""

    preset: str = "tiny"  # model preset the run started from (recorded; the model fields rule)
    data: str | None = None  # .jsonl / .txt file or folder of .txt; None = the bundled corpus
    tokenizer: str | None = None  # tokenizer.json to load; None = train one on the data
    max_seq_len: int = 256  # tokens per sample
    epochs: int = 1  # planned epochs (the schedule's horizon unless max_steps is set)
    max_steps: int | None = None  # planned optimizer steps; overrides epochs for the horizon
    batch_size: int = 32  # samples per micro-batch
    accum: int = 1  # micro-batches per optimizer step (gradient accumulation)
    lr: float = 5e-4  # peak learning rate
    schedule: str = "wsd"  # wsd | cosine | constant | minimind (MiniMind's cosine to lr/10)
    warmup: int = 0  # linear warmup, in optimizer steps
    decay_fraction: float = 0.2  # wsd: fraction of the planned steps spent decaying
    decay_shape: str = "linear"  # wsd: linear | 1-sqrt
    min_lr_ratio: float = 0.1  # cosine/wsd: final lr as a fraction of lr
    weight_decay: float = 0.01  # AdamW weight decay (torch's default, as MiniMind uses)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max grad norm; 0 disables clipping (the norm is still logged)
    dtype: str = "fp32"  # fp32 | bf16 (autocast; master weights and optimizer state stay fp32)
    compile: bool = False  # torch.compile the training step (inductor); same checkpoint keys
    seed: int = 1337  # the one seed: init, data order and dropout all derive from it
    log_every: int = 10  # optimizer steps between progress updates
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only the automatic ones
    stop_at: int | None = None  # stop (and checkpoint) after this optimizer step; the plan is kept
    time_budget: float | None = None  # seconds of training before a clean stop; the plan is kept
    keep_last: int = 0  # retention: keep the newest N checkpoints (0 = keep all)
    keep_every: int = 0  # retention: also keep every M-th step (0 = none extra)

    def validate(self) -> None:
        for name in ("max_seq_len", "epochs", "batch_size", "accum"):
            _positive(name, getattr(self, name))
        if self.max_seq_len < 2:
            raise ValueError("max_seq_len must be at least 2")
        if self.max_steps is not None:
            _positive("max_steps", self.max_steps)
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.decay_shape not in ("linear", "1-sqrt"):
            raise ValueError(f"decay_shape must be linear or 1-sqrt, got {self.decay_shape!r}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in (
            "warmup",
            "save_every",
            "keep_last",
            "keep_every",
            "weight_decay",
            "grad_clip",
        ):
            _non_negative(name, getattr(self, name))
        _positive("log_every", self.log_every)
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.stop_at is not None:
            _non_negative("stop_at", self.stop_at)
        if self.time_budget is not None:
            _positive("time_budget", self.time_budget)


def _positive(name: str, value: Any) -> None:
    if value is None or not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _non_negative(name: str, value: Any) -> None:
    if value is None or value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")


# Presets: model fields, plus the training defaults that suit that size.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Small enough that an epoch of the bundled corpus takes seconds on 2 CPU cores.
    "tiny": {
        "model": dict(
            vocab_size=1024,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=384,
        ),
        "train": dict(max_seq_len=128, batch_size=16, lr=2e-3),
    },
    # MiniMind2-Small (~26M): MiniMind-2 used an 8/3 SwiGLU width and eps 1e-5.
    "minimind2-small": {
        "model": dict(
            vocab_size=6400,
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=1408,
            rms_norm_eps=1e-5,
        ),
        "train": dict(max_seq_len=512, batch_size=32, lr=5e-4),
    },
    # MiniMind2 (~104M)
    "minimind2": {
        "model": dict(
            vocab_size=6400,
            hidden_size=768,
            num_hidden_layers=16,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=2048,
            rms_norm_eps=1e-5,
        ),
        "train": dict(max_seq_len=512, batch_size=32, lr=5e-4),
    },
    # MiniMind-3 (~64M): GQA 8/4, qk-norm, pi-scaled SwiGLU width.
    "minimind3": {
        "model": dict(
            vocab_size=6400,
            hidden_size=768,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            qk_norm=True,
        ),
        "train": dict(max_seq_len=512, batch_size=32, lr=5e-4),
    },
    "minimind3-moe": {
        "model": dict(
            vocab_size=6400,
            hidden_size=768,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            qk_norm=True,
            use_moe=True,
            num_experts=4,
            num_experts_per_tok=1,
            aux_loss_coef=5e-4,
        ),
        "train": dict(max_seq_len=512, batch_size=32, lr=5e-4),
    },
}

# Short CLI names for model fields (the long dataclass names are accepted too).
MODEL_ALIASES = {
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "experts": "num_experts",
    "top_k": "num_experts_per_tok",
    "moe": "use_moe",
}

MODEL_FIELDS = tuple(f.name for f in fields(ModelConfig))
TRAIN_FIELDS = tuple(f.name for f in fields(TrainConfig))

# Fields that define a run's trajectory: a plain resume may not change them (a branch may).
TRAJECTORY_FIELDS = MODEL_FIELDS + (
    "data",
    "tokenizer",
    "max_seq_len",
    "batch_size",
    "accum",
    "seed",
    "dtype",
    "compile",  # compiled kernels round differently from eager ones
)


def resolve(preset: str = "tiny", **overrides: Any) -> tuple[ModelConfig, TrainConfig]:
    """Build (model, train) configs from a preset name and field overrides; validate both.

    `overrides` may use model field names, their short aliases (`layers`, `heads`, …) or train
    field names. A value of None means "not given" and leaves the preset's value.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    model_kw = dict(PRESETS[preset]["model"])
    train_kw: dict[str, Any] = dict(PRESETS[preset]["train"], preset=preset)
    for key, value in overrides.items():
        if value is None:
            continue
        key = MODEL_ALIASES.get(key, key)
        if key in MODEL_FIELDS:
            model_kw[key] = value
        elif key in TRAIN_FIELDS:
            train_kw[key] = value
        else:
            raise ValueError(f"unknown config field {key!r}")
    # A derived field follows the fields it derives from unless set explicitly.
    if "head_dim" not in overrides or overrides["head_dim"] is None:
        model_kw.pop("head_dim", None)
    model, train = ModelConfig(**model_kw), TrainConfig(**train_kw)
    model.validate()
    train.validate()
    return model, train


def config_to_dict(model: ModelConfig, train: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-able data, with a format version."""
    return {
        "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(model),
        "train": dataclasses.asdict(train),
    }


def config_from_dict(data: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """Inverse of `config_to_dict`; unknown keys from a newer writer are an error, not ignored."""
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"config format version {version} is not supported (expected {FORMAT_VERSION})"
        )
    model = ModelConfig(**data["model"])
    train = TrainConfig(**data["train"])
    return model, train


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str | float | int) -> float:
    """'90' or '90s' → 90.0, '30m' → 1800.0, '1.5h' → 5400.0 (seconds)."""
    if isinstance(text, (int, float)):
        return float(text)
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"time budget {text!r} is not a duration like 90s, 30m or 2h")
    number, unit = match.groups()
    return float(number) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def diff_fields(
    old: tuple[ModelConfig, TrainConfig], new: tuple[ModelConfig, TrainConfig]
) -> list[str]:
    """Names of fields whose values differ between two resolved configs."""
    a = {**dataclasses.asdict(old[0]), **dataclasses.asdict(old[1])}
    b = {**dataclasses.asdict(new[0]), **dataclasses.asdict(new[1])}
    return [k for k in a if a[k] != b.get(k)]


__all__ = [
    "ModelConfig",
    "TrainConfig",
    "PRESETS",
    "TRAJECTORY_FIELDS",
    "resolve",
    "config_to_dict",
    "config_from_dict",
    "parse_duration",
    "diff_fields",
    "field",
]
