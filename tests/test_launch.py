"""The launcher: detached processes and torchrun groups we can find, verify, signal and kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_args
from mmnb import launch
from mmnb.events import progress
from mmnb.launch import EXIT_LOST, Job, ProcessRecord
from mmnb.store import Store

SLEEPER = """
import os, sys, time
print("ready", os.getpid(), flush=True)
print("to stderr\\rbar 1\\rbar 2", file=sys.stderr, flush=True)
time.sleep(60)
"""


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = launch._state(pid)
        if state is None or state == "Z":
            return True
        time.sleep(0.02)
    return False


def _wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_detached_process_is_found_verified_and_killed_from_another_handle(tmp_path):
    job = launch.spawn([sys.executable, "-c", SLEEPER], logs=tmp_path / "job")
    try:
        _wait_for(lambda: job.tail(1, "stdout"))
        # Its own session and process group: a kernel's interrupt or shutdown cannot reach it.
        assert os.getsid(job.pid) == job.pid and os.getpgid(job.pid) == job.pid != os.getpgid(0)
        assert job.tail(5, "stdout") == [f"ready {job.pid}"]
        assert job.tail(2) == ["bar 1", "bar 2"]  # a progress bar's \r frames are lines
        found = Job.load(tmp_path / "job" / "process.json")  # as another process would
        assert found.pid == job.pid and found.alive() and found.poll() is None
        # A reused pid is not ours: the same pid with another start time is refused.
        impostor = Job.of({**found.record.to_dict(), "ticks": found.record.ticks + 1})
        assert not impostor.alive() and not impostor.signal(signal.SIGKILL)
        assert job.alive()
        # SIGSTOP (a stalled job) still counts as alive; SIGKILL of the group ends it.
        assert found.signal(signal.SIGSTOP)
        assert found.alive()
        assert found.kill() == EXIT_LOST  # no parent of ours saw how it ended
        assert job.wait(10) == -signal.SIGKILL  # the parent's handle knows exactly
    finally:
        job.kill()


def test_a_detached_job_outlives_the_process_that_started_it(tmp_path):
    # A parent (think: a kernel) starts a job and is SIGKILLed; the job runs on, its record
    # finds it, and killing its group kills what the job itself started.
    parent = f"""
import sys
from mmnb import launch
job = launch.spawn([sys.executable, "-c", {SLEEPER!r}], logs={str(tmp_path / "job")!r})
print(job.pid, flush=True)
import time; time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
        proc.kill()
        proc.wait(10)
        job = Job.load(tmp_path / "job" / "process.json")
        assert job.pid == pid and job.alive()
        assert job.kill() == EXIT_LOST and _gone(pid)
    finally:
        proc.kill()
        os.killpg(pid, signal.SIGKILL) if launch.start_ticks(pid) else None


def test_exit_status_is_recorded_for_handles_that_are_not_the_parent(tmp_path):
    job = launch.start(["runs", "--store", str(tmp_path / "store")], logs=tmp_path / "a")
    assert job.wait(60) == 0
    assert "no runs in" in job.tail(1, "stdout")[0]
    assert Job.load(tmp_path / "a" / "process.json").poll() == 0  # from exit.json
    bad = launch.start(["resume", "ghost", "--store", str(tmp_path / "s")], logs=tmp_path / "b")
    assert bad.wait(60) == 2
    assert Job.load(tmp_path / "b" / "process.json").poll() == 2
    assert "no run named 'ghost'" in bad.tail(1)[0]
    record = json.loads((tmp_path / "b" / "exit.json").read_text())
    assert record["code"] == 2 and record["pid"] == bad.pid


def test_a_torchrun_group_is_one_job_and_dies_as_one(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(
        "import os, time\n"
        "from mmnb import launch\n"
        "launch.register_rank()  # what python -m mmnb does as it starts\n"
        "open(os.path.join(os.path.dirname(__file__), 'rank' + os.environ['RANK']), 'w')"
        ".write(str(os.getpid()))\n"
        "time.sleep(60)\n"
    )
    argv = launch.mmnb_argv(["train"], nproc=2, max_restarts=1)
    assert argv[1:] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--max-restarts", "1", "-m", "mmnb", "train",
    ]  # fmt: skip
    group = argv[: argv.index("-m", 2)] + [str(script)]
    job = launch.spawn(group, logs=tmp_path / "g")
    try:
        _wait_for(lambda: (tmp_path / "rank0").exists() and (tmp_path / "rank1").exists(), 60)
        ranks = [int((tmp_path / f"rank{r}").read_text()) for r in (0, 1)]
        # torchrun starts each rank in a session of its own: they are the job's members.
        assert sorted(m.pid for m in job.members()) == sorted(ranks)
        # Even when the agent dies first (the OOM killer, a SIGKILL of its group), the ranks
        # it leaves behind are found from their records and killed with the job.
        os.killpg(job.pgid, signal.SIGKILL)
        assert job.wait(10) == -signal.SIGKILL
        assert all(not _gone(pid, 0.2) for pid in ranks)
        assert sorted(m.pid for m in Job.load(tmp_path / "g" / "process.json").members()) == sorted(
            ranks
        )
        job.kill()
        assert all(_gone(pid) for pid in ranks)
    finally:
        job.kill()


def test_records_from_an_untrusted_store_are_checked():
    with pytest.raises(ValueError, match="not a process record"):
        ProcessRecord.from_dict({"pid": "x"})
    with pytest.raises(ValueError, match="not a process record"):
        ProcessRecord.from_dict(["pid", 1])
    assert not Job.of({"pid": -1, "pgid": -1, "ticks": 1, "boot": ""}).alive()
    record = ProcessRecord.of(os.getpid())
    assert record.matches() and ProcessRecord.from_dict(record.to_dict()) == record
    rebooted = ProcessRecord.from_dict({**record.to_dict(), "boot": "another-boot"})
    assert not rebooted.matches()
    # A process of another machine sharing the store is never checked or signalled here.
    elsewhere = ProcessRecord.from_dict({**record.to_dict(), "host": "another-host"})
    assert not elsewhere.local and not elsewhere.matches() and not Job.of(elsewhere).alive()


def test_tail_reads_a_bounded_window(tmp_path):
    log = tmp_path / "big.log"
    log.write_text("".join(f"line {i}\n" for i in range(100_000)))
    assert launch.tail_lines(log, 3) == ["line 99997", "line 99998", "line 99999"]
    assert launch.tail_lines(Path(tmp_path / "missing"), 3) == []


def test_interrupt_checkpoints_the_last_completed_step(tmp_path, micro):
    store = tmp_path / "store"
    args = ["train", "a", "--max-steps", "100000", "--no-sample", "--store", str(store)]
    job = launch.start([*args, *cli_args(micro)], logs=tmp_path / "a")
    try:
        _wait_for(lambda: (p := progress(store / "a")) is not None and p.step >= 3, 120)
        assert job.interrupt()  # SIGINT: checkpoint at the boundary, exit 130
        assert job.wait(60) == 130
    finally:
        job.kill()
    latest = Store(store).run("a").latest()
    assert "interrupt" in latest.reasons and latest.step >= 3  # (an epoch end may coincide)
    assert "interrupted; the last completed step is checkpointed" in job.tail(1)[0]
