"""Numerical recovery: rollback on an injected fault or a crafted spike, recorded and replayable."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

import mmnb
from conftest import assert_same_state
from mmnb.data import build_dataset, epoch_order
from mmnb.events import read_events
from mmnb.jobs import recovery
from mmnb.train import NonFiniteError


def test_a_nonfinite_step_rolls_back_skips_its_window_and_replays_bitwise(
    store, micro, monkeypatch
):
    monkeypatch.setenv(recovery.FAULT_ENV, "11")  # step 11's loss becomes NaN (once)
    run = mmnb.train(
        "a", store=store, max_steps=24, save_every=4, on_anomaly="rollback",
        rollback_lr_scale=0.5, **micro,
    )  # fmt: skip
    monkeypatch.delenv(recovery.FAULT_ENV)
    [entry] = run.info()["history"]
    assert entry["kind"] == "rollback" and entry["what"] == "non-finite loss"
    assert (entry["step"], entry["anomaly_step"], entry["skip_steps"]) == (8, 11, 3)
    assert entry["skip"] == [{"epoch": 0, "start": 8 * 4, "end": 11 * 4}]  # batch_size 4
    assert entry["lr_scale"] == 0.5
    state = run.load()
    assert state["trainer"]["step"] == 24 and state["data"]["position"] == (24 + 3) * 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert state["schedule"]["plan"]["lr"] == micro_lr(run) * 0.5
    assert all(math.isfinite(x) for x in state["metrics"]["loss"])
    events = read_events(run.path)
    recovered = [e for e in events if e.kind == "recover"]
    assert len(recovered) == 1 and "rolled back to step 8" in recovered[0].info["text"]
    assert any(e.kind == "notice" and "rolled back" in e.info["text"] for e in events)
    # The loss plot's steps: 1..11 were seen, then 9.. again after the rollback.
    steps = [e.step for e in events if e.kind == "step"]
    assert steps[:10] == list(range(1, 11)) and steps[10:13] == [9, 10, 11]
    replay = recovery.replay("a", store=store)
    assert replay.info()["history"] == [entry]
    assert_same_state(replay.load(), state)


def micro_lr(run) -> float:
    return run.config_dict()["train"]["lr"]


def test_on_anomaly_stop_is_one_error_and_no_nonfinite_checkpoint(store, micro, monkeypatch):
    monkeypatch.setenv(recovery.FAULT_ENV, "5")
    with pytest.raises(NonFiniteError, match="non-finite loss .* at step 5"):
        mmnb.train("a", store=store, max_steps=10, save_every=2, **micro)
    run = store.run("a")
    assert [s.step for s in run.steps()] == [0, 2, 4]
    for info in run.steps():
        assert all(torch.isfinite(t).all() for t in run.load(info.step)["model"].values())
    assert run.info()["history"] == []


def test_a_resume_from_before_a_rollback_takes_the_recorded_path(store, micro, monkeypatch):
    monkeypatch.setenv(recovery.FAULT_ENV, "11")
    run = mmnb.train(
        "a", store=store, max_steps=24, save_every=4, on_anomaly="rollback", **micro
    )  # fmt: skip
    monkeypatch.delenv(recovery.FAULT_ENV)
    final = run.load()
    again = mmnb.resume("a", store=store, step=8)  # checkpoint 8 is from before the rollback
    assert_same_state(again.trainer.state_dict(), final)
    monkeypatch.setenv(recovery.FAULT_ENV, "3")
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        mmnb.train("b", store=store, max_steps=8, on_anomaly="rollback", max_rollbacks=0, **micro)
    assert store.run("b").info()["history"] == []


def test_a_crafted_sample_that_spikes_the_loss_is_skipped_and_replayed_bitwise(
    store, micro, tmp_path
):
    # 40 CJK characters: byte tokens this corpus never uses, so a trained model finds them very
    # unlikely. With seed 1338 and one sample per step, their first sample comes at step 150.
    with open(micro["data"], encoding="utf-8") as f:
        lines = f.read()
    rng = random.Random(0)
    crafted = "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(40))
    data = tmp_path / "crafted.jsonl"
    data.write_text(lines + json.dumps({"text": crafted}) + "\n", encoding="utf-8")
    options = dict(micro, data=str(data), batch_size=1, seed=1338, max_steps=200, save_every=10)
    with pytest.raises(
        NonFiniteError, match=r"loss spike \(.* > 1.5 x the running mean .*\) at step 150"
    ):
        mmnb.train("stop", store=store, spike_factor=1.5, **options)
    assert store.run("stop").latest().step == 140  # nothing of the spike was applied or saved
    run = mmnb.train("a", store=store, spike_factor=1.5, on_anomaly="rollback", **options)
    history = run.info()["history"]
    assert [e["what"].split(" (")[0] for e in history] == ["loss spike"] * len(history)
    first = history[0]
    assert (first["anomaly_step"], first["step"], first["skip"]) == (
        150, 140, [{"epoch": 0, "start": 140, "end": 150}],
    )  # fmt: skip
    # The crafted sample's position in the epoch's order lies in the skipped window.
    tokenizer = mmnb.load_model(run)[1]
    dataset = build_dataset(str(data), tokenizer, micro["max_seq_len"])
    order = epoch_order(len(dataset), 1338, 0)
    text = tokenizer.decode(dataset.batch([int(order[149])])[0][0].tolist())
    assert any(ch in crafted for ch in text)
    state = run.load()
    assert state["trainer"]["step"] == 200
    assert all(math.isfinite(x) for x in state["metrics"]["loss"])
    assert_same_state(recovery.replay(run, store=store).load(), state)
