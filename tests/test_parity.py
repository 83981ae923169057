"""Each preset against MiniMind's own model code of the generation it names, side by side.

MiniMind's source is never part of this repository: these tests load `model/model_minimind.py`
by path from `$MMNB_MINIMIND_SRC` (a folder holding `head/` = minimind-3 and `minimind2/` = the
last MiniMind2 commit; default /work/minimind-src) and skip without it or without transformers,
which MiniMind's model file imports.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from mmnb.config import ModelConfig, resolve
from mmnb.model import MiniMind

SRC = Path(os.environ.get("MMNB_MINIMIND_SRC", "/work/minimind-src"))
GENERATION = {  # preset -> MiniMind source folder of its generation
    "tiny": "minimind2",
    "minimind2-small": "minimind2",
    "minimind2": "minimind2",
    "minimind2-moe": "minimind2",
    "minimind3": "head",
    "minimind3-moe": "head",
}
# MiniMind's config still passes the deprecated rope_scaling to transformers.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
MICRO = dict(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=96, vocab_size=128)


def _minimind_module(generation: str):
    path = SRC / generation / "model" / "model_minimind.py"
    if not path.is_file():
        pytest.skip(f"MiniMind source not found at {path} (set MMNB_MINIMIND_SRC)")
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location(f"_minimind_{generation}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _their_config(module, generation: str, c: ModelConfig):
    common = dict(
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        vocab_size=c.vocab_size,
        intermediate_size=c.intermediate_size,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        use_moe=c.use_moe,
        norm_topk_prob=c.norm_topk_prob,
        num_experts_per_tok=c.num_experts_per_tok,
        max_position_embeddings=128,
    )
    if generation == "head":
        return module.MiniMindConfig(
            **common,
            head_dim=c.head_dim,
            num_experts=c.num_experts,
            router_aux_loss_coef=c.aux_loss_coef,
        )
    return module.MiniMindConfig(
        **common,
        n_routed_experts=c.num_experts,
        n_shared_experts=c.num_shared_experts,
        aux_loss_alpha=c.aux_loss_coef,
    )


@pytest.mark.parametrize("preset", list(GENERATION))
def test_preset_matches_its_minimind_generation(preset: str) -> None:
    generation = GENERATION[preset]
    module = _minimind_module(generation)
    cfg, _ = resolve(preset, **MICRO)
    torch.manual_seed(0)  # MiniMind initialises from the global RNG
    theirs = module.MiniMindForCausalLM(_their_config(module, generation, cfg))
    ours = MiniMind(cfg, seed=1)
    x = torch.randint(0, cfg.vocab_size, (3, 24), generator=torch.Generator().manual_seed(2))

    # mmnb's weights in MiniMind's model (strict) and MiniMind's in mmnb's: the same logits.
    theirs.load_state_dict(ours.state_dict(), strict=True)
    for mode in ("eval", "train"):
        ours.train(mode == "train"), theirs.train(mode == "train")
        a, b = ours(x, x), theirs(x, labels=x)
        assert torch.equal(a.logits, b.logits), f"{preset} {mode}: logits differ"
        if cfg.use_moe and mode == "train":
            assert torch.equal(a.aux_loss, b.aux_loss), f"{preset}: aux loss differs"
    other = module.MiniMindForCausalLM(_their_config(module, generation, cfg)).eval()
    mine = MiniMind(cfg, seed=5)
    mine.load_state_dict(other.state_dict(), strict=True)
    assert torch.equal(mine.eval()(x).logits, other(x).logits)


@pytest.mark.parametrize("preset", ["minimind2-small", "minimind3-moe"])
def test_pth_both_ways_with_minimind(preset, tmp_path, small_corpus):
    """`export --format minimind` loads into MiniMind (strict) and computes the same; a .pth
    saved exactly as MiniMind's trainers save it starts an mmnb run with identical weights."""
    import mmnb
    from mmnb.export import export

    generation = GENERATION[preset]
    module = _minimind_module(generation)
    store = mmnb.Store(tmp_path / "store")
    sizes = dict(MICRO, vocab_size=300, max_seq_len=32, batch_size=4, data=str(small_corpus))
    mmnb.train("a", store=store, preset=preset, max_steps=3, **sizes)
    cfg = mmnb.load_model(store.run("a"))[0].config
    theirs = module.MiniMindForCausalLM(_their_config(module, generation, cfg)).eval()
    path = export(store.run("a"), format="minimind", out=tmp_path / "a.pth", dtype="fp32").path
    theirs.load_state_dict(torch.load(path, weights_only=True), strict=True)
    ours = mmnb.load_model(store.run("a"))[0]
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours(x).logits, theirs(x).logits)

    # MiniMind's trainers: torch.save({k: v.half().cpu() for k, v in state_dict.items()}, ckp)
    torch.manual_seed(3)
    fresh = module.MiniMindForCausalLM(_their_config(module, generation, cfg))
    torch.save({k: v.half().cpu() for k, v in fresh.state_dict().items()}, tmp_path / "mm.pth")
    (tmp_path / "tokenizer.json").write_text(store.run("a").tokenizer_json(), encoding="utf-8")
    # Sizes given (heads: a MiniMind2 .pth does not say them) must agree with the shapes.
    run = mmnb.train("b", store=store, init_from=str(tmp_path / "mm.pth"), start=False, **sizes)
    got = run.load(0, groups=("model",))["model"]
    assert all(torch.equal(got[k], v.half().float()) for k, v in fresh.state_dict().items())
    fresh.load_state_dict({k: v.half().float() for k, v in fresh.state_dict().items()})
    assert torch.equal(mmnb.load_model(run)[0](x).logits, fresh.eval()(x).logits)


@pytest.mark.parametrize("generation", ["head", "minimind2"])
def test_minimind_tokenizer_loads_and_renders_chatml(generation):
    path = SRC / generation / "model" / "tokenizer.json"
    if not path.is_file():
        pytest.skip(f"MiniMind's tokenizer not found at {path}")
    from mmnb.tokenizer import Tokenizer

    tok = Tokenizer.from_file(path)
    assert tok.vocab_size == 6400 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "你好"}], add_generation_prompt=True
    )
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.eos_id in ids and tok.decode(ids) == text
