"""The run's event stream: written by a listener, followed by other processes, never trusted."""

from __future__ import annotations

import os
import time

import pytest

import mmnb
from mmnb import events
from mmnb.events import Event, EventFollower, EventWriter, read_events
from mmnb.store import StepInfo


def _saved(step: int) -> StepInfo:
    return StepInfo(step=step, file=f"ckpt/{step:08d}.h5", run="a", reasons=["every"], loss=2.5)


def test_a_writer_and_a_follower_carry_trainer_events(tmp_path):
    step = [0]
    follower = EventFollower(tmp_path)  # before the stream exists: it appears later
    assert follower.poll() == []
    writer = EventWriter(
        tmp_path, progress=lambda: (step[0], 10), meta={"run": "a"}, heartbeat=0.05
    )
    writer(Event("start", 0, {"total": 10, "steps_per_epoch": 5, "epoch": 0, "epoch_step": 0}))
    for step[0] in range(1, 4):
        writer(Event("step", step[0], {"loss": 3.0 / step[0], "lr": 1e-3, "tokens": 128 * step[0]}))
    writer(Event("checkpoint", 3, {"reasons": ["every"], "tags": [], "saved": _saved(3)}))
    time.sleep(0.3)  # the thread flushes and beats meanwhile
    writer(Event("stop", 3, {"reason": "requested"}))
    writer.close()
    got = follower.poll()
    kinds = [e.kind for e in got]
    assert kinds[0] == "open" and kinds[-2:] == ["stop", "close"] and "heartbeat" in kinds
    opened = got[0].info
    assert opened["run"] == "a" and opened["process"]["pid"] == os.getpid()
    trainer_events = [e for e in got if e.kind not in events.STREAM_KINDS]
    assert [(e.kind, e.step) for e in trainer_events] == [
        ("start", 0), ("step", 1), ("step", 2), ("step", 3), ("checkpoint", 3), ("stop", 3),
    ]  # fmt: skip
    assert trainer_events[2].info == {"loss": 1.5, "lr": 1e-3, "tokens": 256}
    assert trainer_events[4].info["saved"] == _saved(3)  # a StepInfo again, as in process
    assert all(isinstance(e.time, float) for e in got)
    assert got[-1].info == {"error": None}
    beat = next(e for e in got if e.kind == "heartbeat")
    assert beat.info["total"] == 10 and beat.info["process"]["pid"] == os.getpid()
    assert follower.poll() == []


def test_malformed_lines_are_skipped_and_a_torn_line_is_ended(tmp_path):
    path = tmp_path / events.STREAM
    good = events.encode(Event("step", 1, {"loss": 1.0, "lr": 0.1, "tokens": 5}), 1.0)
    bad = [
        b"not json",
        b"[1, 2]",
        b'{"kind": "step", "step": 1, "t": 1, "info": {"loss": "high", "lr": 0.1, "tokens": 5}}',
        b'{"kind": "step", "step": -1, "t": 1, "info": {}}',
        b'{"kind": "../../etc", "step": 1, "t": 1, "info": {}}',
        b'{"kind": "stop", "step": 1, "t": 1, "info": {"reason": 7}}',
        b'{"kind": "checkpoint", "step": 1, "t": 1, "info": {"saved": {"step": "x"}}}',
        b'{"kind": "step", "step": true, "t": 1, "info": {}}',
        b"\xff\xfe",
        b"[" * 100_000,
        b'{"kind": "notice", "step": 1, "t": 1, "info": {"text": "' + b"x" * 70_000 + b'"}}',
    ]
    path.write_bytes(b"\n".join([good, *bad, good]) + b'{"kind": "st')  # torn: killed writing
    follower = EventFollower(tmp_path)
    got = follower.poll()
    assert [e.kind for e in got] == ["step", "checkpoint", "step"]
    assert got[1].info["saved"] is None  # a checkpoint event whose `saved` is not a StepInfo
    assert follower.skipped == len(bad) - 1
    writer = EventWriter(tmp_path)  # the next session ends the torn line first
    writer.close()
    later = [e for e in follower.poll() if e.kind != "heartbeat"]
    assert [e.kind for e in later] == ["open", "close"]
    assert follower.skipped == len(bad)  # the torn fragment became one skipped line
    kinds = [e.kind for e in read_events(tmp_path) if e.kind != "heartbeat"]
    assert kinds == ["step", "checkpoint", "step", "open", "close"]


def test_rotation_bounds_the_size_and_a_follower_crosses_it(tmp_path):
    writer = EventWriter(tmp_path, max_bytes=2000, flush_interval=0.01)
    follower = EventFollower(tmp_path)
    seen = []
    for i in range(1, 301):
        writer(Event("step", i, {"loss": 1.0, "lr": 0.1, "tokens": i}))
        if i % 7 == 0:
            writer.flush()
            seen += follower.poll()
    writer.close()
    seen += follower.poll()
    steps = [e.step for e in seen if e.kind == "step"]
    assert steps == list(range(1, 301))  # nothing lost or repeated across many rotations
    sizes = [p.stat().st_size for p in tmp_path.iterdir()]
    assert sorted(p.name for p in tmp_path.iterdir()) == [events.ROTATED, events.STREAM]
    assert max(sizes) <= 2000
    # A reader arriving late gets what the two files still hold, oldest first.
    late = [e.step for e in read_events(tmp_path) if e.kind == "step"]
    assert late == sorted(late) and late[-1] == 300 and len(late) < 300


def test_the_stream_never_leads_outside_the_store(tmp_path):
    outside = tmp_path / "secret.jsonl"
    outside.write_bytes(events.encode(Event("notice", 0, {"text": "secret"}), 1.0))
    run = tmp_path / "run"
    run.mkdir()
    (run / events.STREAM).symlink_to(outside)
    assert read_events(run) == [] and events.progress(run) is None
    (run / events.STREAM).unlink()
    os.mkfifo(run / events.STREAM)  # a FIFO would block a naive reader forever
    assert read_events(run) == [] and events.progress(run) is None
    (run / events.STREAM).unlink()
    (run / events.STREAM).symlink_to(outside)
    before = outside.read_bytes()
    writer = EventWriter(run)  # a writer does not follow it either, nor stop training for it
    writer(Event("step", 1, {"loss": 1.0, "lr": 0.1, "tokens": 5}))
    writer.close()
    assert outside.read_bytes() == before and writer.errors > 0


def test_progress_reads_only_the_tail(tmp_path):
    t0 = 1000.0
    lines = [events.encode(Event("start", 0, {"total": 100}), t0)]
    lines += [
        events.encode(
            Event("step", s, {"loss": 5.0 - s / 100, "lr": 0.1, "tokens": 64 * s}), t0 + s
        )
        for s in range(1, 5001)
    ]
    lines.insert(4000, events.encode(Event("heartbeat", 3999, {"total": 5000}), t0 + 3999))
    (tmp_path / events.STREAM).write_bytes(b"".join(lines))
    p = events.progress(tmp_path)
    assert (p.step, p.total, p.state, p.loss) == (5000, 5000, "training", 5.0 - 50)
    assert p.steps_per_s == pytest.approx(1.0) and p.tokens_per_s == pytest.approx(64.0)
    assert p.eta == 0 and p.updated == t0 + 5000
    with open(tmp_path / events.STREAM, "ab") as f:
        f.write(events.encode(Event("stop", 5000, {"reason": "done"}), t0 + 5001))
    assert events.progress(tmp_path).state == "done"
    # A writer on another machine: alive while its stream speaks, presumed gone when silent.
    remote = {"pid": 1, "pgid": 1, "ticks": 1, "boot": "b", "host": "another-host"}
    now = time.time()
    with open(tmp_path / events.STREAM, "ab") as f:
        f.write(events.encode(Event("open", 0, {"process": remote}), now))
    assert events.progress(tmp_path).alive() is True
    with open(tmp_path / events.STREAM, "ab") as f:
        f.write(events.encode(Event("heartbeat", 0, {"process": remote}), now + 1))
    p = events.progress(tmp_path)
    p.updated -= events.SILENCE + 5
    assert p.alive() is False


def test_every_training_session_writes_its_stream(store, micro):
    run = mmnb.train("a", store=store, max_steps=6, save_every=3, **micro)
    got = read_events(run.path)
    kinds = [e.kind for e in got]
    assert kinds[0] == "open" and kinds[-1] == "close" and kinds[-2] == "stop"
    assert [e.step for e in got if e.kind == "step"] == [1, 2, 3, 4, 5, 6]
    saved = [e.info["saved"].step for e in got if e.kind == "checkpoint"]
    assert saved == [s.step for s in run.steps()] and 3 in saved  # incl. the decay start
    assert got[0].info["run"] == "a" and got[-1].info["error"] is None
    mmnb.resume("a", store=store)  # a finished run: a session that starts and stops at once
    again = [e.kind for e in read_events(run.path)[len(got) :] if e.kind != "heartbeat"]
    assert again == ["open", "notice", "start", "stop", "close"]  # "already finished"
    p = events.progress(run.path)
    assert (p.step, p.total, p.state, p.loss) == (6, 6, "done", run.latest().loss)


def test_a_late_event_is_written_and_leaves_no_file_open(store, micro):
    run = mmnb.train("a", store=store, max_steps=3, **micro)
    run.checkpoint(tags=["late"])  # idle: after its session's stream was closed
    late = [e for e in read_events(run.path) if e.kind == "checkpoint"][-1]
    assert late.info["saved"].tags == ["late"]
    assert str((run.path / events.STREAM).resolve()) not in _open_files()


def _open_files() -> list[str]:
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return paths
