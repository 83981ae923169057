"""The magics, through IPython's InteractiveShell: thin parsers over the API, one-line errors."""

from __future__ import annotations

import gc
import os
import random
import signal
import subprocess
import sys
import threading
import time
import weakref

import numpy as np
import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config

import mmnb
from conftest import assert_same_state, cli_args, write_jsonl
from mmnb.cli import build_parser
from mmnb.options import NOTEBOOK_OPTIONS
from mmnb.store import Store

MAGICS = ("train", "resume", "checkpoint", "runs")


@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    ipython_dir = str(tmp_path_factory.mktemp("ipython"))
    return InteractiveShell.instance(config=config, ipython_dir=ipython_dir)


@pytest.fixture
def ip(shell):
    shell.run_line_magic("load_ext", "mmnb")
    yield shell
    shell.run_line_magic("unload_ext", "mmnb")
    shell.user_ns.pop("run", None)


@pytest.fixture
def opts(micro, tmp_path) -> str:
    """The micro config and a private store as a magic's argument string."""
    return " ".join(cli_args(micro)) + f" --store {tmp_path / 'store'}"


def cell(ip, code: str):
    """Run a cell as a notebook would; return (result, captured output)."""
    with capture_output() as cap:
        result = ip.run_cell(code)
    return result, cap


def store_snapshot(store: Store) -> dict:
    """Every file of the store with its bytes and mtime (the LOCK's mtime says nothing)."""
    files = sorted(p for p in store.path.rglob("*") if p.is_file())
    return {
        p.relative_to(store.path): (p.read_bytes(), p.name == "LOCK" or p.stat().st_mtime_ns)
        for p in files
    }


# ---- the extension ----
def test_import_mmnb_does_not_import_ipython():
    code = (
        "import sys, mmnb\n"
        "front = {'IPython', 'ipywidgets', 'ipykernel'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in front))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_load_ext_imports_torch_dynamo_off_the_main_thread():
    # A first checkpoint read imports torch._dynamo; on the main thread, Kernel → Interrupt could
    # land inside that import and break every later load in the kernel (sympy half-imported).
    code = (
        "import sys, threading, time\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance()\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "ip.run_line_magic('load_ext', 'mmnb')\n"  # returns while the import runs (~1 s)
        "assert any(t.name == 'mmnb-preload' for t in threading.enumerate()), 'not started'\n"
        "deadline = time.monotonic() + 120\n"
        "while any(t.name == 'mmnb-preload' for t in threading.enumerate()):\n"
        "    assert time.monotonic() < deadline\n"
        "    time.sleep(0.05)\n"
        "import torch.fx.experimental.symbolic_shapes\n"  # sympy's users, whole
        "print('torch._dynamo' in sys.modules, 'sympy.core' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def test_load_twice_reload_and_unload(shell):
    hooks = shell.events.callbacks["post_run_cell"]
    before = len(hooks)
    shell.run_line_magic("load_ext", "mmnb")
    mmnb.load_ipython_extension(shell)  # a second load is harmless
    assert len(hooks) == before + 1
    magics = shell.magics_manager.registry["MmnbMagics"]
    assert all(shell.find_line_magic(m) is not None for m in MAGICS)
    shell.run_line_magic("reload_ext", "mmnb")
    assert len(hooks) == before + 1
    assert shell.magics_manager.registry["MmnbMagics"] is not magics  # a fresh instance
    assert all(shell.find_line_magic(m) is not None for m in MAGICS)
    shell.run_line_magic("unload_ext", "mmnb")
    assert len(hooks) == before
    assert all(shell.find_line_magic(m) is None for m in MAGICS)
    assert "MmnbMagics" not in shell.magics_manager.registry
    mmnb.unload_ipython_extension(shell)  # unloading what is not loaded: nothing to do


def test_train_accepts_the_options_of_mmnb_train(ip):
    cli = build_parser()._subparsers._group_actions[0].choices["train"]
    cli_flags = {s for a in cli._actions for s in a.option_strings} - {"-h", "--help"}
    magic = ip.find_line_magic("train").parser
    magic_flags = {s for a in magic._actions for s in a.option_strings}
    notebook_only = {flags[0] for flags, _ in NOTEBOOK_OPTIONS}
    assert magic_flags == cli_flags | notebook_only
    assert not notebook_only & cli_flags
    # and under the same names, with the same meaning (dest)
    assert {a.dest for a in cli._actions} - {"help"} == {
        a.dest for a in magic._actions if a.dest not in {"background", "status", "stop"}
    }


def test_help_is_complete(ip):
    doc = ip.find_line_magic("train").__doc__
    cli = build_parser()._subparsers._group_actions[0].choices["train"]
    for action in cli._actions:
        for flag in action.option_strings:
            assert flag in doc or flag in ("-h", "--help"), flag
    assert "--background" in doc and "Kernel → Interrupt" in doc
    _, cap = cell(ip, "%train?")
    assert "--max-steps" in cap.stdout and "--background" in cap.stdout
    for name in ("resume", "checkpoint", "runs"):
        assert "--store" in ip.find_line_magic(name).__doc__


# ---- %train ----
def test_train_is_the_api_with_one_display_updated_in_place(ip, opts, micro, tmp_path):
    start = time.perf_counter()
    with capture_output() as cap:
        run = ip.run_line_magic("train", f"a --max-steps 60 {opts}")
    elapsed = time.perf_counter() - start
    assert ip.user_ns["run"] is run and run.name == "a" and run.status() == "finished"
    expected = mmnb.train("ref", store=tmp_path / "ref", max_steps=60, **micro)
    assert_same_state(run.load(), expected.load())
    # One output, then only updates of it (same display id), throttled.
    first, *rest = cap.outputs
    assert not first.update and rest and all(o.update for o in rest)
    assert {o.transient["display_id"] for o in rest} == {first.transient["display_id"]}
    assert len(rest) <= 3 + elapsed / 0.25  # start and stop are drawn at once, steps throttled
    assert rest[-1].data["text/plain"].startswith("run a · step 60/60 (100%) · epoch 0 · loss ")
    assert rest[-1].data["text/plain"].endswith("· saved step 60 · finished at step 60")
    assert '<progress value="60" max="60"' in rest[-1].data["text/html"]
    lines = cap.stdout.splitlines()
    assert lines[0].startswith("run a: step 60, loss ") and lines[1].startswith("sample: ")


def test_train_names_and_the_terminal_fallback(ip, opts, capsys):
    run = ip.run_line_magic("train", f"--run b --max-steps 3 --no-sample {opts}")
    assert run.name == "b"
    assert "3/3" in capsys.readouterr().err  # a terminal shell gets a tqdm bar, not displays
    auto = ip.run_line_magic("train", f"--max-steps 1 --no-sample {opts}")
    assert auto.name == "run-001" and ip.user_ns["run"] is auto
    with pytest.raises(UsageError, match="two run names"):
        ip.run_line_magic("train", f"x --run y {opts}")


def _interrupt_when(store: Store, name: str, step: int) -> threading.Thread:
    """SIGINT this process (as Kernel → Interrupt does) once `step` is committed."""

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                latest = store.run(name).latest()
            except mmnb.StoreError:  # the run is not created yet
                latest = None
            if latest is not None and latest.step >= step:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_interrupt_checkpoints_says_where_and_reraises(ip, opts, micro, tmp_path):
    store = Store(tmp_path / "store")
    watcher = _interrupt_when(store, "a", 4)
    with capture_output() as cap, pytest.raises(KeyboardInterrupt):
        ip.run_line_magic("train", f"a --max-steps 400 --save-every 2 --no-sample {opts}")
    watcher.join()
    latest = store.run("a").latest()
    assert "interrupt" in latest.reasons and 4 <= latest.step < 400
    assert cap.stdout.splitlines() == [
        f"interrupted: step {latest.step} of run a is checkpointed in "
        f"{store.path / 'a' / 'run.h5'} (%resume a continues it)"
    ]
    assert ip.user_ns["run"].name == "a"
    # "Run All" stops here: the cell reports the KeyboardInterrupt as its error.
    watcher = _interrupt_when(store, "c", 4)
    result, _ = cell(ip, f"%train c --max-steps 400 --save-every 2 --no-sample {opts}")
    watcher.join()
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    # The interrupted run continues exactly.
    # (save_every only decides which steps are written; fewer writes keep the test fast)
    resumed = ip.run_line_magic("resume", f"a --save-every 0 --no-sample --store {store.path}")
    expected = mmnb.train("ref", store=tmp_path / "ref", max_steps=400, **micro)
    assert_same_state(resumed.load(), expected.load())


# ---- background ----
def test_background_training_is_unchanged_by_cells_run_meanwhile(ip, opts, micro, tmp_path):
    blocking = ip.run_line_magic("train", f"fg --max-steps 150 --no-sample {opts}")
    with capture_output() as cap:
        run = ip.run_line_magic("train", f"bg --max-steps 150 --background {opts}")
    assert run.thread is not None and ip.user_ns["run"] is run
    assert cap.outputs == []  # nothing is drawn for a background run
    ip.push({"np": np, "random": random, "torch": torch})
    meddled, said = 0, []
    while run.training:
        result, out = cell(
            ip,
            "torch.manual_seed(0); np.random.seed(0); random.seed(0)\n"
            "m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Dropout(0.5))\n"
            "m(torch.randn(8, 16)).sum().backward(); np.random.rand(9); random.random()",
        )
        assert result.success
        said.append(out.stdout)
        meddled += 1
    run.wait()
    assert meddled > 0
    assert_same_state(run.load(), blocking.load())
    # The first cell after the thread ended says so, once, from the main thread.
    for _ in range(2):
        said.append(cell(ip, "pass")[1].stdout)
    ended = [line for out in said for line in out.splitlines() if "background run bg" in line]
    assert len(ended) == 1 and ended[0].endswith("· finished at step 150")
    assert ended[0].startswith("background run bg ended: run bg · step 150/150")


def test_background_status_checkpoint_and_stop(ip, opts, tmp_path):
    store = Store(tmp_path / "store")
    started = ip.run_line_magic("train", f"bg --epochs 200 --background {opts}")
    while started.trainer.step < 3:
        time.sleep(0.01)
    _, cap = cell(ip, f"%train --status bg --store {store.path}")
    assert cap.stdout.startswith("run bg · step ") and "training (background)" in cap.stdout
    _, cap = cell(ip, f"%checkpoint --tag mine --store {store.path}")
    info = next(s for s in store.run("bg").steps() if "mine" in s.tags)
    assert "requested" in info.reasons
    assert cap.stdout.strip() == (
        f"checkpoint: run bg step {info.step} [mine] → {store.path / 'bg' / info.file} "
        f"({info.bytes / 1024:.1f} KiB)"
    )
    _, cap = cell(ip, f"%runs --store {store.path}")
    assert "bg  [run bg · step" in cap.stdout
    _, cap = cell(ip, f"%train --stop bg --store {store.path}")
    latest = store.run("bg").latest()
    assert "stop" in latest.reasons and latest.step >= info.step
    assert (
        cap.stdout.strip()
        == f"stopped run bg at step {latest.step}: {store.path / 'bg' / latest.file}"
    )
    assert not started.training and started.status() == "stopped"
    result, _ = cell(ip, f"%train --stop bg --store {store.path}")
    assert isinstance(result.error_in_exec, UsageError)


# ---- %checkpoint ----
def test_checkpoint_when_idle_and_list(ip, opts, micro, tmp_path):
    store = Store(tmp_path / "store")
    ip.run_line_magic("train", f"a --max-steps 5 --no-sample {opts}")
    _, cap = cell(ip, f"%checkpoint a --tag best --tag keep --store {store.path}")
    info = store.run("a").latest()
    assert info.step == 5 and info.tags == ["best", "keep"] and "requested" in info.reasons
    assert cap.stdout.startswith(f"checkpoint: run a step 5 [best, keep] → {store.path}")
    _, cap = cell(ip, f"%checkpoint --list --store {store.path}")
    lines = cap.stdout.splitlines()
    assert lines[0] == f"run a ({store.path / 'a' / 'run.h5'})"
    assert [line.split()[0] for line in lines[2:]] == [str(s.step) for s in store.run("a").steps()]
    assert lines[-1].endswith("end, requested [best, keep]")
    mmnb.train("other", store=store, max_steps=2, **micro)  # not trained by this kernel
    result, cap = cell(ip, f"%checkpoint other --store {store.path}")
    assert isinstance(result.error_in_exec, UsageError)
    assert "not loaded in this process; resume it first" in cap.stderr


def test_the_kernel_keeps_a_finished_run_only_while_the_user_does(ip, opts, tmp_path):
    """A handle holds its model and optimizer: the magics' registry must not keep it alive."""
    handle = weakref.ref(ip.run_line_magic("train", f"a --max-steps 2 --no-sample {opts}"))
    del ip.user_ns["run"]
    gc.collect()
    assert handle() is None
    result, cap = cell(ip, f"%checkpoint a --store {tmp_path / 'store'}")
    assert "run 'a' is not loaded in this process; resume it first" in cap.stderr


# ---- %resume ----
def test_resume_after_a_restart_from_the_store_alone(shell, ip, opts, micro, tmp_path):
    store = Store(tmp_path / "store")
    ip.run_line_magic("train", f"a --epochs 2 --stop-at 37 --no-sample {opts}")
    # A kernel restart: nothing in memory, only the store.
    shell.run_line_magic("unload_ext", "mmnb")
    shell.reset()
    shell.run_line_magic("load_ext", "mmnb")
    run = ip.run_line_magic("resume", f"--no-sample --store {store.path}")  # the newest run
    assert run.name == "a" and ip.user_ns["run"] is run and run.status() == "finished"
    expected = mmnb.train("a", store=tmp_path / "ref", epochs=2, **micro)
    assert_same_state(run.load(), expected.load())
    # Extend the finished WSD run: a new run, equal to one planned for 3 epochs.
    longer = ip.run_line_magic("resume", f"a --more-epochs 1 --no-sample --store {store.path}")
    assert longer.name == "a-3ep"
    three = mmnb.train("three", store=tmp_path / "ref", epochs=3, **micro)
    assert_same_state(longer.load(), three.load())


def test_resume_branch_with_overrides(ip, opts, micro, tmp_path):
    store = Store(tmp_path / "store")
    ip.run_line_magic("train", f"a --max-steps 20 --save-every 10 --no-sample {opts}")
    hot = ip.run_line_magic(
        "resume", f"a@10 --branch hot --lr 3e-3 --no-sample --store {store.path}"
    )
    assert hot.parent == ("a", 10) and ip.user_ns["run"] is hot
    mmnb.train("a", store=tmp_path / "ref", max_steps=20, save_every=10, **micro)
    expected = mmnb.branch("a", 10, "hot", store=tmp_path / "ref", lr=3e-3)
    assert_same_state(hot.load(), expected.load())
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "conversations": [
                    {"role": "user", "content": f"What is {i} plus one?"},
                    {"role": "assistant", "content": f"It is {i + 1}. " * 3},
                ]
            }
            for i in range(40)
        ],
    )
    sft = ip.run_line_magic(
        "resume",
        f"a --step 20 --branch sft --data {chat} --epochs 1 --no-sample --store {store.path}",
    )
    assert sft.parent == ("a", 20) and sft.config_dict()["train"]["data"] == str(chat)
    assert sft.latest().step > 20 and sft.status() == "finished"


# ---- %runs ----
def test_runs_is_a_tree_of_branches_with_checkpoints(ip, opts, micro, tmp_path):
    store = Store(tmp_path / "store")
    ip.run_line_magic("train", f"a --max-steps 20 --save-every 10 --no-sample {opts}")
    mmnb.branch("a", 10, "b", store=store, max_steps=30)
    mmnb.branch("a", 20, "c", store=store, max_steps=25)
    mmnb.branch("b", 30, "d", store=store, max_steps=35)
    mmnb.train("e", store=store, max_steps=2, **micro)
    _, cap = cell(ip, f"%runs --store {store.path}")
    lines = cap.stdout.splitlines()
    assert lines[0] == f"store {store.path}"
    heads = [line.split("  [")[0] for line in lines[1:]]
    assert heads == ["a", "├─ @10 b", "│  └─ @30 d", "└─ @20 c", "e"]
    assert "[finished]  loss " in lines[1] and "checkpoints: 0 10 16 20  (" in lines[1]
    assert "[finished]" in lines[2] and "checkpoints: 20 24 30" in lines[2]  # own ones only
    _, cap = cell(ip, f"%runs --store {tmp_path / 'empty'}")
    assert cap.stdout.strip() == f"no runs in {tmp_path / 'empty'}"


# ---- errors ----
@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("%train --preset huge {opts}", "argument --preset: invalid choice: 'huge'"),
        ("%train --epochs two {opts}", "argument --epochs: invalid int value: 'two'"),
        ("%train x {opts} --data {tmp}/missing.jsonl", "data file not found"),
        ("%train x --lr 0 {opts}", "--lr must be positive"),
        ("%train x --lr inf {opts}", "--lr must be a finite number, got inf"),
        ("%train x {opts} --heads 4 --kv-heads 3", "--kv-heads (3) must divide --heads (4)"),
        ("%train x --device nosuch {opts}", "--device 'nosuch' is not a torch device"),
        ("%train x {opts} --store {tmp}/afile", "is a file, not a folder"),
        ("%resume a --log-every 0 {store}", "--log-every must be positive, got 0"),
        ("%resume a --stop-at 2 {store}", "--stop-at 2 is not after step 3"),
        ("%train a {opts}", "run 'a' already exists"),
        ("%train x --time-budget soon {opts}", "--time-budget 'soon' is not a duration"),
        ("%train --status --lr 1 {store}", "--status and --stop take only RUN and --store"),
        ("%train --stop {store}", "no run is training in the background in this kernel"),
        ("%resume ghost {store}", "no run named 'ghost'"),
        ("%resume ../a {store}", "invalid run name '../a'"),
        ("%resume a --branch ../b {store}", "invalid run name '../b'"),
        ("%resume a@99 {store}", "run 'a' has no checkpoint at step 99 (it has: 0, "),
        ("%resume a@x {store}", "RUN@STEP needs an integer step, got 'a@x'"),
        ("%resume a@3 --step 2 {store}", "two steps given: @3 and --step 2"),
        ("%resume a --epochs -1 {store}", "--epochs must be positive, got -1"),
        (
            "%resume a --epochs 2 --more-epochs 1 {store}",
            "give --epochs or --more-epochs, not both",
        ),
        ("%resume a --lr 1 {store}", "--lr changes the run's trajectory; add --branch NAME"),
        ("%resume a --branch b --more-epochs 1 {store}", "a branch's length is --epochs"),
        ("%resume a --branch b --data {tmp}/missing.jsonl {store}", "data file not found"),
        ("%resume a --branch b --layers 3 {store}", "--layers changes the model's shape"),
        ("%resume a --branch a {store}", "run 'a' already exists"),
        ("%resume {tmp}/empty", "has no runs"),
        ("%checkpoint ghost {store}", "no run named 'ghost'"),
        ("%checkpoint a --list --tag x {store}", "--tag saves a checkpoint"),
        ("%runs --bogus {store}", "unrecognized arguments: --bogus"),
    ],
)
def test_errors_are_one_line_and_leave_the_store_unchanged(ip, opts, tmp_path, line, message):
    store = Store(tmp_path / "store")
    ip.run_line_magic("train", f"a --max-steps 3 --no-sample {opts}")
    before = store_snapshot(store)
    line = line.format(opts=opts, store=f"--store {store.path}", tmp=tmp_path)
    line = line.replace(f"{tmp_path}/empty", f"--store {tmp_path}/empty")
    (tmp_path / "afile").write_text("not a store")
    result, cap = cell(ip, line)
    assert isinstance(result.error_in_exec, UsageError), result.error_in_exec
    assert cap.stderr.strip().splitlines() == [f"UsageError: {result.error_in_exec}"]
    assert message in cap.stderr and "Traceback" not in cap.stderr
    assert store_snapshot(store) == before
