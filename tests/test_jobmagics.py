"""%queue, %attach, %pipeline and --detach through IPython's InteractiveShell: thin parsers over
the jobs engine, one-line errors, and nothing printed by a background thread."""

from __future__ import annotations

import threading

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

import mmnb
from conftest import cli_args
from mmnb.jobs.queue import Queue

JOB_MAGICS = ("attach", "queue", "pipeline")


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


def test_queue_attach_and_their_one_line_errors(ip, store, micro, capsys):
    where = f"--store {store.path}"
    opts = " ".join(cli_args(micro))
    ip.run_line_magic("queue", f"add --no-worker {where} train a --max-steps 3 {opts}")
    assert capsys.readouterr().out.splitlines()[0].startswith("queued job 1: mmnb train a ")
    ip.run_line_magic("queue", f"ls {where}")  # no kernel: the table is printed
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["1", "queued", "a"]
    ip.run_line_magic("queue", f"cancel 1 {where}")
    assert Queue(store).get(1).state == "cancelled"
    for magic, line, message in [
        ("queue", f"add {where} train --bogus", "unrecognized arguments: --bogus"),
        ("queue", f"cancel 7 {where}", "no job 7 in the queue"),
        ("queue", "frobnicate", "invalid choice: 'frobnicate'"),
        ("attach", f"ghost {where}", "no run named 'ghost'"),
        ("pipeline", f"missing.toml {where}", "pipeline file missing.toml does not exist"),
        ("train", f"x --detach --background {where}", "--detach and --background: choose one"),
    ]:
        with pytest.raises(UsageError, match=message):
            ip.run_line_magic(magic, line)
    mmnb.train("b", store=store, max_steps=3, **micro)
    ip.run_line_magic("attach", f"b --wait {where}")  # followed in this thread: it prints
    out = capsys.readouterr()
    assert out.out.splitlines()[-1].startswith("run b · step 3/3 (100%) · loss ")
    assert out.out.rstrip().endswith("· done")
    assert not [t.name for t in threading.enumerate() if t.name.startswith("mmnb-")]


def test_unload_removes_the_job_magics(shell):
    shell.run_line_magic("load_ext", "mmnb")
    assert all(shell.find_line_magic(m) is not None for m in JOB_MAGICS)
    shell.run_line_magic("unload_ext", "mmnb")
    assert all(shell.find_line_magic(m) is None for m in JOB_MAGICS)
    assert "JobMagics" not in shell.magics_manager.registry
