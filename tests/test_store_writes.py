"""Write failures: a full, limited or read-only disk stops training with one line and exit 1,
leaves every committed checkpoint and the index intact, and a resume afterwards is exact."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mmnb
from conftest import assert_same_state
from mmnb.store import Store, StoreWriteError


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A small tmpfs at `path` (None where this container may not mount one, or with
    MMNB_TEST_NO_MOUNT=1 to run the fallbacks)."""
    path.mkdir()
    if os.environ.get("MMNB_TEST_NO_MOUNT"):
        yield None
        return
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        timeout=30,
    )
    if proc.returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def _cli(*args: str, limit: int | None = None) -> subprocess.CompletedProcess:
    def preexec() -> None:  # a file size limit, as `ulimit -f` sets it
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "mmnb", *args],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec if limit else None,
    )


def _fill(path: Path, leave: int) -> Path:
    """Fill the file system of `path` up to `leave` free bytes."""
    st = os.statvfs(path)
    filler = path / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))
    return filler


def _leftovers(run_path: Path) -> list[str]:
    return [
        p.name for p in [*run_path.iterdir(), *(run_path / "ckpt").iterdir()] if ".tmp" in p.name
    ]


def test_full_disk_stops_with_one_line_and_the_resume_is_exact(tmp_path, micro):
    reference = mmnb.train("ref", store=tmp_path / "ref", max_steps=6, save_every=1, **micro)
    with tmpfs(tmp_path / "disk", "4m") as disk:
        root = disk or tmp_path  # without a tmpfs: a file size limit (EFBIG) instead
        store = root / "store"
        mmnb.train("x", store=store, max_steps=6, save_every=1, stop_at=2, **micro)
        size = (store / "x" / "ckpt" / "00000002.h5").stat().st_size
        filler = _fill(root, size // 2) if disk else None
        # In a fresh process: the failure must not crash it (HDF5 once segfaulted here).
        failed = _cli("resume", "x", "--store", str(store), limit=None if disk else size // 2)
        what = "disk full" if disk else "file size limit exceeded"
        target = store / "x" / "ckpt" / "00000003.h5"
        lines = failed.stderr.strip().splitlines()
        assert failed.returncode == 1, failed.stderr
        assert lines[-1] == (
            f"mmnb: error: {what} while writing step 3 to {target}; the newest checkpoint is step 2"
        )
        assert "Traceback" not in failed.stderr and sum("mmnb:" in x for x in lines) == 1
        run = Store(store).run("x")
        assert [s.step for s in run.steps()] == [0, 1, 2] and _leftovers(run.path) == []
        assert run.load()["trainer"]["step"] == 2  # the previous checkpoint loads
        if filler:
            filler.unlink()  # space freed
        mmnb.resume("x", store=store)
        assert_same_state(Store(store).run("x").load(), reference.load())


def test_read_only_folder_and_a_failed_first_checkpoint(tmp_path, micro):
    store = Store(tmp_path / "store")
    run = mmnb.train("x", store=store, max_steps=3, stop_at=1, **micro)
    ckpt = run.path / "ckpt"
    mounted = []

    def read_only_at_step_2(event):  # the checkpoint folder turns read-only while training
        if event.kind == "step" and event.step == 2:
            for args in (["--bind", ckpt, ckpt], ["-o", "remount,bind,ro", ckpt]):
                proc = subprocess.run(["mount", *map(str, args)], capture_output=True, timeout=30)
                if proc.returncode != 0:
                    raise pytest.skip.Exception("cannot bind-mount here (needs CAP_SYS_ADMIN)")
                mounted.append(args)

    try:
        with pytest.raises(StoreWriteError) as err:
            mmnb.resume("x", store=store, save_every=1, listeners=[read_only_at_step_2])
    finally:
        if mounted:
            subprocess.run(["umount", str(ckpt)], check=True, timeout=30)
    assert str(err.value) == (
        f"read-only file system while writing step 2 to {ckpt / '00000002.h5'}; "
        "the newest checkpoint is step 1"
    )
    assert [s.step for s in store.run("x").steps()] == [0, 1] and _leftovers(run.path) == []
    with tmpfs(tmp_path / "disk", "1m") as disk:
        if disk is None:
            pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
        # A new run whose first checkpoint does not fit: no half-made run stays behind.
        full = Store(disk / "store")
        full.path.mkdir()
        _fill(disk, 40_000)
        with pytest.raises(StoreWriteError, match="disk full while"):
            mmnb.train("y", store=full, max_steps=3, **micro)
        assert [p.name for p in full.path.iterdir()] == [".lock"]


def test_a_run_killed_before_step_0_resumes_or_is_replaced(store, micro):
    # What a process killed between creating the run and committing step 0 leaves behind.
    reference = mmnb.train("ref", store=store, max_steps=3, **micro)
    config, tokenizer = reference.config_dict(), reference.tokenizer_json()
    store.create_run("x", config, tokenizer)
    store.create_run("y", config, tokenizer)
    assert store.run("x").status() == "empty"
    resumed = mmnb.resume("x", store=store)  # starts from its config
    assert [s.step for s in resumed.steps()] == [s.step for s in reference.steps()]
    assert_same_state(resumed.load(), reference.load())
    replaced = mmnb.train("y", store=store, max_steps=2, **micro)  # the name is free again
    assert replaced.latest().step == 2 and replaced.config_dict()["train"]["max_steps"] == 2


def test_stale_temporary_files_are_removed_by_the_next_writer(store, micro):
    run = mmnb.train("x", store=store, max_steps=2, stop_at=1, **micro)
    stale = [run.path / ".run.h5.999999.tmp", run.path / "ckpt" / ".00000002.h5.999999.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    creation = store.path / ".z.999999.tmp"  # a run creation whose process died
    (creation / "ckpt").mkdir(parents=True)
    mmnb.resume("x", store=store)
    assert not any(p.exists() for p in stale)
    mmnb.branch("x", 1, "b", store=store, start=False)
    assert not creation.exists()
    shutil.rmtree(store.path / "b")
