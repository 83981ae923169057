"""The job queue: order, dependencies, cancel, reorder, one worker per store, untrusted files."""

from __future__ import annotations

import json
import sqlite3

import pytest

from conftest import mmnb as mmnb_cli
from mmnb.jobs import commands
from mmnb.jobs.queue import Queue, QueueError
from mmnb.jobs.watch import format_jobs, job_rows
from mmnb.jobs.worker import Worker, WorkerBusy, running_worker
from mmnb.store import StoreError


def _add(queue, store, verb, *argv, **kw):
    return queue.add(commands.parse(verb, list(argv), store, taken=queue.taken_names()), **kw)


def test_order_dependencies_cancel_and_move(store):
    q = Queue(store)
    a = _add(q, store, "train", "a", "--max-steps", "5")
    b = _add(q, store, "train", "--max-steps", "5")  # named now: run-001
    c = _add(q, store, "branch", "a", "--lr", "1e-3", after=[a.id])
    d = _add(q, store, "resume", "run-001", "--save-every", "2", after=[b.id])
    assert b.run == "run-001" and c.run == "a-b-001" and d.run == "run-001"
    assert c.command.argv[:3] == ["a", "--name", "a-b-001"]  # the branch's name is fixed now
    assert c.after == [a.id]
    assert [j.id for j in q.runnable()] == [a.id, b.id]  # c and d wait
    with pytest.raises(ValueError, match="run 'a' is already the run of a queued job"):
        _add(q, store, "train", "a")
    q.move(b.id, first=True)
    q.move(d.id, before=a.id)
    assert [j.id for j in q.jobs()] == [b.id, d.id, a.id, c.id]
    q.cancel(a.id)  # what waits for it can never run: cancelled too, saying why
    assert (q.get(a.id).state, q.get(c.id).state) == ("cancelled", "cancelled")
    assert q.get(c.id).note == f"job {a.id} cancelled"
    assert [j.id for j in q.runnable()] == [b.id]
    with pytest.raises(QueueError, match="is cancelled already"):
        q.cancel(a.id)
    with pytest.raises(QueueError, match="only queued jobs can move"):
        q.move(a.id, first=True)
    with pytest.raises(QueueError, match="--after 99: no such job"):
        _add(q, store, "train", "x", after=[99])
    with pytest.raises(QueueError, match="that job is cancelled"):
        _add(q, store, "train", "x", after=[a.id])
    assert q.clear() == 2 and [j.id for j in q.jobs()] == [b.id, d.id]
    text = format_jobs(job_rows(q))
    assert text.splitlines()[0].split() == [
        "id", "state", "run", "progress", "loss", "tok/s", "ETA", "tries", "command",
    ]  # fmt: skip
    assert f"after {b.id}" in text


def test_commands_are_checked_when_queued(store):
    q = Queue(store)
    for verb, argv, message in [
        ("train", ["--bogus"], "unrecognized arguments: --bogus"),
        ("train", ["../evil"], "invalid run name"),
        ("branch", ["a", "--preset", "tiny"], "unrecognized arguments: --preset"),
        ("generate", [], "a job runs one of train, resume, branch"),
        ("resume", [], "give the run to resume"),
    ]:
        with pytest.raises((ValueError, StoreError), match=message):
            _add(q, store, verb, *argv)
    assert q.jobs() == []


def test_one_worker_per_store(store, tmp_path):
    first = Worker(store)
    first.acquire()
    try:
        assert running_worker(store).pid > 0
        with pytest.raises(WorkerBusy, match="a worker already runs on store"):
            Worker(store).acquire()
        proc = mmnb_cli("worker", "--store", str(store.path), check=False)  # another process
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [
            f"mmnb: error: a worker already runs on store {store.path.resolve()} "
            f"(pid {running_worker(store).pid}); one worker per store"
        ]
    finally:
        first.release()
    assert running_worker(store) is None


def test_an_untrusted_queue_file_is_refused(store, tmp_path):
    q = Queue(store)
    _add(q, store, "train", "a")
    q.close()
    db = sqlite3.connect(store.path / "queue.sqlite")
    db.execute("CREATE TRIGGER evil AFTER UPDATE ON jobs BEGIN SELECT 1; END")
    db.commit()
    db.close()
    with pytest.raises(QueueError, match="holds objects that are not mmnb's .*trigger evil"):
        Queue(store).jobs()
    (store.path / "queue.sqlite").unlink()
    db = sqlite3.connect(store.path / "queue.sqlite")
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(QueueError, match="queue schema 99, newer than"):
        Queue(store).jobs()
    (store.path / "queue.sqlite").unlink()
    (store.path / "queue.sqlite").symlink_to(tmp_path / "elsewhere.sqlite")
    with pytest.raises(QueueError, match="not a regular file"):
        Queue(store).jobs()


def test_a_command_from_the_file_is_checked_again_before_it_runs(store):
    q = Queue(store)
    job = _add(q, store, "train", "a")
    bad = dict(job.command.to_dict(), argv=["a", "--data", "x", "--exec", "rm -rf /"])
    with sqlite3.connect(store.path / "queue.sqlite") as db:
        db.execute("UPDATE jobs SET command = ? WHERE id = ?", (json.dumps(bad), job.id))
    worker = Worker(store)
    worker.step()  # refuses it without starting anything
    ended = Queue(store).get(job.id)
    assert ended.state == "failed" and "unrecognized arguments: --exec" in ended.note
    assert worker.active == {}
