"""MiniMind's decoder: a Llama/Qwen3-style transformer with GQA, RoPE, SwiGLU and optional MoE.

The state dict uses exactly MiniMind's key names (no RoPE buffers, no biases). Two things
differ from a stock implementation, both for bitwise-exact resume:

* weights are drawn from a private generator seeded by `seed`, never from the global RNG;
* dropout draws its masks from the `generator` passed to `forward` (SDPA's built-in dropout
  would use the global RNG, so with dropout the attention is computed explicitly).

Shapes: B batch, T new tokens, S = past + T key positions, C hidden size, H query heads,
K key/value heads, D head_dim, V vocab, E experts, N = B*T tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig

KVCache = list[tuple[Tensor, Tensor]]  # per layer (k, v), each [B, K, S, D]


@dataclass
class CausalLMOutput:
    logits: Tensor  # [B, T, V]
    loss: Tensor | None = None  # lm_loss + aux_loss; None without labels
    lm_loss: Tensor | None = None  # the cross-entropy part alone
    aux_loss: Tensor | None = None  # scalar: MoE load-balancing loss (0 unless MoE and training)
    past_key_values: KVCache | None = None


def _dropout(x: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    """Inverted dropout whose mask comes from `generator` (None: torch's default generator)."""
    # Draw on the generator's device so a CPU generator also drives a model on another device.
    device = generator.device if generator is not None else x.device
    keep = torch.rand(x.shape, generator=generator, device=device).to(x.device) >= p
    return x * keep * (1.0 / (1.0 - p))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 (bf16 squares lose too much), cast back, then scale: as Llama/MiniMind.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, h, T, D]; cos/sin [T, D] (fp32 tables, cast to x's dtype as Llama does)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.dropout = cfg.dropout
        c, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(c, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(c, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(c, self.n_kv * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, c, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(
        self,
        x: Tensor,  # [B, T, C]
        cos: Tensor,  # [T, D]
        sin: Tensor,
        past: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,  # [T, S] bool, True = may attend; None = plain causal or no mask
        use_cache: bool,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if self.qk_norm:  # per-head norm before RoPE (Qwen3 / MiniMind-3)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, h, T, D]
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)  # [B, K, S, D]
        present = (k, v) if use_cache else None
        if self.n_kv != self.n_heads:  # GQA: each kv head serves H/K consecutive query heads
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)

        p = self.dropout if self.training else 0.0
        if p > 0:
            # Explicit attention so the dropout mask comes from `generator`, not the global RNG.
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # [B, H, T, S]
            if mask is None:  # normally built once by MiniMind.forward; this is a fallback
                S = k.shape[2]
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            scores = scores.masked_fill(~mask, float("-inf"))
            probs = _dropout(scores.float().softmax(dim=-1), p, generator).type_as(q)
            y = probs @ v
        elif mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            # No cache or a fresh prefill is plain causal; a single cached decode step sees all.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=past is None)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # [B, T, H*D]
        y = self.o_proj(y)
        if p > 0:
            y = _dropout(y, p, generator)
        return y, present


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts, plus MiniMind2's always-on shared experts when configured.

    Routing and the load-balancing loss follow the MiniMind generation `cfg.moe_router` names
    (both take MiniMind's formulas op for op, so fp32 logits match MiniMind's bitwise):

    * "minimind3" (HEAD): the top-k weights are renormalised whenever `norm_topk_prob` is set,
      even for top-1 (each weight becomes 1, so the router learns from the aux loss alone);
      aux = E * sum_e load_e * P_e * coef over the whole batch, load_e = assignments / tokens.
    * "minimind2": renormalised only for top-k > 1; aux per sequence (MiniMind2's `seq_aux`):
      mean over sequences of sum_e (E * assignments_e / (T * k)) * P_e, times coef.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.n_experts = cfg.num_experts_per_tok, cfg.num_experts
        self.norm_topk_prob, self.aux_loss_coef = cfg.norm_topk_prob, cfg.aux_loss_coef
        self.router = cfg.moe_router
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(cfg) for _ in range(cfg.num_experts))
        if cfg.num_shared_experts:
            self.shared_experts = nn.ModuleList(
                FeedForward(cfg) for _ in range(cfg.num_shared_experts)
            )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, T, C = x.shape
        k = self.top_k
        flat = x.reshape(-1, C)  # [N, C]
        probs = self.gate(flat).float().softmax(dim=-1)  # [N, E], fp32 for stable routing
        weight, idx = probs.topk(k, dim=-1)  # [N, k]
        if self.norm_topk_prob and (k > 1 or self.router == "minimind3"):
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)  # MiniMind's epsilon
        if k > 1:  # slots in expert order: MiniMind adds a token's expert outputs in that order
            idx, perm = idx.sort(dim=-1)
            weight = weight.gather(-1, perm)

        # Group the N*k (token, slot) assignments by expert with one stable sort, run each expert
        # on its tokens (in token order, as MiniMind does), then put results back in assignment
        # order. Every assignment owns a unique row, so no atomic accumulation is involved:
        # deterministic on any device. Experts with no tokens still run (on an empty slice) so
        # their grads are zeros, not None.
        flat_idx = idx.reshape(-1)  # [N*k]
        order = flat_idx.argsort(stable=True)
        counts = torch.bincount(flat_idx, minlength=self.n_experts).tolist()
        xs = flat[order // k].split(counts)  # assignment a belongs to token a // k
        ys = torch.cat([expert(xe) for expert, xe in zip(self.experts, xs, strict=True)])
        ys = (ys[order.argsort()].view(-1, k, C) * weight.unsqueeze(-1)).to(x.dtype)  # [N, k, C]
        out = ys[:, 0]
        for slot in range(1, k):  # left to right, like MiniMind's accumulation
            out = out + ys[:, slot]
        out = out.view(B, T, C)
        for expert in getattr(self, "shared_experts", ()):
            out = out + expert(x)

        if not (self.training and self.aux_loss_coef > 0):
            return out, probs.new_zeros(())
        E = self.n_experts
        if self.router == "minimind3":
            load = F.one_hot(idx, E).float().mean(0)  # [k, E]: share of tokens per slot
            aux = (load * probs.mean(0)).sum() * E * self.aux_loss_coef
        else:
            counts_seq = torch.zeros(B, E, device=x.device).scatter_add_(
                1, idx.view(B, -1), torch.ones(B, T * k, device=x.device)
            )
            ce = counts_seq.div_(T * k / E)  # [B, E]
            aux = (ce * probs.view(B, T, E).mean(dim=1)).sum(dim=1).mean() * self.aux_loss_coef
        return out, aux


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoEFeedForward(cfg) if cfg.use_moe else FeedForward(cfg)
        self.dropout = cfg.dropout

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        past: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        use_cache: bool,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None, Tensor | None]:
        a, present = self.self_attn(
            self.input_layernorm(x), cos, sin, past, mask, use_cache, generator
        )
        x = x + a
        aux = None
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoEFeedForward):
            m, aux = self.mlp(h)
        else:
            m = self.mlp(h)
        if self.training and self.dropout > 0:
            m = _dropout(m, self.dropout, generator)
        return x + m, present, aux


class MiniMindModel(nn.Module):
    """The body (`model.*` keys): embeddings, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MiniMind(nn.Module):
    """Causal LM: `model` body plus an LM head tied to the token embeddings."""

    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        target = torch.empty(0).device  # honours an enclosing `with torch.device(...)`
        # Build on meta so nn.Linear's own init neither costs time nor touches the global RNG,
        # then materialise and draw the real weights from a private generator.
        with torch.device("meta"):
            self.model = MiniMindModel(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if target.type != "meta":
            self.to_empty(device=target)
        self.lm_head.weight = self.model.embed_tokens.weight  # tie (after to_empty, which unties)
        if target.type != "meta":
            self._init_weights(seed)
        # RoPE tables per (device): fp32 [L, D] cos and sin, grown on demand, never saved.
        self._rope_cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        # Draw on CPU in fp32 in module registration order: the same weights on every device.
        g = torch.Generator().manual_seed(seed)
        seen: set[int] = set()  # the tied LM head is drawn once, as the embedding
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) not in seen:
                seen.add(id(module.weight))
                w = module.weight
                w.copy_(torch.empty(w.shape, device="cpu").normal_(0.0, 0.02, generator=g))
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def num_parameters(self) -> int:
        """Unique parameters (the tied embedding/LM head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def _rope(self, start: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin [length, D] for positions start..start+length-1 (fp32)."""
        end = start + length
        cached = self._rope_cache.get(device)
        if cached is None or cached[0].shape[0] < end:
            size = max(end, 2 * cached[0].shape[0] if cached is not None else 0)
            # Plain tensors even under inference_mode/autocast, so training can reuse them.
            with torch.inference_mode(False), torch.autocast(device.type, enabled=False):
                d = self.config.head_dim
                inv_freq = 1.0 / (
                    self.config.rope_theta
                    ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
                )
                t = torch.arange(size, dtype=torch.float32, device=device)
                freqs = torch.outer(t, inv_freq)  # [L, D/2]
                emb = torch.cat((freqs, freqs), dim=-1)  # [L, D]: rotate-half layout
                cached = (emb.cos(), emb.sin())
            self._rope_cache[device] = cached
        return cached[0][start:end], cached[1][start:end]

    def forward(
        self,
        input_ids: Tensor,  # [B, T] int64
        labels: Tensor | None = None,  # [B, T]; shifted here; -100 = ignore
        *,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        generator: torch.Generator | None = None,
    ) -> CausalLMOutput:
        T = input_ids.shape[1]
        start = past_key_values[0][0].shape[2] if past_key_values else 0
        device = input_ids.device
        cos, sin = self._rope(start, T, device)
        # Only two cases need an explicit mask: multi-token decode after a cache (SDPA's causal
        # mask would be top-left aligned) and the dropout path (which doesn't use SDPA).
        mask = None
        explicit = self.training and self.config.dropout > 0
        if (start > 0 and T > 1) or explicit:
            q_pos = torch.arange(start, start + T, device=device)
            mask = torch.arange(start + T, device=device)[None, :] <= q_pos[:, None]  # [T, S]

        h = self.model.embed_tokens(input_ids)  # [B, T, C]
        presents: KVCache = []
        aux_loss = torch.zeros((), device=device)
        for i, layer in enumerate(self.model.layers):
            past = past_key_values[i] if past_key_values else None
            h, present, aux = layer(h, cos, sin, past, mask, use_cache, generator)
            if present is not None:
                presents.append(present)
            if aux is not None:
                aux_loss = aux_loss + aux
        logits = self.lm_head(self.model.norm(h))  # [B, T, V]

        loss = lm_loss = None
        if labels is not None:
            # Predict token t+1 from position t: pad the shifted labels instead of slicing the
            # logits, which avoids copying a [B, T-1, V] tensor. Mean over non-ignored targets.
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
            per_token = F.cross_entropy(
                logits.float().view(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            # A batch with no supervised token (SFT samples whose assistant reply was truncated
            # away) has loss 0 and no gradient, not 0/0 = nan.
            lm_loss = per_token / (targets != -100).sum().clamp(min=1)
            loss = lm_loss + aux_loss
        return CausalLMOutput(
            logits=logits,
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=aux_loss,
            past_key_values=presents if use_cache else None,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,  # [B, T]
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        seed: int | None = None,
        use_cache: bool = True,
    ) -> Tensor:  # [B, T + n], n <= max_new_tokens
        """Greedy (temperature 0) or nucleus sampling; rows that hit eos keep emitting eos.

        Sampling uses a private generator seeded with `seed`; with `seed=None` that seed is one
        draw from torch's global RNG (so `torch.manual_seed` still makes runs repeatable). All
        rows must have the same length (no padding/attention mask). Runs in eval mode and
        restores the previous mode.
        """
        was_training = self.training
        self.eval()
        try:
            g = None
            if temperature > 0:
                if seed is None:
                    seed = int(torch.randint(0, 2**62, ()).item())
                g = torch.Generator(device=input_ids.device).manual_seed(seed)
            seq, step_ids, past = input_ids, input_ids, None
            finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            for _ in range(max_new_tokens):
                if use_cache:  # feed only the new tokens; the cache holds the rest
                    out = self(step_ids, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                else:
                    out = self(seq)
                logits = out.logits[:, -1].float()  # [B, V]
                if temperature > 0:
                    nxt = self._sample(logits / temperature, top_p, g)
                else:
                    nxt = logits.argmax(dim=-1)
                if eos_token_id is not None:
                    nxt = nxt.masked_fill(finished, eos_token_id)
                    finished |= nxt == eos_token_id
                seq = torch.cat((seq, nxt[:, None]), dim=1)
                step_ids = nxt[:, None]
                if eos_token_id is not None and bool(finished.all()):
                    break
            return seq
        finally:
            self.train(was_training)

    @staticmethod
    def _sample(logits: Tensor, top_p: float, g: torch.Generator | None) -> Tensor:
        probs = logits.softmax(dim=-1)  # [B, V]
        if top_p < 1.0:
            sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
            # Drop a token when the mass before it already reaches top_p (the top one survives).
            drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
            probs = torch.zeros_like(probs).scatter(-1, sorted_i, sorted_p.masked_fill(drop, 0.0))
        return torch.multinomial(probs, 1, generator=g).squeeze(-1)  # [B]


__all__ = ["CausalLMOutput", "KVCache", "MiniMind", "RMSNorm"]
