"""The trainer: determinism, accumulation, stop conditions, interrupts, RNG isolation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from conftest import MICRO, assert_same_state, cli_args, mmnb
from mmnb.config import resolve
from mmnb.data import build_dataset, epoch_order, tokenizer_for
from mmnb.model import MiniMind
from mmnb.store import Store
from mmnb.train import (
    AnomalyAction,
    NonFiniteError,
    Trainer,
    rng_state,
    set_rng_state,
    stop_on_anomaly,
)


def make_trainer(small_corpus, **overrides) -> Trainer:
    options = {**MICRO, "data": str(small_corpus), **overrides}
    model_cfg, train_cfg = resolve(options.pop("preset"), **options)
    tokenizer = tokenizer_for(train_cfg.data, model_cfg.vocab_size)
    dataset = build_dataset(train_cfg.data, tokenizer, train_cfg.max_seq_len)
    return Trainer(model_cfg, train_cfg, dataset)


def test_same_seed_two_fresh_processes_bitwise_equal(tmp_path, micro):
    store = str(tmp_path / "s")
    for name in ("a", "b"):
        mmnb("train", name, "--store", store, "--no-sample", "--max-steps", "15", *cli_args(micro))
    s = Store(store)
    assert_same_state(s.run("a").load(), s.run("b").load())
    mmnb(
        "train",
        "c",
        "--store",
        store,
        "--no-sample",
        "--max-steps",
        "15",
        "--seed",
        "7",
        *cli_args(micro),
    )
    other = s.run("c").load()["model"]["model.norm.weight"]
    assert not torch.equal(other, s.run("a").load()["model"]["model.norm.weight"])


def test_loss_falls_over_an_epoch(small_corpus):
    trainer = make_trainer(small_corpus, epochs=1, lr=3e-3)
    trainer.fit()
    loss = trainer.metrics["loss"]
    assert len(loss) == trainer.steps_per_epoch
    assert np.mean(loss[-10:]) < np.mean(loss[:5]) - 1.0


def test_logged_loss_is_the_mean_of_the_accumulation_window(small_corpus):
    trainer = make_trainer(small_corpus, batch_size=2, accum=3, max_steps=1)
    reference = MiniMind(trainer.model_config, seed=trainer.config.seed)
    order = epoch_order(len(trainer.dataset), trainer.config.seed, 0)
    losses = []
    for micro in range(3):
        x, y = trainer.dataset.batch(order[micro * 2 : micro * 2 + 2])
        losses.append(reference(x, y).loss.detach())
    trainer.fit()
    expected = ((torch.zeros(()) + losses[0] + losses[1] + losses[2]) / 3).item()
    assert trainer.metrics["loss"] == [expected]
    assert trainer.tokens == 6 * trainer.config.max_seq_len


def test_batches_follow_the_epoch_order(small_corpus):
    trainer = make_trainer(small_corpus, max_steps=3)
    seen = []
    original = trainer.dataset.batch
    trainer.dataset.batch = lambda idx: (seen.append(np.asarray(idx).copy()), original(idx))[1]
    trainer.fit()
    order = epoch_order(len(trainer.dataset), trainer.config.seed, 0)
    assert np.array_equal(np.concatenate(seen), order[:12])


def test_global_rng_draws_do_not_change_training(small_corpus):
    """A notebook cell that reseeds or draws from torch/numpy/random changes nothing."""
    a = make_trainer(small_corpus, max_steps=8, dropout=0.1)
    a.fit()

    def meddle(event):
        torch.manual_seed(event.step)
        torch.rand(100)
        np.random.rand(10)
        random.random()

    b = make_trainer(small_corpus, max_steps=8, dropout=0.1)
    b.listeners.append(meddle)
    b.fit()
    assert_same_state(a.state_dict(), b.state_dict())


def test_interrupt_rolls_back_to_the_last_boundary_and_resumes_exactly(small_corpus):
    straight = make_trainer(small_corpus, max_steps=10, accum=2)
    straight.fit()

    saved = {}
    interrupted = make_trainer(small_corpus, max_steps=10, accum=2)
    interrupted.saver = lambda t, reasons, tags: saved.setdefault(
        "state", (t.state_dict(), reasons)
    )
    original = interrupted.dataset.batch
    calls = []

    def batch_then_interrupt(idx):
        calls.append(1)
        if len(calls) == 2 * 6 + 1:  # mid-accumulation of the 7th step
            raise KeyboardInterrupt
        return original(idx)

    interrupted.dataset.batch = batch_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    state, reasons = saved["state"]
    assert reasons == ["interrupt"] and state["trainer"]["step"] == 6
    resumed = make_trainer(small_corpus, max_steps=10, accum=2)
    resumed.load_state_dict(state)
    resumed.fit()
    assert_same_state(resumed.state_dict(), straight.state_dict())


def test_stop_and_checkpoint_requests_from_outside(small_corpus):
    trainer = make_trainer(small_corpus, max_steps=50)
    saves = []
    trainer.saver = lambda t, reasons, tags: saves.append((t.step, reasons))

    def control(event):
        if event.kind == "step" and event.step == 3:
            trainer.request_checkpoint()
        if event.kind == "step" and event.step == 5:
            trainer.stop()

    trainer.listeners.append(control)
    assert trainer.fit() == "stop"
    assert saves == [(3, ["requested"]), (5, ["stop"])]  # at the very boundary


def test_rng_state_round_trip():
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def _poison_step(trainer: Trainer, step: int) -> None:
    """Make the loss of optimizer step `step` (1-based) NaN, through the model's output."""
    forward = trainer.model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if trainer.step + 1 == step and out.loss is not None:
            out.loss = out.loss * float("nan")
        return out

    trainer.model.forward = poisoned


def test_non_finite_loss_stops_before_the_update_by_default(small_corpus):
    trainer = make_trainer(small_corpus, max_steps=6)
    _poison_step(trainer, 3)
    saves, events = [], []
    trainer.saver = lambda t, reasons, tags: saves.append(t.step)
    trainer.listeners.append(events.append)
    trainer.checkpoint(["start"])
    before = None

    def remember(t, anomaly):
        nonlocal before
        before = (anomaly, {k: v.clone() for k, v in t.model.state_dict().items()})
        return stop_on_anomaly(t, anomaly)

    trainer.on_anomaly = remember
    with pytest.raises(NonFiniteError) as err:
        trainer.fit()
    assert str(err.value) == (
        f"non-finite loss (nan) at step 3 (lr {trainer.plan.lr_at(2):.3g}); training stopped "
        "before the optimizer step; the newest checkpoint is step 0"
    )
    anomaly, weights = before
    assert (anomaly.step, anomaly.what) == (3, "loss") and trainer.step == 2
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    assert all(p.grad is None for p in trainer.model.parameters())
    assert saves == [0] and len(trainer.metrics["loss"]) == 2
    assert (events[-1].kind, events[-1].info["reason"]) == ("stop", "anomaly")


def test_skip_policy_drops_the_update_and_goes_on(small_corpus):
    trainer = make_trainer(small_corpus, max_steps=4)
    _poison_step(trainer, 2)
    trainer.on_anomaly = lambda t, anomaly: AnomalyAction.SKIP
    weights = {}
    original = trainer._train_step

    def step_and_remember():
        original()
        weights[trainer.step] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    trainer._train_step = step_and_remember
    trainer.fit()
    assert trainer.step == 4 and trainer.position == 4 * trainer.samples_per_step
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])
    assert not torch.equal(weights[2]["model.norm.weight"], weights[3]["model.norm.weight"])
    loss = trainer.metrics["loss"]
    assert np.isnan(loss[1]) and np.isfinite([loss[0], *loss[2:]]).all()


def test_huge_lr_stops_at_the_first_non_finite_step_without_a_nan_checkpoint(tmp_path, micro):
    from mmnb.cli import main

    store = Store(tmp_path / "s")
    args = ["train", "x", "--store", str(store.path), "--no-sample", "--lr", "1e6"]
    args += ["--max-steps", "20", "--save-every", "1", *cli_args(micro)]
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(args) == 1
    run = store.run("x")
    newest = run.latest().step
    line = err.getvalue().strip().splitlines()[-1]
    assert line.startswith("mmnb: error: non-finite loss (nan) at step ")
    assert line.endswith(f"the newest checkpoint is step {newest}")
    failed = int(line.split(" at step ")[1].split()[0])
    assert failed == newest + 1 < 20
    for info in run.steps():
        state = run.load(info.step)
        for tensor in [*state["model"].values()] + [
            t for slots in state["optim"]["state"].values() for t in slots.values()
        ]:
            assert torch.isfinite(tensor).all()
        assert np.isfinite(state["metrics"]["loss"]).all()
