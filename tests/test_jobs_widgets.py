"""The history browser's side of jobs: the Queue tab with pipeline stages, recovery markers."""

from __future__ import annotations

import time

import mmnb
from mmnb.jobs import commands, recovery
from mmnb.jobs.attach import Attachment
from mmnb.jobs.queue import Queue


def test_queue_tab_shows_pipelines_and_the_loss_plot_marks_rollbacks(store, micro, monkeypatch):
    monkeypatch.setenv(recovery.FAULT_ENV, "7")
    mmnb.train("a", store=store, max_steps=12, save_every=4, on_anomaly="rollback", **micro)
    monkeypatch.delenv(recovery.FAULT_ENV)
    q = Queue(store)
    first = q.add(commands.parse("train", ["p", "--max-steps", "5"], store),
                  pipeline="tiny", stage="pretrain", stage_key="k1")  # fmt: skip
    q.add(commands.parse("branch", ["p", "--name", "s"], store, taken={"p"}),
          after=[first.id], pipeline="tiny", stage="sft", stage_key="k2")  # fmt: skip
    browser = mmnb.browse(store)
    text = browser.queue.text()
    assert "pipeline tiny: pretrain [queued] (p) → sft [queued] (s)" in text
    assert "after 1" in text and browser.queue.job.options == (
        ("1 p (queued)", 1), ("2 s (queued)", 2),
    )  # fmt: skip
    browser.queue.job.value = 1
    browser.queue.cancel()  # cancels what waits for it too
    assert [j.state for j in q.jobs()] == ["cancelled", "cancelled"]
    assert "cancelled" in browser.queue.table.value
    browser.select("a")
    x, _ = browser.plot._artists["recoveries"][1].get_data()
    assert list(x) == [4]  # rolled back from step 7 to the checkpoint of step 4


def test_attaching_a_run_without_a_stream_says_how_it_stands(store, micro):
    run = mmnb.train("a", store=store, max_steps=3, **micro)
    (run.path / "events.jsonl").unlink()  # a run trained before streams existed
    seen = []
    attachment = Attachment(run, seen.append)
    attachment.replay()
    assert [(e.kind, e.step, e.info) for e in seen] == [("stop", 3, {"reason": "done"})]
    assert not attachment.live


def test_the_queue_tab_attaches_a_running_job_and_stops_it(store, micro):
    run = mmnb.train("live", store=store, max_steps=100_000, background=True, **micro)
    try:
        q = Queue(store)
        job = q.add(commands.parse("resume", ["live"], store))
        q.start_attempt(job.id, ["resume", "live"], {"pid": 0, "pgid": 0, "ticks": 0, "boot": ""})
        tab = mmnb.browse(store).queue
        tab.refresh()
        tab.job.value = job.id
        dashboard = tab.attach()
        deadline = time.monotonic() + 60
        while not (dashboard.state == "training" and dashboard.step > 2):
            assert time.monotonic() < deadline, "no live steps"
            time.sleep(0.05)
        assert not dashboard.stop_button.disabled
        dashboard.stop_button.click()  # through the run's control channel
        run.wait(60)
        while dashboard.state != "stop":
            assert time.monotonic() < deadline, "the dashboard did not see the stop"
            time.sleep(0.05)
        assert "stop" in run.latest().reasons
        tab.close()
    finally:
        if run.training:
            run.stop()
