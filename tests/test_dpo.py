"""The DPO stage: preference learning against a frozen reference that is referred to, never
copied or updated; exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmnb
from conftest import MICRO, assert_same_state
from mmnb import frozen
from mmnb.preference import build_preference_dataset
from mmnb.store import Store
from mmnb.tokenizer import Tokenizer

# A DPO stage on the bundled preference pairs: new data, so its plan counts from the branch.
DPO = dict(objective="dpo", data="dpo", max_seq_len=96, batch_size=16, lr=3e-3,
           schedule="constant", max_steps=40, dpo_beta=0.1)  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory, small_corpus) -> Store:
    store = Store(tmp_path_factory.mktemp("dpo") / "store")
    mmnb.train("sft", store=store, **dict(MICRO, data=str(small_corpus), max_steps=20))
    mmnb.branch("sft", 20, "dpo", store=store, **DPO)
    return store


def test_preference_learning_on_the_bundled_pairs(store):
    m = store.run("dpo").metrics()
    own = slice(20, None)  # the DPO stage's own 40 steps
    loss, accuracy = m["loss"][own], m["reward_accuracy"][own]
    assert len(loss) == 40 and len(m["reward_margin"]) == len(m["step"]) == 60
    assert np.isnan(m["reward_margin"][:20]).all()  # no rewards before the DPO stage
    # Step 1: the policy is the reference, so the loss is exactly log 2 and no pair is won.
    assert loss[0] == pytest.approx(np.log(2), abs=1e-6) and accuracy[0] == 0.0
    assert loss[-10:].mean() < loss[:10].mean() - 0.03
    assert accuracy[-10:].mean() > accuracy[:10].mean() + 0.1
    assert m["reward_margin"][own][-10:].mean() > 0


def test_pairs_are_chosen_then_rejected_with_assistant_labels(store):
    tok = Tokenizer.from_json(store.run("sft").tokenizer_json())
    ds = build_preference_dataset("dpo", tok, 96)
    ids, labels = ds.batch([0, 1])
    assert ids.shape == labels.shape == (4, 96) and len(ds) == 600
    from mmnb.corpus import generate_dpo

    first = generate_dpo()[0]
    for row, side in ((0, "chosen"), (2, "rejected")):
        reply = first[side][-1]["content"]
        supervised = labels[row][labels[row] != -100].tolist()
        assert tok.decode(supervised) == reply + "<|im_end|>"  # the assistant reply, closed
        assert tok.decode(ids[row][ids[row] != 0].tolist()).startswith("<|im_start|>")


def test_the_reference_is_referred_to_and_never_updated(store):
    state = store.run("dpo").load(60)
    ref = state["frozen"]["reference"]
    assert (ref["run"], ref["step"]) == ("sft", 20)
    assert frozen.reference(store.run("sft"), 20) == ref  # the same weights, unchanged
    assert "reference" not in state["model"] and not any("ref" in k for k in state["model"])
    # The reference's logits are the same before and after the stage trained.
    sft, _ = mmnb.load_model(store.run("sft"), 20)
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = frozen.build_model(store.run("sft"), 20, ref["digest"])
    assert torch.equal(sft(x).logits, reference(x).logits)
    policy, _ = mmnb.load_model(store.run("dpo"))
    assert not torch.equal(policy(x).logits, sft(x).logits)


def test_split_resume_equals_straight(store):
    short = {**DPO, "max_steps": 8}
    mmnb.branch("sft", 20, "straight", store=store, **short)
    mmnb.branch("sft", 20, "split", store=store, stop_at=24, **short)
    assert store.run("split").latest().step == 24
    mmnb.resume("split", store=store)
    a, b = store.run("straight").load(28), store.run("split").load(28)
    assert_same_state(a, b)
    assert a["frozen"] == b["frozen"]
    for key in ("reward_margin", "reward_accuracy"):
        np.testing.assert_array_equal(a["metrics"][key], b["metrics"][key])  # NaN == NaN here


def test_lora_dpo_uses_the_base_as_reference(store):
    # LoRA + DPO from the same branch point: the reference is the policy with its adapters off.
    run = mmnb.branch("sft", 20, "lora-dpo", store=store, lora_rank=4, **{**DPO, "max_steps": 3})
    state = run.load(23)
    assert state["frozen"]["base"] == state["frozen"]["reference"]
    assert all(".lora." in k for k in state["model"])
    assert run.metrics()["loss"][20] == pytest.approx(np.log(2), abs=1e-6)


def test_preference_data_errors_name_the_line(store, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    before = sorted(p.name for p in store.path.iterdir())
    with pytest.raises(
        ValueError, match=r"bad.jsonl:1: a DPO record needs 'chosen' and 'rejected'"
    ):
        mmnb.branch("sft", 20, "x", store=store, **{**DPO, "data": str(bad)})
    assert sorted(p.name for p in store.path.iterdir()) == before
