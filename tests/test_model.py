"""Behaviour of the MiniMind decoder: layout, init, masking, cache, losses, dropout, autocast."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mmnb.config import PRESETS, ModelConfig, resolve
from mmnb.model import MiniMind

# Tiny architectures covering each code path; all fast on 2 CPU cores.
VARIANTS = {
    "dense": {},
    "qk_norm": {"qk_norm": True},
    "moe": {"use_moe": True, "num_experts": 4, "num_experts_per_tok": 2},
    "moe_top1": {"use_moe": True, "num_experts": 3, "num_experts_per_tok": 1, "qk_norm": True},
}


def tiny(**overrides) -> ModelConfig:
    base = {
        "vocab_size": 97,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
    }
    cfg = ModelConfig(**{**base, **overrides})
    cfg.validate()
    return cfg


def ids(batch: int, length: int, vocab: int = 97, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def expected_keys(c: ModelConfig) -> set[str]:
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    swiglu = ("gate_proj", "up_proj", "down_proj")
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        keys |= {f"{p}self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        if c.qk_norm:
            keys |= {f"{p}self_attn.q_norm.weight", f"{p}self_attn.k_norm.weight"}
        keys |= {f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"}
        if c.use_moe:
            keys.add(f"{p}mlp.gate.weight")
            for e in range(c.num_experts):
                keys |= {f"{p}mlp.experts.{e}.{n}.weight" for n in swiglu}
            for e in range(c.num_shared_experts):
                keys |= {f"{p}mlp.shared_experts.{e}.{n}.weight" for n in swiglu}
        else:
            keys |= {f"{p}mlp.{n}.weight" for n in swiglu}
    return keys


def expected_params(c: ModelConfig) -> int:
    C, D = c.hidden_size, c.head_dim
    attn = 2 * C * c.num_attention_heads * D + 2 * C * c.num_key_value_heads * D
    qk = 2 * D if c.qk_norm else 0
    mlp = 3 * C * c.intermediate_size
    if c.use_moe:
        mlp = C * c.num_experts + (c.num_experts + c.num_shared_experts) * mlp
    layer = attn + qk + mlp + 2 * C
    return c.vocab_size * C + c.num_hidden_layers * layer + C  # tied head counted once


# ---- layout and size -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_layout_and_param_count(name: str) -> None:
    cfg, _ = resolve(name)
    with torch.device("meta"):
        model = MiniMind(cfg)
    assert all(p.is_meta for p in model.parameters())
    sd = model.state_dict()
    assert set(sd) == expected_keys(cfg)
    assert model.num_parameters() == expected_params(cfg)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (
        cfg.num_key_value_heads * cfg.head_dim,
        cfg.hidden_size,
    )


@pytest.mark.parametrize(
    "name,lo,hi",
    [
        ("minimind2-small", 25e6, 27e6),
        ("minimind3", 62e6, 66e6),
        ("minimind2", 100e6, 108e6),
        ("minimind2-moe", 143e6, 147e6),
        ("minimind3-moe", 196e6, 200e6),
    ],
)
def test_preset_sizes(name: str, lo: float, hi: float) -> None:
    with torch.device("meta"):
        model = MiniMind(resolve(name)[0])
    assert lo <= model.num_parameters() <= hi


def test_tied_no_bias_init_and_private_rng() -> None:
    cfg = tiny(vocab_size=2048, hidden_size=256, intermediate_size=512, qk_norm=True)
    rng = torch.get_rng_state()
    model = MiniMind(cfg, seed=7)
    assert torch.equal(rng, torch.get_rng_state())  # construction never touches the global RNG

    assert model.lm_head.weight is model.model.embed_tokens.weight
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    assert not any("bias" in k for k in sd)
    assert all(getattr(m, "bias", None) is None for m in model.modules())

    for key, w in sd.items():
        if key.endswith("norm.weight") or "layernorm" in key:
            assert torch.equal(w, torch.ones_like(w)), key
        else:
            assert w.mean().abs() < 2e-3, key
            assert abs(w.std().item() - 0.02) < 1.5e-3, key

    again = MiniMind(cfg, seed=7).state_dict()
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    other = MiniMind(cfg, seed=8).state_dict()
    assert not torch.equal(sd["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_state_dict_roundtrip_keeps_tie() -> None:
    cfg = tiny()
    src, dst = MiniMind(cfg, seed=1), MiniMind(cfg, seed=2)
    dst.load_state_dict(src.state_dict())
    assert dst.lm_head.weight is dst.model.embed_tokens.weight
    x = ids(2, 9)
    assert torch.equal(src.eval()(x).logits, dst.eval()(x).logits)


# ---- attention: masking and cache ------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causal_future_tokens_do_not_leak(variant: str) -> None:
    model = MiniMind(tiny(**VARIANTS[variant]), seed=0).eval()
    x = ids(2, 12)
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % 97
    a, b = model(x).logits, model(y).logits
    if VARIANTS[variant].get("use_moe"):
        # Changing a token re-routes it, so each expert's GEMM sees a different number of rows,
        # and CPU GEMM results for a row depend (in the last bits) on the row count. So MoE is
        # only equal to rounding; a leak would be orders of magnitude larger.
        torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-6, rtol=0)
    else:
        assert torch.equal(a[:, :7], b[:, :7])
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


def test_causal_with_dropout_path() -> None:
    # Training with dropout uses the explicit attention with its own mask.
    model = MiniMind(tiny(dropout=0.2), seed=0).train()
    x = ids(2, 12)
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % 97
    a = model(x, generator=torch.Generator().manual_seed(3)).logits
    b = model(y, generator=torch.Generator().manual_seed(3)).logits
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.equal(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_matches_full_forward(variant: str) -> None:
    model = MiniMind(tiny(**VARIANTS[variant]), seed=0).eval()
    x = ids(2, 14)
    full = model(x).logits
    # Prefill 6, then single tokens, then a 3-token chunk (explicit offset mask), then one more.
    chunks, logits, past = [(0, 6), (6, 7), (7, 8), (8, 11), (11, 12), (12, 14)], [], None
    for lo, hi in chunks:
        out = model(x[:, lo:hi], past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits)
    assert len(past) == 2 and past[0][0].shape == (2, 2, 14, 8)  # [B, K, S, D]
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-5, rtol=1e-5)
    assert model(x).past_key_values is None


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_generate_cache_equals_no_cache(variant: str) -> None:
    model = MiniMind(tiny(**VARIANTS[variant]), seed=0).train()
    prompt = ids(3, 5)
    a = model.generate(prompt, 12, use_cache=True)
    b = model.generate(prompt, 12, use_cache=False)
    assert a.shape == (3, 17)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :5], prompt)
    assert model.training  # previous mode restored


def test_generate_sampling_seeded() -> None:
    model = MiniMind(tiny(), seed=0).eval()
    prompt = ids(2, 4)
    rng = torch.get_rng_state()
    a = model.generate(prompt, 16, temperature=1.0, top_p=0.9, seed=11)
    b = model.generate(prompt, 16, temperature=1.0, top_p=0.9, seed=11)
    c = model.generate(prompt, 16, temperature=1.0, top_p=0.9, seed=12)
    assert torch.equal(rng, torch.get_rng_state())  # an explicit seed leaves the global RNG alone
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not model.training
    # Cache and no cache sample the same tokens from the same generator stream.
    d = model.generate(prompt, 16, temperature=1.0, seed=11, use_cache=False)
    e = model.generate(prompt, 16, temperature=1.0, seed=11, use_cache=True)
    assert torch.equal(d, e)
    # A vanishing nucleus keeps only the top token: sampling becomes greedy.
    greedy = model.generate(prompt, 16)
    assert torch.equal(model.generate(prompt, 16, temperature=1.0, top_p=1e-6, seed=5), greedy)


def test_generate_stops_at_eos() -> None:
    model = MiniMind(tiny(), seed=0).eval()
    prompt = ids(2, 4)
    greedy = model.generate(prompt, 10)
    eos = int(greedy[0, 4])  # row 0 emits eos first
    out = model.generate(prompt, 10, eos_token_id=eos)
    assert out.shape[1] <= 14
    assert (out[0, 4:] == eos).all()  # finished rows keep emitting eos
    row1 = greedy[1, 4:]
    hits = (row1 == eos).nonzero()
    if len(hits):  # row 1 also finishes: generation stops right there
        stop = int(hits[0]) + 1
        assert out.shape[1] == 4 + stop
        assert torch.equal(out[1, 4 : 4 + stop], row1[:stop])
    else:
        assert torch.equal(out[1], greedy[1])
    single = model.generate(prompt[:1], 10, eos_token_id=eos)
    assert single.shape == (1, 5)


# ---- losses ----------------------------------------------------------------------------------


def test_loss_is_shifted_cross_entropy_and_ignores_minus_100() -> None:
    model = MiniMind(tiny(), seed=0).eval()
    x = ids(2, 10)
    out = model(x, x)
    logits = out.logits
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)
    assert torch.equal(out.loss, out.lm_loss) and out.aux_loss.item() == 0.0

    labels = x.clone()
    labels[0, 3:6] = -100
    labels[1, 8] = -100
    masked = model(x, labels).loss
    keep = labels[:, 1:] != -100
    manual = F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep])
    torch.testing.assert_close(masked, manual)
    # Whatever the model would have had to predict at ignored positions does not matter, and
    # the first label is never a target.
    other = labels.clone()
    other[:, 0] = 5
    assert torch.equal(model(x, other).loss, masked)


def test_moe_aux_loss() -> None:
    cfg = tiny(**VARIANTS["moe"], aux_loss_coef=0.01)
    model = MiniMind(cfg, seed=0).train()
    x = ids(4, 16)
    out = model(x, x)
    assert out.aux_loss.item() > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    # Perfectly balanced routing gives num_experts * sum(1/E * P_e) * coef = coef per layer, and
    # any routing is at least roughly that; a sanity bound rather than an exact value.
    assert 0.5 * 0.01 * 2 < out.aux_loss.item() < 4 * 0.01 * 2
    out.loss.backward()
    gate = model.model.layers[0].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())  # idle experts get zero grads

    model.eval()
    ev = model(x, x)
    assert ev.aux_loss.item() == 0.0
    assert torch.equal(ev.loss, ev.lm_loss)


def test_moe_top1_router_gradient_per_generation() -> None:
    # MiniMind2 keeps a single expert's raw probability as its weight, so the router learns from
    # the LM loss; HEAD renormalises it to exactly 1, so without the aux loss it learns nothing.
    x, y = ids(2, 8), ids(2, 8, seed=1)
    grads = {}
    for router in ("minimind2", "minimind3"):
        cfg = tiny(**VARIANTS["moe_top1"], aux_loss_coef=0.0, moe_router=router)
        model = MiniMind(cfg, seed=0).train()
        model(x, y).loss.backward()
        grads[router] = model.model.layers[0].mlp.gate.weight.grad.abs().sum().item()
    assert grads["minimind2"] > 1e-3
    assert grads["minimind3"] < 1e-6 * grads["minimind2"]  # rounding residue of w / (w + 1e-20)


@pytest.mark.parametrize("router", ["minimind2", "minimind3"])
def test_moe_routing_formulas(router: str) -> None:
    # The routed output and aux loss recomputed from their definitions, one token at a time.
    cfg = tiny(
        use_moe=True,
        num_experts=4,
        num_experts_per_tok=2,
        num_shared_experts=1 if router == "minimind2" else 0,
        aux_loss_coef=0.1,
        moe_router=router,
    )
    moe = MiniMind(cfg, seed=3).model.layers[0].mlp.train()
    h = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    out, aux = moe(h)
    p = F.softmax(moe.gate(h.reshape(-1, 32)), dim=-1)
    w, i = p.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    want = torch.stack(
        [
            sum(w[n, s] * moe.experts[int(i[n, s])](h.reshape(-1, 32)[n]) for s in range(2))
            for n in range(10)
        ]
    ).view(2, 5, 32)
    if router == "minimind2":
        want = want + moe.shared_experts[0](h)
    torch.testing.assert_close(out, want)
    counts = F.one_hot(i, 4).sum(1).float()  # [N, E]
    if router == "minimind3":
        want_aux = 4 * (counts.mean(0) * p.mean(0)).sum() * 0.1
    else:
        per_seq = counts.view(2, 5, 4).sum(1) / (5 * 2 / 4)  # [B, E]
        want_aux = (per_seq * p.view(2, 5, 4).mean(1)).sum(1).mean() * 0.1
    torch.testing.assert_close(aux, want_aux)


# ---- dropout and determinism -----------------------------------------------------------------


def test_dropout_uses_only_the_given_generator() -> None:
    model = MiniMind(tiny(dropout=0.3), seed=0).train()
    x = ids(2, 12)
    rng = torch.get_rng_state()
    a = model(x, x, generator=torch.Generator().manual_seed(1))
    b = model(x, x, generator=torch.Generator().manual_seed(1))
    c = model(x, x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(rng, torch.get_rng_state())
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    assert not torch.equal(a.logits, c.logits)

    # Eval mode: no dropout at all; the result equals the same weights built without dropout.
    model.eval()
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    e1, e2 = model(x, generator=g).logits, model(x).logits
    assert torch.equal(g.get_state(), state)
    assert torch.equal(e1, e2)
    plain = MiniMind(tiny(dropout=0.0), seed=0).eval()
    assert torch.equal(e1, plain(x).logits)


def test_no_dropout_draws_no_random_numbers_in_training() -> None:
    model = MiniMind(tiny(**VARIANTS["moe"]), seed=0).train()
    g = torch.Generator().manual_seed(1)
    state, rng = g.get_state(), torch.get_rng_state()
    model(ids(2, 8), ids(2, 8), generator=g).loss.backward()
    assert torch.equal(g.get_state(), state) and torch.equal(torch.get_rng_state(), rng)


def test_training_after_inference_mode() -> None:
    # RoPE tables cached under inference_mode must still be usable for autograd later.
    model = MiniMind(tiny(), seed=0)
    with torch.inference_mode():
        model(ids(1, 20))
    model(ids(1, 10), ids(1, 10)).loss.backward()


# ---- autocast --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["dense", "qk_norm", "moe"])
def test_bf16_autocast_forward_backward(variant: str) -> None:
    model = MiniMind(tiny(**VARIANTS[variant], dropout=0.1), seed=0).train()
    x = ids(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, x, generator=torch.Generator().manual_seed(0))
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # Eval without dropout goes through SDPA under autocast.
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(x, x).loss)


# ---- training --------------------------------------------------------------------------------


def _train(model: MiniMind, opt: torch.optim.Optimizer, steps: range, x: torch.Tensor) -> float:
    for step in steps:
        out = model(x, x, generator=torch.Generator().manual_seed(1000 + step))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out.loss.item()


def test_overfits_a_batch_and_resumes_bitwise() -> None:
    cfg = tiny(**VARIANTS["moe"], dropout=0.1)
    x = ids(4, 16)
    model = MiniMind(cfg, seed=3).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model(x, x, generator=torch.Generator().manual_seed(0)).lm_loss.item()
    _train(model, opt, range(20), x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = copy.deepcopy(opt.state_dict())
    last = _train(model, opt, range(20, 40), x)
    assert last < 0.5 * first

    # A fresh process-like restart from the step-20 state lands on identical weights.
    resumed = MiniMind(cfg, seed=99).train()
    resumed.load_state_dict(state)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(opt_state)
    _train(resumed, opt2, range(20, 40), x)
    sd, sd2 = model.state_dict(), resumed.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
