"""The LoRA stage: adapters only train, checkpoints hold adapters and refer to their base, exact
resume, merged export equal to the adapters' forward."""

from __future__ import annotations

import pytest
import torch

import mmnb
from conftest import MICRO, assert_same_state
from mmnb.cli import main
from mmnb.export import export
from mmnb.model import MiniMind
from mmnb.store import Store

# Same data as the base: the plan keeps its origin, so max_steps counts from step 0.
LORA = dict(lora_rank=4, lora_targets="q_proj,v_proj,down_proj", lr=1e-2, max_steps=22)


@pytest.fixture(scope="module")
def store(tmp_path_factory, small_corpus) -> Store:
    store = Store(tmp_path_factory.mktemp("lora") / "store")
    mmnb.train("base", store=store, **dict(MICRO, data=str(small_corpus), max_steps=12))
    mmnb.branch("base", 12, "lo", store=store, **LORA)
    # A run that is LoRA from its start, from the base's weights.
    mmnb.train("t", store=store, init_from="base@12", lora_rank=2, max_steps=4,
               data=str(small_corpus), max_seq_len=32, batch_size=4)  # fmt: skip
    return store


def test_only_the_adapters_train(store):
    base = store.run("base").load(12)["model"]
    base_file = store.run("base").checkpoint_path(store.run("base").step_info(12))
    stat = base_file.stat()
    lo = store.run("lo")
    state = lo.load(22)
    keys = sorted(state["model"])
    assert keys and all(".lora." in k for k in keys)  # nothing of the base is stored again
    assert len(keys) == 3 * 2  # 3 targets x (A, B) in the one layer
    assert sorted(state["optim"]["state"]) == keys  # AdamW state of the adapters only
    assert state["frozen"]["base"]["run"] == "base" and state["frozen"]["base"]["step"] == 12
    model, _ = mmnb.load_model(lo)
    weights = model.state_dict()
    for name, tensor in base.items():
        assert torch.equal(weights[name], tensor), f"base weight changed: {name}"
    assert all(state["model"][k].abs().sum() > 0 for k in keys if k.endswith("B.weight"))
    assert base_file.stat().st_mtime_ns == stat.st_mtime_ns  # the base file is only read
    # the adapters change what the model computes
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    plain, _ = mmnb.load_model(store.run("base"), 12)
    assert not torch.allclose(model(x).logits, plain(x).logits)


def test_split_resume_equals_straight(store):
    mmnb.branch("base", 12, "lo-split", store=store, stop_at=16, **LORA)
    assert store.run("lo-split").latest().step == 16
    mmnb.resume("lo-split", store=store)
    assert_same_state(store.run("lo").load(22), store.run("lo-split").load(22))


def test_merged_export_equals_the_adapters_forward(store, tmp_path):
    lo = store.run("lo")
    done = export(lo, format="minimind", out=tmp_path / "m.pth", dtype="fp32", merge_lora=True)
    merged = torch.load(done.path, weights_only=True)
    assert not any(".lora." in k for k in merged)
    cfg = mmnb.load_model(lo)[0].config
    model = MiniMind(cfg).eval()
    model.load_state_dict(merged)
    adapted, _ = mmnb.load_model(lo)
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(x).logits, adapted(x).logits, atol=1e-5, rtol=1e-5)

    # Without --merge-lora: the adapters alone, in MiniMind's LoRA layout (half precision).
    alone = torch.load(export(lo, format="minimind", out=tmp_path / "a.pth").path)
    assert sorted(alone) == sorted(lo.load(22)["model"])
    assert {t.dtype for t in alone.values()} == {torch.float16}
    with pytest.raises(ValueError, match="--merge-lora"):
        export(lo, format="hf", out=tmp_path / "hf")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export(store.run("base"), format="hf", out=tmp_path / "hf", merge_lora=True)


def test_lora_on_train_and_on_the_command_line(store, tmp_path, capsys):
    # A run that is LoRA from its start: step 0 holds its base whole; later steps refer to it.
    run = store.run("t")
    first, last = run.load(0)["model"], run.load(4)
    assert "model.embed_tokens.weight" in first and ".lora." in " ".join(first)
    assert all(".lora." in k for k in last["model"]) and last["frozen"]["base"]["run"] == "t"
    base = store.run("base").load(12)["model"]
    weights = mmnb.load_model(run)[0].state_dict()
    assert all(torch.equal(weights[k], base[k]) for k in base)

    args = ["branch", "base", "--step", "12", "--name", "cli-lo", "--store", str(store.path)]
    assert main([*args, "--lora-rank", "2", "--max-steps", "14", "--no-sample"]) == 0
    assert "cli-lo: step 14" in capsys.readouterr().out
    before = sorted(p.name for p in store.path.iterdir())
    assert main([*args[:-4], "--name", "bad", "--store", str(store.path), "--lora-rank", "2",
                 "--lora-targets", "qproj", "--max-steps", "14"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no linear layer named 'qproj'" in err and "q_proj" in err
    assert sorted(p.name for p in store.path.iterdir()) == before


def test_rank_8_checkpoint_of_minimind2_small_is_under_5_percent(tmp_path, small_corpus):
    store = Store(tmp_path / "store")
    sizes = dict(max_seq_len=32, batch_size=1, data=str(small_corpus), vocab_size=6400)
    mmnb.train("full", store=store, preset="minimind2-small", max_steps=1, **sizes)
    mmnb.branch("full", 1, "lora", store=store, lora_rank=8, max_steps=2)
    full = store.run("full").step_info(1).bytes  # weights and AdamW moments
    adapters = store.run("lora").step_info(2).bytes
    assert adapters <= 0.05 * full, (adapters, full)


def test_replay_of_a_run_that_starts_as_lora_from_imported_weights(store):
    from mmnb.jobs.recovery import replay

    again = replay("t", "t-replay", store=store)
    assert_same_state(store.run("t").load(4), again.load(4))
    assert again.load(4)["frozen"]["base"]["run"] == "t-replay"


def test_browser_exports_a_lora_run_merged(store, tmp_path, monkeypatch):
    from mmnb.widgets import Browser

    monkeypatch.chdir(tmp_path)
    b = Browser(store)
    b.select("lo", 22)
    b.exporter.button.click()
    assert (tmp_path / "lo-22-hf" / "model.safetensors").is_file(), b.log.text()
    b.close()
