"""The control channel: another process stops or checkpoints a training run through files."""

from __future__ import annotations

import json

import pytest

import mmnb
from mmnb.events import EventFollower
from mmnb.jobs import control


def _answer(follower: EventFollower, request_id: str) -> dict:
    for event in follower.follow(timeout=60):
        if event.kind == "control" and event.info.get("id") == request_id:
            return event.info
    raise AssertionError(f"no answer to {request_id}")


def test_checkpoint_and_stop_through_command_files(store, micro):
    run = mmnb.train("a", store=store, max_steps=100_000, background=True, **micro)
    try:
        follower = EventFollower(run.path, from_start=False)
        asked = control.send(run.path, "checkpoint", tags=["from-afar"])
        answer = _answer(follower, asked)
        assert answer["ok"] and answer["verb"] == "checkpoint"
        saved = answer["saved"]  # the StepInfo, as JSON
        info = run.step_info(saved["step"])
        assert info.tags == ["from-afar"] and "requested" in info.reasons
        # Garbage in the folder is answered and removed, never acted on.
        (run.path / control.FOLDER / "junk.json").write_text(json.dumps({"verb": "rm -rf"}))
        assert _answer(follower, "junk") == {"id": "junk", "verb": "?", "ok": False,
                                             "error": "not a control request"}  # fmt: skip
        stop = control.send(run.path, "stop")
        assert _answer(follower, stop)["ok"]
        run.wait(60)
    finally:
        if run.training:
            run.stop()
    latest = run.latest()
    assert "stop" in latest.reasons and latest.step < 100_000
    assert list((run.path / control.FOLDER).iterdir()) == []


def test_a_request_older_than_the_session_expires(store, micro):
    run = mmnb.train("a", store=store, max_steps=3, **micro)
    stale = control.send(run.path, "stop")  # nobody trains the run now
    follower = EventFollower(run.path, from_start=False)
    mmnb.resume("a", store=store, background=True).wait(60)
    answers = [e.info for e in follower.poll() if e.kind == "control"]
    assert answers == [{"id": stale, "verb": "stop", "ok": False, "error": "expired"}]


def test_a_control_folder_that_leads_outside_the_store_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "precious.json"
    victim.write_text(json.dumps({"verb": "stop", "tags": [], "time": 1e12}))
    run = tmp_path / "run"
    run.mkdir()
    (run / control.FOLDER).symlink_to(outside)
    with pytest.raises(ValueError, match="is not a folder of the run; refused"):
        control.send(run, "stop")

    class Trainer:
        step = 0
        stopped = False

        def stop(self):
            self.stopped = True

    trainer = Trainer()
    control.Inbox(run, trainer).poll()  # reads nothing through the link, removes nothing
    assert victim.exists() and not trainer.stopped
    assert sorted(p.name for p in outside.iterdir()) == ["precious.json"]
