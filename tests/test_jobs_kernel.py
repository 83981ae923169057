"""Detached training in REAL kernels: it outlives the kernel that started it; another kernel
attaches the live dashboard — the finished curve of one job, the live steps of another — and
its Stop button stops that job with a checkpoint."""

from __future__ import annotations

import re
import time

from test_kernel import TIMEOUT, execute, kernel, value

from conftest import cli_args
from mmnb import launch
from mmnb.jobs import detach
from mmnb.store import Store

DASH = "get_ipython().magics_manager.registry['JobMagics'].attachments[-1].listener"


def _until(kc, expression: str, expected, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        reply, _, _ = execute(kc, "", v=expression)
        if value(reply, "v") == repr(expected):
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {value(reply, 'v')}"
        time.sleep(0.3)


def test_a_detached_run_outlives_its_kernel_and_attaches_anywhere(tmp_path, micro):
    store = Store(tmp_path / "store")
    options = f"--no-sample {' '.join(cli_args(micro))}"
    jobs = []
    try:
        with kernel(tmp_path / "k1") as (_, kc):
            _, out, _ = execute(kc, f"%train a --detach --max-steps 40 --save-every 10 {options} "
                                    f"--store {store.path}")  # fmt: skip
            assert re.match(r"run a: train runs detached in process \d+ \(it outlives this "
                            r"kernel\); %attach a follows it; logs in ", out)  # fmt: skip
            execute(kc, f"%train b --detach --max-steps 100000 {options} --store {store.path}")
        # The kernel is gone; its jobs are not.
        jobs = [detach.find(store, "a"), detach.find(store, "b")]
        assert all(job is not None for job in jobs)
        deadline = time.monotonic() + TIMEOUT
        while jobs[0].poll() is None:
            assert time.monotonic() < deadline, "job a did not finish"
            time.sleep(0.1)
        assert jobs[0].poll() == 0 and "end" in store.run("a").latest().reasons
        assert jobs[1].alive()
        with kernel(tmp_path / "k2") as (_, kc):
            _, _, messages = execute(kc, f"%attach a --store {store.path}")
            displays = [m for m in messages if "display" in m["msg_type"]]
            assert "application/vnd.jupyter.widget-view+json" in displays[0]["content"]["data"]
            _until(kc, f"({DASH}.state, len({DASH}.history['step']), {DASH}.step)",
                   ("done", 40, 40), "the finished curve")  # fmt: skip
            reply, _, _ = execute(kc, "", ckpts=f"[s for s, _ in {DASH}.checkpoints]")
            assert value(reply, "ckpts") == repr([s.step for s in store.run("a").steps()])

            execute(kc, f"%attach b --store {store.path}")
            _until(kc, f"{DASH}.state == 'training' and {DASH}.step > 20", True, "live steps")
            reply, _, _ = execute(kc, "", first=f"{DASH}.step")
            _until(kc, f"{DASH}.step > {value(reply, 'first')}", True, "more live steps")
            _until(kc, f"{DASH}.stop_button.disabled", False, "the Stop button")
            execute(kc, f"{DASH}.checkpoint_button.click()")  # what a click in the browser does
            _until(kc, f"'checkpoint you requested' in {DASH}.controls_note.value", True,
                   "the requested checkpoint")  # fmt: skip
            assert any("requested" in s.reasons for s in store.run("b").steps())
            execute(kc, f"{DASH}.stop_button.click()")
            _until(kc, f"{DASH}.state", "stop", "the job to stop")
            assert jobs[1].wait(TIMEOUT) == 0
            latest = store.run("b").latest()
            assert "stop" in latest.reasons and latest.step < 100_000
            _until(kc, f"{DASH}.saved.step", latest.step, "the dashboard to show the save")
    finally:
        for job in jobs:
            if job is not None:
                job.kill()
    assert all(launch.start_ticks(job.pid) is None or not job.alive() for job in jobs)
