"""A store is untrusted input: names, links and special files never lead outside it.

Every malicious store here is refused with one StoreError naming the file, and (where strace
runs) no file outside the store is ever opened.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import mmnb
from mmnb.cli import main
from mmnb.store import Store, StoreError


@pytest.fixture(scope="module")
def base(tmp_path_factory, small_corpus):
    """A finished micro run, copied into each test's own store."""
    from conftest import MICRO

    root = tmp_path_factory.mktemp("base") / "store"
    mmnb.train("r", store=root, max_steps=2, save_every=1, **dict(MICRO, data=str(small_corpus)))
    return root


@pytest.fixture
def victim(tmp_path, base):
    """(store, outside): a copy of the base store and a precious file outside it."""
    import shutil

    shutil.copytree(base, tmp_path / "store", symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("precious\n")
    return Store(tmp_path / "store"), outside


def _listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_run_names_cannot_leave_the_store(victim, capsys, micro):
    store, outside = victim
    before = _listing(store.path.parent)
    for call in (
        lambda: store.run("../r"),
        lambda: mmnb.train("../x", store=store, max_steps=1, **micro),
        lambda: mmnb.resume("../outside", store=store),
        lambda: mmnb.resume("r", store=store, more_epochs=1, name="../x"),
        lambda: mmnb.branch("r", 1, "../x", store=store),
        lambda: mmnb.branch("r", 1, "a/b", store=store),
    ):
        with pytest.raises(StoreError, match="invalid run name"):
            call()
    for argv in (["resume", "../outside"], ["train", "../x"], ["branch", "r", "--name", "../x"]):
        assert main([*argv, "--store", str(store.path), "--no-sample"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mmnb: error: invalid run name") and len(err.splitlines()) == 1
    assert _listing(store.path.parent) == before


def test_symlinked_lock_is_refused_and_its_target_untouched(victim):
    store, outside = victim
    lock = store.path / "r" / "LOCK"
    lock.unlink()
    lock.symlink_to(outside / "precious")
    with pytest.raises(StoreError, match="LOCK is a symlink, not a regular file; refused"):
        mmnb.resume("r", store=store)
    assert (outside / "precious").read_text() == "precious\n"


def test_fifo_lock_neither_hangs_nor_hides_the_other_runs(victim, micro):
    store, _ = victim
    mmnb.branch("r", 1, "ok", store=store, start=False)
    lock = store.path / "r" / "LOCK"
    lock.unlink()
    os.mkfifo(lock)
    proc = subprocess.run(
        [sys.executable, "-m", "mmnb", "runs", "--store", str(store.path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "ok <- r@1" in proc.stdout and "\nr " not in "\n" + proc.stdout
    assert proc.stderr.strip().splitlines() == [
        f"mmnb: warning: lock file {lock} is a FIFO, not a regular file; refused; skipping run r"
    ]
    with pytest.raises(StoreError, match="is a FIFO"):
        mmnb.resume("r", store=store)


def test_symlinked_run_folder_is_skipped(victim, tmp_path):
    store, outside = victim
    (store.path / "r").rename(outside / "r")
    (store.path / "r").symlink_to(outside / "r")
    with pytest.warns(UserWarning, match="run folder .*r is a symlink, not a folder; refused"):
        assert store.runs() == []
    with pytest.raises(StoreError, match="is a symlink"):
        store.run("r")
