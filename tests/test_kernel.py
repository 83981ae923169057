"""The magics in a REAL kernel: interrupt, restart and resume; background training meddled with.

Each kernel is ipykernel's own `python3` spec on this interpreter (no installed kernelspec is
needed), with a private IPYTHONDIR whose config loads the extension, as a user would with
`c.InteractiveShellApp.extensions = ["mmnb"]`: no cell runs %load_ext.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

import mmnb
from conftest import assert_same_state, cli_args
from conftest import mmnb as mmnb_cli
from mmnb.store import Store

TIMEOUT = 120
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def kernel(tmp_path: Path, threads: str | None = "1") -> Iterator[tuple[KernelManager, Any]]:
    """A kernel with MMNB_STORE=<tmp>/store; `threads=None` leaves torch its default threads."""
    profile = tmp_path / "ipython" / "profile_default"
    profile.mkdir(parents=True)
    (profile / "ipython_kernel_config.py").write_text(
        'c.InteractiveShellApp.extensions = ["mmnb"]\n'
    )
    env = dict(os.environ, IPYTHONDIR=str(profile.parent), MMNB_STORE=str(tmp_path / "store"))
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    else:
        # Torch's default thread count, but idle OpenMP workers sleep instead of spinning: two
        # thread teams (training, meddling cells) on a busy 2-core machine otherwise spin each
        # other out, 10-50x slower. The wait policy changes no number.
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    # Only ipykernel's native spec: it runs this interpreter, whatever else is installed.
    km = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    km.start_kernel(env=env, cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=TIMEOUT)
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def execute(kc: Any, code: str, **expressions: str) -> tuple[dict, str, list[dict]]:
    """Run a cell; return its reply, its stdout and its iopub messages. Fails on an error."""
    messages: list[dict] = []
    reply = kc.execute_interactive(
        code, timeout=TIMEOUT, user_expressions=expressions, output_hook=messages.append
    )["content"]
    assert reply["status"] == "ok", (code, reply.get("ename"), reply.get("evalue"))
    return reply, _stdout(messages), messages


def value(reply: dict, name: str) -> str:
    return reply["user_expressions"][name]["data"]["text/plain"]


def _stdout(messages: list[dict]) -> str:
    return "".join(
        m["content"]["text"]
        for m in messages
        if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
    )


def _collect(kc: Any, msg_id: str) -> list[dict]:
    """The iopub messages of one cell, up to its `idle` status."""
    messages = []
    while True:
        msg = kc.get_iopub_msg(timeout=TIMEOUT)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return messages
        messages.append(msg)


def test_interrupt_restart_resume_equals_an_uninterrupted_run(tmp_path, micro):
    store = Store(tmp_path / "store")
    options = " ".join(cli_args(micro))
    with kernel(tmp_path) as (km, kc):
        msg_id = kc.execute(f"%train a --max-steps 200 --save-every 2 --no-sample {options}")
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:  # the first steps are committed
            with contextlib.suppress(mmnb.StoreError):  # not created yet
                latest = store.run("a").latest()
                if latest is not None and latest.step >= 4:
                    break
            time.sleep(0.02)
        km.interrupt_kernel()  # Kernel → Interrupt: SIGINT
        reply = kc.get_shell_msg(timeout=TIMEOUT)
        while reply["parent_header"].get("msg_id") != msg_id:  # e.g. wait_for_ready's
            reply = kc.get_shell_msg(timeout=TIMEOUT)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        messages = _collect(kc, msg_id)
        latest = store.run("a").latest()
        assert "interrupt" in latest.reasons and 4 <= latest.step < 200
        assert _stdout(messages).splitlines() == [
            f"interrupted: step {latest.step} of run a is checkpointed in "
            f"{store.path / 'a' / 'run.h5'} (%resume a continues it)"
        ]
        # What the user sees: that line and a short traceback of the cell, not ~100 lines
        # through magics, the API, the trainer and autograd.
        errors = [m["content"] for m in messages if m["msg_type"] == "error"]
        assert [e["ename"] for e in errors] == ["KeyboardInterrupt"]
        shown = ANSI.sub("", "\n".join(errors[0]["traceback"])).splitlines()
        assert 1 + len(shown) <= 15, shown
        assert "train.py" not in "\n".join(shown) and "%train" not in shown[-1]
        # ONE dashboard for the whole training: the widget, updated through its comm, and its
        # static twin, filled at the end with the final state (for nbconvert and saved
        # notebooks; hidden where the widget renders; its text is the final line).
        displays = [m for m in messages if "display" in m["msg_type"]]
        assert [m["msg_type"] for m in displays] == ["display_data"] * 2 + [
            "update_display_data"
        ] * 2
        widget, twin = (m["content"]["transient"]["display_id"] for m in displays[:2])
        assert "application/vnd.jupyter.widget-view+json" in displays[0]["content"]["data"]
        final = {m["content"]["transient"]["display_id"]: m["content"]["data"] for m in displays}
        assert final[widget]["text/plain"] == ""  # the line once, in the twin
        assert f"saved step {latest.step}" in final[twin]["text/plain"]
        assert "interrupted" in final[twin]["text/plain"]
        assert "interrupted" in final[twin]["text/html"] and "<img" in final[twin]["text/html"]
        assert "mmnb-live-" in final[twin]["text/html"]  # the rule that hides it by the widget

        km.restart_kernel(now=False)
        kc.wait_for_ready(timeout=TIMEOUT)
        reply, out, _ = execute(kc, "%resume --save-every 0 --no-sample", name="run.name")
        assert value(reply, "name") == "'a'"  # the newest run of $MMNB_STORE, bound to `run`
        assert out.startswith("run a: step 200, loss ")
    mmnb_cli(
        "train", "ref", "--store", str(tmp_path / "ref"), "--no-sample", "--max-steps", "200",
        *cli_args(micro),
    )  # fmt: skip
    assert_same_state(store.run("a").load(), Store(tmp_path / "ref").run("ref").load())


MEDDLE = """
import random
import numpy as np
import torch
torch.manual_seed(0); np.random.seed(0); random.seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                            torch.nn.Linear(64, 64))
optimizer = torch.optim.AdamW(model.parameters())
for _ in range(20):
    model(torch.randn(32, 64)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
np.random.rand(100); random.random()
"""


@pytest.mark.parametrize("threads", ["1", None], ids=["one-thread", "default-threads"])
def test_background_training_in_a_kernel_equals_blocking(tmp_path, micro, threads):
    store = Store(tmp_path / "store")
    options = f"--max-steps 300 --no-sample {' '.join(cli_args(micro))}"
    with kernel(tmp_path, threads) as (_, kc):
        reply, _, _ = execute(
            kc, f"import torch\n%train fg {options}", threads="torch.get_num_threads()"
        )
        if threads is None:
            assert int(value(reply, "threads")) == (os.cpu_count() or 1)
        execute(kc, f"%train quiet --background {options}")
        reply, out, _ = execute(kc, "run.wait()", name="run.name")
        assert value(reply, "name") == "'quiet'"
        assert out.startswith("background run quiet ended: run quiet · step 300/300")
        _, out, messages = execute(kc, f"%train bg --background {options}")
        # The thread draws nothing itself: one dashboard widget, whose traits it updates (and
        # its static twin, empty until the run has ended).
        displays = [m for m in messages if "display" in m["msg_type"]]
        assert [m["msg_type"] for m in displays] == ["display_data", "display_data"]
        assert "application/vnd.jupyter.widget-view+json" in displays[0]["content"]["data"]
        assert out.startswith("run bg trains in the background")
        meddled = 0
        while True:
            reply, _, _ = execute(kc, MEDDLE, training="run.training")
            if value(reply, "training") == "False":
                break
            meddled += 1
        _, out, _ = execute(kc, "run.wait()\n%train --status bg")
        assert "step 300/300" in out and "· finished at step 300" in out
    assert meddled > 0
    fg = store.run("fg").load()
    assert_same_state(store.run("quiet").load(), fg)
    assert_same_state(store.run("bg").load(), fg)


def _widget_comm(kc: Any, description: str, deadline: float) -> str:
    """The comm id of the widget whose state has `description` (a button), from iopub."""
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=TIMEOUT)
        if msg["msg_type"] == "comm_open":
            if msg["content"]["data"].get("state", {}).get("description") == description:
                return msg["content"]["comm_id"]
    raise AssertionError(f"no widget {description!r} was displayed")


def _click(kc: Any, comm_id: str) -> None:
    """What the browser sends when a button is clicked."""
    content = {"comm_id": comm_id, "data": {"method": "custom", "content": {"event": "click"}}}
    kc.shell_channel.send(kc.session.msg("comm_msg", content))


def test_stop_and_checkpoint_buttons_work_during_a_blocking_train(tmp_path, micro):
    """The dashboard's clicks are handled while `%train` blocks the cell (a helper subshell of
    ipykernel 7); training stays in the main thread and stops with a checkpoint."""
    store = Store(tmp_path / "store")
    options = " ".join(cli_args(micro))
    with kernel(tmp_path) as (_, kc):
        msg_id = kc.execute(f"%train a --max-steps 100000 --no-sample {options}")
        deadline = time.monotonic() + TIMEOUT
        stop = _widget_comm(kc, "Stop", deadline)
        save = _widget_comm(kc, "Checkpoint now", deadline)
        while time.monotonic() < deadline:  # training has begun
            with contextlib.suppress(mmnb.StoreError):
                if store.run("a").is_locked() and len(store.run("a").steps()) >= 1:
                    break
            time.sleep(0.05)
        time.sleep(0.5)
        _click(kc, save)
        while time.monotonic() < deadline:
            if any("requested" in s.reasons for s in store.run("a").steps()):
                break
            time.sleep(0.05)
        _click(kc, stop)
        reply = kc.get_shell_msg(timeout=TIMEOUT)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = kc.get_shell_msg(timeout=TIMEOUT)
        assert reply["content"]["status"] == "ok"  # a Stop is not an error: Run All goes on
    steps = store.run("a").steps()
    # (the Stop may land at the very boundary the requested checkpoint was taken at)
    assert any("requested" in s.reasons for s in steps), steps
    assert "stop" in steps[-1].reasons and steps[-1].step < 100000
    assert store.run("a").status() == "stopped"
