"""The central promise: interrupted + resumed in a fresh process == uninterrupted, bitwise."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import MICRO, assert_same_state, cli_args, mmnb
from mmnb.store import Store


def steps_per_epoch(store: Store, name: str) -> int:
    first = next(s for s in store.run(name).steps() if "epoch" in s.reasons)
    return first.step


@pytest.fixture(scope="module")
def straight(tmp_path_factory, small_corpus):
    """One uninterrupted 2-epoch run that several split runs are compared against."""
    store = Store(tmp_path_factory.mktemp("straight"))
    options = {**MICRO, "epochs": 2, "data": str(small_corpus)}
    mmnb("train", "base", "--store", str(store.path), "--no-sample", *cli_args(options))
    return store, options


@pytest.mark.parametrize("stops", [[13], ["epoch"], [3, 9, 21, "epoch", "epoch+5"]])
def test_split_resume_equals_straight_run(tmp_path, straight, stops):
    ref_store, options = straight
    spe = steps_per_epoch(ref_store, "base")
    stops = [spe + int(s[6:] or 0) if isinstance(s, str) else s for s in stops]
    store = str(tmp_path / "store")
    mmnb(
        "train",
        "split",
        "--store",
        store,
        "--no-sample",
        "--stop-at",
        str(stops[0]),
        *cli_args(options),
    )
    for stop in stops[1:]:
        mmnb("resume", "split", "--store", store, "--no-sample", "--stop-at", str(stop))
    assert Store(store).run("split").latest().step == stops[-1]
    mmnb("resume", "split", "--store", store, "--no-sample")
    assert_same_state(Store(store).run("split").load(), ref_store.run("base").load())


@pytest.mark.parametrize(
    "extra",
    [{"accum": 3, "batch_size": 2}, {"dropout": 0.2}, {"dtype": "bf16"}],
    ids=["accum", "dropout", "bf16"],
)
def test_split_resume_variants(tmp_path, micro, extra):
    options = {**micro, "epochs": 1, **extra}
    store = str(tmp_path / "store")
    mmnb("train", "straight", "--store", store, "--no-sample", *cli_args(options))
    mmnb("train", "split", "--store", store, "--no-sample", "--stop-at", "7", *cli_args(options))
    mmnb("resume", "split", "--store", store, "--no-sample")
    s = Store(store)
    assert_same_state(s.run("split").load(), s.run("straight").load())


def test_saving_every_step_changes_nothing(tmp_path, micro):
    store = str(tmp_path / "store")
    options = cli_args({**micro, "max_steps": 12})
    mmnb("train", "plain", "--store", store, "--no-sample", *options)
    mmnb("train", "every", "--store", store, "--no-sample", "--save-every", "1", *options)
    s = Store(store)
    assert len(s.run("every").steps()) == 13  # step 0 and every step
    assert_same_state(s.run("every").load(), s.run("plain").load())


def test_epoch_per_process_equals_straight_plan(tmp_path, micro):
    store = str(tmp_path / "store")
    options = cli_args({**micro, "epochs": 3})
    mmnb("train", "straight", "--store", store, "--no-sample", *options)
    spe = steps_per_epoch(Store(store), "straight")
    mmnb("train", "split", "--store", store, "--no-sample", "--stop-at", str(spe), *options)
    mmnb("resume", "split", "--store", store, "--no-sample", "--stop-at", str(2 * spe))
    mmnb("resume", "split", "--store", store, "--no-sample")
    s = Store(store)
    assert_same_state(s.run("split").load(), s.run("straight").load())


def test_wsd_extension_equals_longer_plan(tmp_path, micro):
    """1 epoch, then +1 epoch three times (each a fresh process) == 4 epochs planned."""
    store = str(tmp_path / "store")
    options = {**micro, "schedule": "wsd", "warmup": 2}
    mmnb("train", "four", "--store", store, "--no-sample", *cli_args({**options, "epochs": 4}))
    mmnb("train", "one", "--store", store, "--no-sample", *cli_args({**options, "epochs": 1}))
    name = "one"
    for _ in range(3):
        out = mmnb("resume", name, "--store", store, "--no-sample", "--more-epochs", "1")
        name = out.stdout.split()[1].rstrip(":")  # "run <name>: step …"
    s = Store(store)
    assert name == "one-4ep"
    ext = s.run(name)
    parent_run, parent_step = ext.parent
    assert parent_run == "one-3ep"
    assert "decay_start" in s.run(parent_run).step_info(parent_step).reasons
    assert_same_state(ext.load(), s.run("four").load())
    # The decayed 1-epoch run is left as its own leaf, untouched.
    assert s.run("one").status() == "finished"


def test_cosine_extension_replans_and_says_so(tmp_path, micro):
    store = str(tmp_path / "store")
    mmnb(
        "train",
        "cos",
        "--store",
        store,
        "--no-sample",
        *cli_args({**micro, "schedule": "cosine", "max_steps": 10}),
    )
    out = mmnb("resume", "cos", "--store", store, "--no-sample", "--more-epochs", "1")
    assert "differs from a run planned" in out.stderr
    assert Store(store).run("cos").latest().step > 10


def _wait_for_step(store: Store, name: str, step: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            latest = store.run(name).latest()
            if latest is not None and latest.step >= step:
                return
        except Exception:  # the run file may not exist yet
            pass
        time.sleep(0.02)
    raise AssertionError(f"run {name} never reached step {step}")


def _popen(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mmnb", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def test_sigint_at_a_random_moment_then_resume(tmp_path, micro):
    store_path = str(tmp_path / "store")
    store = Store(store_path)
    options = cli_args({**micro, "epochs": 8})
    mmnb("train", "straight", "--store", store_path, "--no-sample", *options)
    proc = _popen(["train", "hit", "--store", store_path, "--no-sample", *options])
    _wait_for_step(store, "hit", 0, proc)
    time.sleep(random.uniform(0.05, 0.6))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    latest = store.run("hit").latest()
    assert "interrupt" in latest.reasons
    mmnb("resume", "hit", "--store", store_path, "--no-sample")
    assert_same_state(store.run("hit").load(), store.run("straight").load())


def test_sigkill_loop_never_loses_a_committed_checkpoint(tmp_path, micro):
    """20 SIGKILLs at random moments with a checkpoint every step; then finish exactly."""
    store_path = str(tmp_path / "store")
    store = Store(store_path)
    options = cli_args({**micro, "epochs": 12})
    mmnb("train", "straight", "--store", store_path, "--no-sample", *options)
    rng = random.Random(1234)
    committed: set[int] = set()
    for i in range(20):
        before = store.run("crash").latest().step if i else -1
        args = ["resume", "crash"] if i else ["train", "crash", *options]
        proc = _popen([*args, "--save-every", "1", "--store", store_path, "--no-sample"])
        _wait_for_step(store, "crash", before + 1, proc)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        proc.wait()
        run = store.run("crash")
        steps = {info.step for info in run.steps()}
        assert committed <= steps  # nothing committed before was lost
        for step in sorted(steps - committed):  # every new checkpoint loads and verifies
            run.verify(step)
        committed = steps
    assert store.run("crash").status() != "finished"
    mmnb("resume", "crash", "--store", store_path, "--no-sample", "--save-every", "0")
    assert_same_state(store.run("crash").load(), store.run("straight").load())


def test_resume_with_another_thread_count_says_so(tmp_path, micro):
    """Reductions split by thread count: a resume with a different count is not bitwise, and
    says so once, naming the count to set; with the same count it says nothing."""
    import torch

    from mmnb import api

    store = tmp_path / "s"
    api.train("t", store=store, max_steps=6, stop_at=2, save_every=2, **micro)
    threads = torch.get_num_threads()
    assert Store(store).run("t").load(2)["trainer"]["threads"] == threads

    def notices(**kw) -> list[str]:
        seen = []
        api.resume("t", store=store, listeners=[seen.append], **kw)
        return [e.info["text"] for e in seen if e.kind == "notice"]

    assert not [n for n in notices(stop_at=4) if "threads" in n]
    torch.set_num_threads(threads + 1)  # (the autouse fixture restores the count)
    said = [n for n in notices() if "threads" in n]
    assert said == [
        f"the checkpoint of step 4 was written with {threads} threads and this process has "
        f"{threads + 1}: training goes on, but not bitwise as it would have with {threads} "
        f"(set OMP_NUM_THREADS={threads} to continue exactly)"
    ]
