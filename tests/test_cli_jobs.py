"""`mmnb … --detach`, `mmnb watch`, `mmnb queue` on the command line."""

from __future__ import annotations

import json
import re

from conftest import cli_args, mmnb


def test_detach_then_watch_from_another_terminal(tmp_path, micro):
    store = str(tmp_path / "store")
    opts = [*cli_args(micro), "--no-sample", "--store", store]
    out = mmnb("train", "a", "--max-steps", "25", "--detach", *opts).stdout
    assert re.fullmatch(
        r"run a: train runs detached in process \d+ \(it outlives this terminal\); "
        r"mmnb watch a follows it; logs in .*/store/\.jobs/detached/a-[\d-]+\n", out
    )  # fmt: skip
    watched = mmnb("watch", "a", "--store", store)
    assert watched.stdout.splitlines()[-1].startswith("run a · step 25/25 (100%) · loss ")
    assert watched.stdout.splitlines()[-1].endswith(" · done")
    assert "25/25" in watched.stderr  # the progress bar, as if it trained here
    branch_opts = [o for o in opts if o not in ("--preset", "tiny")]
    out = mmnb("branch", "a", "--name", "b", "--lr", "1e-3", "--max-steps", "40", "--detach",
               *branch_opts).stdout  # fmt: skip
    assert out.startswith("run b: branch runs detached in process ")
    mmnb("watch", "b", "--store", store)
    once = mmnb("watch", "b", "--once", "--store", store).stdout
    assert once.startswith("run b · step 40/40 (100%)") and once.rstrip().endswith("done")


def test_queue_on_the_command_line(tmp_path):
    store = ["--store", str(tmp_path / "store")]
    out = mmnb("queue", "add", "--no-worker", *store, "train", "a", "--max-steps", "5").stdout
    assert out.splitlines()[0] == (
        f"queued job 1: mmnb train a --max-steps 5 --store {(tmp_path / 'store').resolve()}"
    )
    assert out.splitlines()[1].startswith("no worker runs on ")
    mmnb("queue", "add", "--no-worker", "--after", "1", *store, "branch", "a", "--name", "b")
    rows = json.loads(mmnb("queue", "ls", "--json", *store).stdout)
    assert [(r["id"], r["state"], r["run"], r["after"]) for r in rows] == [
        (1, "queued", "a", []), (2, "queued", "b", [1]),
    ]  # fmt: skip
    assert mmnb("queue", "move", "2", "--first", *store).stdout.splitlines()[1].startswith("2")
    assert mmnb("queue", "cancel", "1", *store).stdout.splitlines() == ["job 1: cancelled"]
    bad = mmnb("queue", "cancel", "1", *store, check=False)
    assert bad.returncode == 2 and bad.stderr == "mmnb: error: job 1 is cancelled already\n"
    bad = mmnb("queue", "add", "--no-worker", *store, "train", "--lr", "0", check=False)
    assert (bad.returncode, bad.stderr) == (2, "mmnb: error: --lr must be positive, got 0.0\n")
