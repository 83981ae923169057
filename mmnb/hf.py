"""Hugging Face `transformers` model folders ⇄ MiniMind configs and state dicts (no import of
transformers: this only writes and reads its JSON and key names).

Which standard class holds a MiniMind model exactly (no `trust_remote_code`):

| MiniMind model | class | notes |
| --- | --- | --- |
| dense, no qk-norm (MiniMind2, `tiny`) | `LlamaForCausalLM` | same keys |
| dense, qk-norm (minimind-3) | `Qwen3ForCausalLM` | same keys |
| MoE, qk-norm, no shared expert (minimind-3-moe) | `Qwen3MoeForCausalLM` | same keys (per-expert layout) |
| MoE, no qk-norm, shared experts (MiniMind2-MoE) | `Qwen2MoeForCausalLM` | see below |
| MoE, no qk-norm, no shared expert | `MixtralForCausalLM` | `block_sparse_moe.experts.E.w1/w2/w3` |

Qwen2-MoE multiplies its shared expert by `sigmoid(shared_expert_gate(x))`, where MiniMind2
adds it ungated. A zero gate makes that factor exactly 0.5, and the shared `down_proj` is
stored doubled: 0.5 * (2W)h equals Wh bit for bit (scaling by powers of two is exact). Several
shared experts become one of their summed width (equal up to rounding, not bitwise). Other
combinations (qk-norm with shared experts) have no standard class; export says so.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
from torch import Tensor

from .config import ModelConfig
from .tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, Tokenizer

MAX_POSITIONS = 32768  # MiniMind's max_position_embeddings; RoPE itself has no limit here
CHAT_TEMPLATE = (  # render_chat in Jinja: ChatML as MiniMind writes it
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_EXPERT = re.compile(r"^(model\.layers\.\d+\.)mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_MIXTRAL = {"gate": "w1", "down": "w2", "up": "w3"}


def renormalises(cfg: ModelConfig) -> bool:
    """Whether the top-k router weights are renormalised (MiniMind2 never does for top-1)."""
    return cfg.norm_topk_prob and (cfg.num_experts_per_tok > 1 or cfg.moe_router == "minimind3")


def architecture(cfg: ModelConfig) -> str:
    """The `transformers` class that computes what this MiniMind model computes."""
    if not cfg.use_moe:
        return "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"
    if cfg.qk_norm and not cfg.num_shared_experts:
        return "Qwen3MoeForCausalLM"
    if not cfg.qk_norm and cfg.num_shared_experts:
        return "Qwen2MoeForCausalLM"
    if not cfg.qk_norm and renormalises(cfg):
        return "MixtralForCausalLM"
    raise ValueError(
        "no standard transformers class computes this MoE model exactly (qk-norm with shared "
        "experts, or an unrenormalised top-1 router without them); export it with "
        "--format minimind or --format safetensors"
    )


def config_json(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for `architecture(cfg)`."""
    arch = architecture(cfg)
    out: dict[str, Any] = {
        "architectures": [arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if arch == "LlamaForCausalLM":
        out.update(model_type="llama", mlp_bias=False, pretraining_tp=1)
    elif arch == "Qwen3ForCausalLM":
        out.update(model_type="qwen3", use_sliding_window=False, sliding_window=None)
    elif arch == "Qwen3MoeForCausalLM":
        out.update(
            model_type="qwen3_moe",
            use_sliding_window=False,
            sliding_window=None,
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.intermediate_size,
            norm_topk_prob=renormalises(cfg),
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=cfg.aux_loss_coef,
            output_router_logits=False,
        )
    elif arch == "Qwen2MoeForCausalLM":
        out.update(
            model_type="qwen2_moe",
            use_sliding_window=False,
            sliding_window=None,
            qkv_bias=False,
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.intermediate_size,
            shared_expert_intermediate_size=cfg.intermediate_size * cfg.num_shared_experts,
            norm_topk_prob=renormalises(cfg),
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=cfg.aux_loss_coef,
            output_router_logits=False,
        )
    else:  # Mixtral
        out.update(
            model_type="mixtral",
            sliding_window=None,
            num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            router_aux_loss_coef=cfg.aux_loss_coef,
            router_jitter_noise=0.0,
            output_router_logits=False,
        )
    return out


def to_hf(state: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """MiniMind keys → the keys of `architecture(cfg)`; the tied `lm_head.weight` is left out.
    Values are tensors or `Streamed` sources, passed on as they are; the few tensors computed
    from others (Qwen2-MoE's shared expert) load theirs whole (`whole`)."""
    from .store.streamed import whole

    arch = architecture(cfg)
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue
        expert = _EXPERT.match(name)
        if arch == "MixtralForCausalLM" and (expert or name.endswith("mlp.gate.weight")):
            if expert:
                prefix, e, proj = expert.groups()
                name = f"{prefix}block_sparse_moe.experts.{e}.{_MIXTRAL[proj]}.weight"
            else:
                name = name.replace("mlp.gate.", "block_sparse_moe.gate.")
        if ".mlp.shared_experts." not in name:
            out[name] = tensor
    if arch == "Qwen2MoeForCausalLM":
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}.mlp."
            shared = [f"{p}shared_experts.{e}." for e in range(cfg.num_shared_experts)]
            for proj in ("gate_proj", "up_proj"):
                out[f"{p}shared_expert.{proj}.weight"] = torch.cat(
                    [whole(state[f"{s}{proj}.weight"]) for s in shared], dim=0
                )
            down = torch.cat([whole(state[f"{s}down_proj.weight"]) for s in shared], dim=1)
            out[f"{p}shared_expert.down_proj.weight"] = down * 2  # exact; the gate halves it
            out[f"{p}shared_expert_gate.weight"] = down.new_zeros(1, cfg.hidden_size)
    return out


def from_hf(config: dict[str, Any], tensors: dict[str, Tensor], where: str):
    """(model field values, state dict in MiniMind keys) of a transformers model folder."""
    kind = config.get("model_type")
    arch = (config.get("architectures") or ["?"])[0]

    def get(key: str, default: Any = None) -> Any:
        return config.get(key, default)

    if get("tie_word_embeddings", kind == "minimind") is False:
        raise ValueError(f"{where}: untied input and output embeddings; MiniMind ties them")
    if get("rope_scaling") or (get("rope_parameters") or {}).get("rope_type", "default") not in (
        "default",
    ):
        raise ValueError(f"{where}: RoPE scaling is not supported (MiniMind trains without it)")
    for flag in ("attention_bias", "mlp_bias"):
        if get(flag):
            raise ValueError(f"{where}: {flag} is set; MiniMind's linear layers have no bias")
    heads = get("num_attention_heads")
    theta = get("rope_theta", (get("rope_parameters") or {}).get("rope_theta", 1e6))
    fields: dict[str, Any] = {
        "vocab_size": get("vocab_size"),
        "hidden_size": get("hidden_size"),
        "num_hidden_layers": get("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("num_key_value_heads") or heads,
        "head_dim": get("head_dim") or get("hidden_size") // heads,
        "intermediate_size": get("intermediate_size"),
        "rms_norm_eps": get("rms_norm_eps"),
        "rope_theta": float(theta),
    }
    state = dict(tensors)
    if kind == "llama":
        fields.update(qk_norm=False, use_moe=False)
    elif kind == "qwen3":
        fields.update(qk_norm=True, use_moe=False)
    elif kind in ("qwen3_moe", "qwen2_moe", "mixtral"):
        if get("mlp_only_layers") or get("decoder_sparse_step", 1) != 1:
            raise ValueError(f"{where}: mixed dense and MoE layers are not a MiniMind model")
        fields.update(
            use_moe=True,
            qk_norm=kind == "qwen3_moe",
            num_experts=get("num_experts") or get("num_local_experts"),
            num_experts_per_tok=get("num_experts_per_tok"),
            norm_topk_prob=bool(get("norm_topk_prob", kind == "mixtral")),
            intermediate_size=get("moe_intermediate_size") or get("intermediate_size"),
            aux_loss_coef=get("router_aux_loss_coef", 0.0),
            moe_router="minimind3",
        )
        state = _unfuse_experts(state, fields["num_experts"])
        if kind == "mixtral":
            state = _from_mixtral(state)
        if kind == "qwen2_moe":
            state = _from_qwen2_moe(state, fields, config, where)
    elif kind == "minimind":  # MiniMind's own transformers format (trust_remote_code)
        if "n_routed_experts" in config:  # MiniMind2's MoE config names
            fields.update(
                num_experts=get("n_routed_experts"),
                num_shared_experts=get("n_shared_experts", 1),
                aux_loss_coef=get("aux_loss_alpha", 0.01),
                moe_router="minimind2",
            )
        else:
            fields.update(num_experts=get("num_experts", 4), moe_router="minimind3")
            fields["aux_loss_coef"] = get("router_aux_loss_coef", 5e-4)
        fields.update(
            use_moe=bool(get("use_moe")),
            qk_norm=any(k.endswith("self_attn.q_norm.weight") for k in state),
            num_experts_per_tok=get("num_experts_per_tok", 1),
            norm_topk_prob=bool(get("norm_topk_prob", True)),
        )
        if fields["intermediate_size"] is None:  # MiniMind2 derives it
            fields.pop("intermediate_size")
    else:
        raise ValueError(
            f"{where}: model type {kind!r} ({arch}) is not a MiniMind architecture "
            "(supported: llama, qwen3, qwen3_moe, qwen2_moe, mixtral, minimind)"
        )
    return {k: v for k, v in fields.items() if v is not None}, state


def _unfuse_experts(state: dict[str, Tensor], n: int) -> dict[str, Tensor]:
    """transformers 5 stores experts fused ([E, 2I, C] gate_up, [E, C, I] down); split them."""
    out = {}
    for name, t in state.items():
        m = re.match(
            r"^(model\.layers\.\d+\.)(mlp|block_sparse_moe)\.experts\.(\w+?)(\.weight)?$", name
        )
        if m and m.group(3) in ("gate_up_proj", "down_proj") and t.dim() == 3:
            prefix = f"{m.group(1)}mlp.experts."
            if m.group(3) == "gate_up_proj":
                gate, up = t.chunk(2, dim=1)
                for e in range(n):
                    out[f"{prefix}{e}.gate_proj.weight"] = gate[e]
                    out[f"{prefix}{e}.up_proj.weight"] = up[e]
            else:
                for e in range(n):
                    out[f"{prefix}{e}.down_proj.weight"] = t[e]
            if m.group(2) == "block_sparse_moe":
                out[f"{m.group(1)}mlp.gate.weight"] = state[
                    f"{m.group(1)}block_sparse_moe.gate.weight"
                ]
        else:
            out[name] = t
    return out


def _from_mixtral(state: dict[str, Tensor]) -> dict[str, Tensor]:
    back = {v: k for k, v in _MIXTRAL.items()}
    out = {}
    for name, t in state.items():
        m = re.match(r"^(model\.layers\.\d+\.)block_sparse_moe\.(.*)$", name)
        if m:
            rest = m.group(2)
            w = re.match(r"^experts\.(\d+)\.(w[123])\.weight$", rest)
            if w:
                rest = f"experts.{w.group(1)}.{back[w.group(2)]}_proj.weight"
            name = f"{m.group(1)}mlp.{rest}"
        out.setdefault(name, t)
    return out


def _from_qwen2_moe(
    state: dict[str, Tensor], fields: dict[str, Any], config: dict[str, Any], where: str
) -> dict[str, Tensor]:
    # Only Qwen2-MoE folders whose shared-expert gate is zero (as export writes them) are
    # MiniMind2-MoE models: a learned sigmoid gate has no MiniMind equivalent.
    width = config.get("shared_expert_intermediate_size")
    size = fields["intermediate_size"]
    if not width or width % size:
        raise ValueError(f"{where}: shared expert width {width} is not a multiple of {size}")
    n_shared = width // size
    fields["num_shared_experts"] = n_shared
    fields["moe_router"] = "minimind2"
    out = {}
    for name, t in state.items():
        m = re.match(
            r"^(model\.layers\.\d+\.mlp\.)shared_expert(_gate)?\.(\w+_proj\.)?weight$", name
        )
        if not m:
            out[name] = t
            continue
        prefix = m.group(1)
        if m.group(2):
            if torch.count_nonzero(t):
                raise ValueError(
                    f"{where}: {name} is not zero; a gated shared expert is not MiniMind2-MoE"
                )
            continue
        proj = m.group(3)[:-1]
        parts = t.chunk(n_shared, dim=1 if proj == "down_proj" else 0)
        for e, part in enumerate(parts):
            out[f"{prefix}shared_experts.{e}.{proj}.weight"] = (
                part / 2 if proj == "down_proj" else part
            )
    return out


def tokenizer_files(tokenizer: Tokenizer, max_length: int) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for AutoTokenizer."""
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "unk_token": PAD_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
        "extra_special_tokens": {},
    }
    return {
        "tokenizer.json": tokenizer.to_json(),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps({**special, "unk_token": PAD_TOKEN}, indent=2),
    }


def generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }


__all__ = [
    "architecture",
    "config_json",
    "from_hf",
    "generation_config",
    "to_hf",
    "tokenizer_files",
]
