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

from .validate import InvalidInput, in_range, non_negative, one_of, positive

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
    num_shared_experts: int = 0  # MoE: experts every token passes through (MiniMind2-MoE has 1)
    # MoE routing and load-balancing loss as the MiniMind generation of this name does them:
    # "minimind3" renormalises the top-k weights even for top-1 and balances over the batch;
    # "minimind2" renormalises only top-k > 1 and balances per sequence.
    moe_router: str = "minimind3"

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        if self.intermediate_size is None:
            self.intermediate_size = math.ceil(self.hidden_size * math.pi / 64) * 64

    def validate(self) -> None:
        """Raise `InvalidInput` naming the first bad field (see `mmnb.validate`)."""
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
            positive(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise InvalidInput(
                f"{{0}} ({self.num_key_value_heads}) must divide "
                f"{{1}} ({self.num_attention_heads})",
                "num_key_value_heads",
                "num_attention_heads",
            )
        if self.head_dim % 2:
            raise InvalidInput(
                f"head_dim must be even for RoPE, got {self.head_dim} ({{0}} {self.hidden_size} / "
                f"{{1}} {self.num_attention_heads})",
                "hidden_size",
                "num_attention_heads",
            )
        in_range("dropout", self.dropout, 0.0, 1.0, high_open=True)
        if self.num_experts_per_tok > self.num_experts:
            raise InvalidInput(
                f"{{0}} ({self.num_experts_per_tok}) must be at most {{1}} ({self.num_experts})",
                "num_experts_per_tok",
                "num_experts",
            )
        one_of("moe_router", self.moe_router, MOE_ROUTERS)
        non_negative("num_shared_experts", self.num_shared_experts)
        non_negative("aux_loss_coef", self.aux_loss_coef)
        positive("rms_norm_eps", self.rms_norm_eps)
        positive("rope_theta", self.rope_theta)


MOE_ROUTERS = ("minimind3", "minimind2")
OBJECTIVES = ("lm", "dpo")
SCHEDULES = ("wsd", "cosine", "constant", "minimind")
DTYPES = ("fp32", "bf16")
ANOMALY_POLICIES = ("stop", "rollback")


@dataclass
class TrainConfig:
    """Everything about a run except the architecture. Flag names in the CLI are these, dashed."""

    preset: str = "tiny"  # model preset the run started from (recorded; the model fields rule)
    init_from: str | None = None  # weights the run started from (.pth, .safetensors, HF folder,
    # RUN@STEP); None = initialised from the seed. Recorded; the lineage holds the file's SHA-256
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
    log_every: int = 1  # optimizer steps between progress events (front-ends throttle redraws)
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only the automatic ones
    stop_at: int | None = None  # stop (and checkpoint) after this optimizer step; the plan is kept
    time_budget: float | None = None  # seconds of training before a clean stop; the plan is kept
    keep_last: int = 0  # retention: keep the newest N checkpoints (0 = keep all)
    keep_every: int = 0  # retention: also keep every M-th step (0 = none extra)
    # Write checkpoints on a background thread while training goes on; None = when the state
    # is larger than 64 MiB (mmnb.asyncsave). Never changes what is saved.
    async_save: bool | None = None
    # Stages after pretraining and SFT (docs/minimind.md): both start from existing weights.
    lora_rank: int = 0  # LoRA adapters of this rank on lora_targets, base frozen; 0 = off
    lora_alpha: float | None = None  # adapter scale is alpha / rank; None = rank (MiniMind's 1)
    lora_targets: str = "q_proj,o_proj"  # linear layers to adapt (MiniMind: its square ones)
    objective: str = "lm"  # lm (next-token loss) | dpo (preference pairs vs a frozen reference)
    dpo_beta: float = 0.1  # DPO's beta: how far the policy may move from the reference
    # What a refused step (non-finite loss or grad norm, or a spike) leads to (mmnb.jobs.recovery).
    on_anomaly: str = "stop"  # stop (checkpoint the last good step) | rollback
    spike_factor: float = 0.0  # refuse a step whose loss is over F x the running mean; 0 = off
    max_rollbacks: int = 3  # rollback: stop instead after this many rollbacks in the run
    rollback_lr_scale: float = 1.0  # rollback: multiply the planned lr by this at each rollback

    def validate(self) -> None:
        """Raise `InvalidInput` naming the first bad field (see `mmnb.validate`)."""
        for name in ("max_seq_len", "epochs", "batch_size", "accum", "log_every"):
            positive(name, getattr(self, name))
        if self.max_seq_len < 2:
            raise InvalidInput(f"{{0}} must be at least 2, got {self.max_seq_len}", "max_seq_len")
        if self.max_steps is not None:
            positive("max_steps", self.max_steps)
        positive("lr", self.lr)
        one_of("schedule", self.schedule, SCHEDULES)
        one_of("dtype", self.dtype, DTYPES)
        one_of("decay_shape", self.decay_shape, ("linear", "1-sqrt"))
        in_range("decay_fraction", self.decay_fraction, 0.0, 1.0)
        in_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        for name in ("warmup", "save_every", "keep_last", "keep_every", "weight_decay"):
            non_negative(name, getattr(self, name))
        non_negative("grad_clip", self.grad_clip)
        positive("eps", self.eps)
        for name in ("beta1", "beta2"):
            in_range(name, getattr(self, name), 0.0, 1.0, high_open=True)
        non_negative("seed", self.seed)
        if self.stop_at is not None:
            positive("stop_at", self.stop_at)  # a session that stops at step 0 trains nothing
        if self.time_budget is not None:
            positive("time_budget", self.time_budget)
        non_negative("lora_rank", self.lora_rank)
        if self.lora_alpha is not None:
            positive("lora_alpha", self.lora_alpha)
        one_of("objective", self.objective, OBJECTIVES)
        positive("dpo_beta", self.dpo_beta)
        one_of("on_anomaly", self.on_anomaly, ANOMALY_POLICIES)
        non_negative("spike_factor", self.spike_factor)
        if self.spike_factor and not self.spike_factor > 1.0:
            raise InvalidInput(
                f"{{0}} must be above 1 (or 0: off), got {self.spike_factor}", "spike_factor"
            )
        non_negative("max_rollbacks", self.max_rollbacks)
        positive("rollback_lr_scale", self.rollback_lr_scale)
        in_range("rollback_lr_scale", self.rollback_lr_scale, 0.0, 1.0)


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
    # MiniMind2-MoE (~145M): 4 routed experts top-2 plus 1 shared expert, per-sequence
    # load balancing with alpha 0.01 (MiniMind2's MoEGate defaults).
    "minimind2-moe": {
        "model": dict(
            vocab_size=6400,
            hidden_size=640,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=1728,
            rms_norm_eps=1e-5,
            use_moe=True,
            num_experts=4,
            num_experts_per_tok=2,
            num_shared_experts=1,
            aux_loss_coef=0.01,
            moe_router="minimind2",
        ),
        "train": dict(max_seq_len=512, batch_size=32, lr=5e-4),
    },
    # minimind-3-moe (~198M, 64M active): 4 experts top-1, HEAD's routing.
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
            moe_router="minimind3",
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
    "shared_experts": "num_shared_experts",
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
        raise InvalidInput(
            f"unknown {{0}} {preset!r}; choose one of {', '.join(PRESETS)}", "preset"
        )
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
        raise InvalidInput(f"{{0}} {text!r} is not a duration like 90s, 30m or 2h", "time_budget")
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
