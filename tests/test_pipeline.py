"""Staged pipelines: pretrain → SFT; a crash continues where it stopped; an edit re-runs only
the changed stage."""

from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import assert_same_state
from mmnb import api
from mmnb.events import progress
from mmnb.jobs import pipeline
from mmnb.jobs.queue import ENDED, Queue
from mmnb.jobs.worker import Worker
from mmnb.store import Store

TIMEOUT = 240

PIPELINE = """
name = "tiny"
[defaults]
preset = "tiny"
hidden_size = 32
layers = 1
heads = 2
kv_heads = 1
intermediate_size = 64
vocab_size = 300
max_seq_len = 32
batch_size = 4
log_every = 1
no_sample = true

[[stage]]
name = "pretrain"
data = "{data}"
max_steps = 30
save_every = 10

[[stage]]
name = "sft"
data = "chat"
max_steps = 150
save_every = 4
lr = {lr}
"""


def _drive(worker: Worker, until, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not until():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        worker.step()
        time.sleep(0.05)


def test_pretrain_then_sft_continue_after_a_crash_and_rerun_only_what_changed(
    tmp_path, small_corpus
):
    store = Store(tmp_path / "store")
    path = tmp_path / "tiny.toml"
    path.write_text(PIPELINE.format(data=small_corpus, lr="1e-3"))
    spec = pipeline.load(path)
    pre, sft = spec.stages
    assert (pre.parent, sft.parent) == (None, "pretrain")
    assert pre.run.startswith("tiny-pretrain-") and sft.run.startswith("tiny-sft-")
    queue = Queue(store)
    worker = Worker(store, poll=0.05)
    worker.acquire()
    try:
        actions = pipeline.run(spec, store)
        assert [a["action"] for a in actions] == ["queued as job 1", "queued as job 2"]
        assert queue.get(2).after == [1] and queue.get(2).command.verb == "branch"

        def sft_training() -> bool:
            p = progress(store.path / sft.run) if (store.path / sft.run).is_dir() else None
            return p is not None and p.state == "training" and p.step >= 38

        _drive(worker, sft_training, "the SFT stage to train")
        os.kill(queue.get(2).process["pid"], signal.SIGKILL)  # a crash; no restarts asked for
        _drive(worker, lambda: queue.get(2).state in ENDED, "the crash to be recorded")
        assert queue.get(2).state == "failed" and queue.get(1).state == "done"
        assert pipeline.status(spec, store)[1]["state"].startswith("stopped")
        pretrain_files = sorted((store.path / pre.run / "ckpt").iterdir())

        again = pipeline.run(pipeline.load(path), store)  # continues SFT, reuses pretrain
        assert [a["action"] for a in again] == ["reused", "queued as job 3 (continues its run)"]
        assert (queue.get(3).command.verb, queue.get(3).command.argv[0]) == ("resume", sft.run)
        _drive(worker, lambda: queue.get(3).state in ENDED, "the SFT stage to finish")
        assert queue.get(3).state == "done"
        assert [s["state"] for s in pipeline.status(spec, store)] == ["done", "done"]

        path.write_text(PIPELINE.format(data=small_corpus, lr="5e-4"))  # edit SFT's lr
        edited = pipeline.load(path)
        assert edited.stages[0].run == pre.run and edited.stages[1].run != sft.run
        third = pipeline.run(edited, store)
        assert [a["action"] for a in third] == ["reused", "queued as job 4"]
        _drive(worker, lambda: queue.get(4).state in ENDED, "the edited SFT stage")
        assert queue.get(4).state == "done"
        assert pipeline.run(edited, store)[1]["action"] == "reused"  # nothing left to do
    finally:
        for active in worker.active.values():
            active.process.kill()
        worker.release()
    assert sorted((store.path / pre.run / "ckpt").iterdir()) == pretrain_files
    assert len(queue.jobs()) == 4  # pretrain ran once
    # The continued SFT run equals one never interrupted.
    ref = Store(tmp_path / "ref")
    options = dict(
        hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64, vocab_size=300,
        max_seq_len=32, batch_size=4, log_every=1,
    )  # fmt: skip
    api.train("p", store=ref, data=str(small_corpus), max_steps=30, save_every=10, **options)
    api.branch("p", name="s", store=ref, data="chat", max_steps=150, lr=1e-3, save_every=4)
    assert_same_state(store.run(sft.run).load(), ref.run("s").load())


def test_pipeline_files_are_checked(tmp_path, store):
    bad = tmp_path / "bad.toml"
    for text, message in [
        ("[[stage]]\nname = 'a'\nepochs = 'x'\n", "stage 'a': .*invalid int value"),
        ("[[stage]]\nname = 'a'\n[[stage]]\nname = 'b'\nfrom = 'c'\n", "not an earlier stage"),
        ("[[stage]]\nname = 'a'\n[[stage]]\nname = 'a'\n", "invalid or repeated"),
        ("stage = 3\n", "give at least one"),
        ("[[stage]]\nname = 'a'\nbogus = 1\n", "unrecognized arguments: --bogus"),
        ("[[stage\n", "bad.toml"),
    ]:
        bad.write_text(text)
        with pytest.raises(pipeline.PipelineError, match=message):
            pipeline.check(pipeline.load(bad), store)
    with pytest.raises(pipeline.PipelineError, match="does not exist"):
        pipeline.load(tmp_path / "missing.toml")
