"""The Python API: background training, on-demand checkpoints, errors leave the store alone."""

from __future__ import annotations

import threading

import h5py
import pytest
import torch

import mmnb
from conftest import assert_same_state
from mmnb.data import DataError


def test_background_training_equals_blocking(store, micro):
    blocking = mmnb.train("fg", store=store, max_steps=30, **micro)
    run = mmnb.train("bg", store=store, max_steps=30, background=True, **micro)
    assert run.thread is not None
    # Meddle in the main thread meanwhile: reseed, draw, build and run another model.
    other = torch.nn.Linear(8, 8)
    while run.training:
        torch.manual_seed(0)
        other(torch.randn(4, 8)).sum().backward()
    run.wait()
    assert_same_state(run.load(), blocking.load())


def test_checkpoint_and_stop_while_training_in_background(store, micro):
    started = threading.Event()

    def on_step(event):
        if event.kind == "step" and event.step >= 3:
            started.set()

    run = mmnb.train("bg", store=store, epochs=50, background=True, listeners=[on_step], **micro)
    assert started.wait(60)
    info = run.checkpoint(tags=["mine"])
    assert info.step >= 3 and "requested" in info.reasons and info.tags == ["mine"]
    run.stop()
    assert not run.training
    latest = run.latest()
    assert "stop" in latest.reasons and latest.step < run.trainer.plan.end
    assert run.status() == "stopped"
    idle = run.checkpoint(tags=["again"])  # idle: saved at once (same step, reasons merged)
    assert idle.step == latest.step and "again" in idle.tags


def test_checkpoint_needs_a_live_run(store, micro):
    mmnb.train("r", store=store, max_steps=2, **micro)
    with pytest.raises(mmnb.StoreError, match="not loaded in this process"):
        store.run("r").checkpoint()


def test_background_errors_surface_on_wait(store, micro):
    def explode(event):
        if event.kind == "step" and event.step == 2:
            raise RuntimeError("boom")

    run = mmnb.train("r", store=store, max_steps=5, background=True, listeners=[explode], **micro)
    with pytest.raises(RuntimeError, match="boom"):
        run.wait()
    assert run.status() != "training"  # the writer lock was released
    mmnb.resume("r", store=store)  # and the run resumes
    assert run.latest().step == 5


def test_tied_weights_are_stored_once(store, micro):
    run = mmnb.train("r", store=store, max_steps=1, **micro)
    with h5py.File(run.path / run.latest().file, "r") as f:
        model = f["model"]
        assert model["lm_head.weight"].id == model["model.embed_tokens.weight"].id
    state = run.load()
    assert torch.equal(
        state["model"]["lm_head.weight"], state["model"]["model.embed_tokens.weight"]
    )


def test_failed_branch_leaves_the_store_unchanged(store, micro, tmp_path):
    mmnb.train("r", store=store, max_steps=2, **micro)
    before = sorted(p.relative_to(store.path) for p in store.path.rglob("*"))
    with pytest.raises(DataError, match="not found"):
        mmnb.branch("r", 2, "b", store=store, data=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="lr must be positive"):
        mmnb.branch("r", 2, "b", store=store, lr=-1.0)
    with pytest.raises(mmnb.StoreError, match="no checkpoint at step 7"):
        mmnb.branch("r", 7, "b", store=store)
    assert sorted(p.relative_to(store.path) for p in store.path.rglob("*")) == before


def test_generate_from_a_stored_checkpoint(store, micro):
    run = mmnb.train("r", store=store, max_steps=20, **micro)
    model, tokenizer = mmnb.load_model(run)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    a = mmnb.generate(model, tokenizer, "Once", max_new_tokens=8, temperature=1.0, seed=3)
    b = mmnb.generate(model, tokenizer, "Once", max_new_tokens=8, temperature=1.0, seed=3)
    assert a == b and isinstance(a, str)


def test_plain_python_shows_a_progress_bar_on_a_terminal(tmp_path, micro):
    """`mmnb.train(...)` with stderr on a terminal draws tqdm's bar; progress=False is quiet."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    store = str(tmp_path / "s")
    code = (
        "import sys, mmnb\n"
        f"mmnb.train('a', store={store!r}, max_steps=5, **{micro!r})\n"
        "sys.stderr.write('MARK\\n')\n"
        f"mmnb.train('b', store={store!r}, max_steps=5, progress=False, **{micro!r})\n"
    )
    leader, follower = pty.openpty()
    # a terminal of 24 x 100 (a fresh pty has no size, and tqdm fits its bar to it)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    subprocess.run(
        [sys.executable, "-c", code],
        stderr=follower,
        stdout=subprocess.DEVNULL,
        timeout=120,
        check=True,
    )
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other side is closed and drained
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    shown, quiet = out.split(b"MARK")
    assert b"5/5" in shown and b"loss=" in shown
    assert quiet.strip() == b""
