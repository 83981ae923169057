"""Numerical recovery: rollback on an injected fault or a crafted spike, recorded and replayable."""

from __future__ import annotations

import math

import pytest
import torch

import mmnb
from conftest import assert_same_state
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


def test_rollbacks_are_limited_and_recorded_across_a_resume(store, micro, monkeypatch):
    monkeypatch.setenv(recovery.FAULT_ENV, "3")
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        mmnb.train("a", store=store, max_steps=8, on_anomaly="rollback", max_rollbacks=0, **micro)
    assert store.run("a").info()["history"] == []
