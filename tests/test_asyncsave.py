"""Checkpoints written in the background: same checkpoints, same order, nothing committed lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import mmnb
from conftest import assert_same_state
from conftest import mmnb as mmnb_cli
from mmnb.asyncsave import AsyncWriter
from mmnb.store import Store


def test_async_split_resume_equals_sync_straight_run_bitwise(tmp_path, micro):
    options = {**micro, "max_steps": 12, "save_every": 2}
    straight = mmnb.train("sync", store=tmp_path, async_save=False, **options)
    events = []
    mmnb.train(
        "split", store=tmp_path, async_save=True, stop_at=5, listeners=[events.append], **options
    )
    mmnb_cli("resume", "split", "--store", str(tmp_path), "--async-save", "--no-sample")
    split = Store(tmp_path).run("split")
    assert [s.step for s in split.steps()] == [0, 2, 4, 5, 6, 8, 10, 12]
    for step in (4, 6, 12):
        assert_same_state(split.load(step), straight.load(step))
    # Each checkpoint is told once, about its own step, in step order.
    told = [e.info["saved"].step for e in events if e.kind == "checkpoint"]
    assert told == [0, 2, 4, 5] and [e.step for e in events if e.kind == "checkpoint"] == told
    assert events[-1].kind == "stop"


def test_a_failed_background_write_stops_training_with_its_error(tmp_path, micro):
    run = mmnb.train("r", store=tmp_path, start=False, max_steps=12, save_every=2,
                     async_save=True, **micro)  # fmt: skip
    trainer = run.trainer
    real = trainer.state_writer

    def failing(state, reasons, tags):
        if state["trainer"]["step"] == 4:
            raise OSError(28, "No space left on device")
        return real(state, reasons, tags)

    trainer.state_writer = failing
    run.open_writer()
    try:
        with pytest.raises(OSError, match="No space left"):
            trainer.fit()
    finally:
        run.close_writer()
    assert [s.step for s in run.steps()] == [0, 2]  # what was committed stays, intact
    run.load(2)
    assert trainer.step < 12  # training stopped soon after, not at the end


def test_writer_copies_before_the_caller_changes_the_tensors():
    writer = AsyncWriter()
    weight = torch.arange(6.0)
    seen = {}

    def write(state, reasons, tags):
        seen.update(state)
        return "ok"

    state = {"trainer": {"step": 1}, "model": {"w": weight, "tied": weight}}
    job = writer.submit(write, state, ["every"], [])
    job.captured.wait()
    weight.add_(100)  # what optimizer.step() does once `captured` is set
    assert job.wait() == "ok"
    assert seen["model"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert seen["model"]["tied"] is seen["model"]["w"]  # still one storage: stored once


def test_sigkill_during_a_background_write_loses_nothing_committed(tmp_path, micro):
    options = {**micro, "max_steps": 12, "save_every": 1}
    reference = mmnb.train("ref", store=tmp_path / "ref", **options)
    store = tmp_path / "store"
    # The child makes every fsync of the checkpoint thread slow and says when one starts, so
    # the kill lands while a checkpoint (or the index naming it) is written but not renamed.
    child = textwrap.dedent(f"""
        import os, sys, threading, time
        real_fsync = os.fsync
        def slow_fsync(fd):
            if threading.current_thread().name == "mmnb-checkpoint":
                print("FSYNC", flush=True)
                time.sleep(0.4)
            real_fsync(fd)
        os.fsync = slow_fsync
        import mmnb
        def tell(event):
            if event.kind == "checkpoint":
                print("CKPT", event.info["saved"].step, flush=True)
        mmnb.train("run", store={str(store)!r}, async_save=True, listeners=[tell], **{options!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        committed = 0
        for line in proc.stdout:
            if line.startswith("CKPT"):
                committed = int(line.split()[1])
            elif line.startswith("FSYNC") and committed >= 3:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # It died mid-write: a temporary file (a checkpoint or the index naming it) is left over.
    left = [p.name for p in (store / "run").rglob(".*.tmp")]
    assert left, sorted(p.name for p in (store / "run").rglob("*"))
    run = Store(store).run("run")
    listed = [s.step for s in run.steps()]
    assert listed[: committed + 1] == list(range(committed + 1))  # every step told is listed
    for step in listed:
        assert_same_state(run.load(step), reference.load(step), metrics=False)
    mmnb_cli("resume", "run", "--store", str(store), "--no-sample")
    assert_same_state(Store(store).run("run").load(), reference.load())
    assert not list((store / "run").rglob(".*.tmp"))  # the next writer removed them
