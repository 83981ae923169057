"""The history browser's side of jobs: the Queue tab with pipeline stages, recovery markers."""

from __future__ import annotations

import mmnb
from mmnb.jobs import commands, recovery
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
