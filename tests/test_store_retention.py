"""Retention that understands lineage, branching while a parent prunes, and `mmnb gc`."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time

import pytest

import mmnb
from conftest import cli_args
from mmnb.cli import main
from mmnb.store import Store, StoreError


def _listed_files_all_intact(store: Store) -> list[str]:
    """Every checkpoint any run lists exists and loads (checksums verified)."""
    checked = []
    for run in store.runs():
        for info in run.steps():
            run.verify(info.step)
            checked.append(f"{run.name}:{info.run}@{info.step}")
    return checked


def test_branching_while_the_parent_prunes_across_three_generations(store, micro):
    # The parent trains in another process and keeps only its newest checkpoint.
    parent = subprocess.Popen(
        [sys.executable, "-m", "mmnb", "train", "p", "--store", str(store.path), "--no-sample"]
        + ["--max-steps", "30", "--save-every", "1", "--keep-last", "1", *cli_args(micro)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    children, refused = [], 0
    try:
        deadline = time.monotonic() + 240
        while parent.poll() is None and time.monotonic() < deadline:
            try:
                latest = store.run("p").latest()
            except StoreError:  # not created yet
                time.sleep(0.05)
                continue
            if latest is None or latest.step == 0:
                continue
            name = f"c{len(children)}"
            try:
                # A child that trains two steps of its own (its own checkpoints) ...
                mmnb.branch("p", latest.step, name, store=store, max_steps=latest.step + 6,
                            stop_at=latest.step + 2, save_every=1, keep_last=0)  # fmt: skip
            except StoreError as err:  # the step was pruned before the branch could list it
                assert "no checkpoint at step" in str(err) or "does not exist" in str(err), err
                refused += 1
                continue
            children.append((name, latest.step))
            # ... and a grandchild from the child's own first step.
            mmnb.branch(name, latest.step + 1, f"g{len(children) - 1}", store=store, start=False)
        assert parent.wait(timeout=240) == 0, parent.stderr.read()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    assert len(children) >= 2, (children, refused)
    # The children prune their own history now; the grandchildren's branch points stay.
    for name, step in children:
        mmnb.resume(name, store=store, keep_last=1, save_every=1)
        assert step + 1 in [s.step for s in store.run(name).steps()]
    checked = _listed_files_all_intact(store)
    p_steps = [s.step for s in store.run("p").steps()]
    for _, step in children:  # each branch point of p, and the history the children list
        assert step in p_steps
    assert 30 in p_steps and len(checked) > 3 * len(children)


def _gc(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["gc", *args])
    return code, out.getvalue(), err.getvalue()


def test_gc_reports_why_then_removes_on_confirmation(store, micro):
    run = mmnb.train("r", store=store, max_steps=3, save_every=1, **micro)
    reference = run.load(3)
    config, tokenizer = run.config_dict(), run.tokenizer_json()
    store.create_run("never", config, tokenizer)  # a run whose process died before step 0
    ckpt = run.path / "ckpt"
    (ckpt / ".00000004.h5.999999.tmp").write_bytes(b"half")
    (ckpt / "00000002.h5").rename(ckpt / "00000002.h5.corrupt")  # listed, but its file gone
    (ckpt / "00000009.h5").write_bytes(b"not hdf5")  # unreadable, listed nowhere
    (store.path / ".z.999999.tmp").mkdir()
    before = sorted(p.name for p in store.path.rglob("*"))
    code, out, err = _gc("--store", str(store.path))
    assert code == 0 and err == ""
    assert out.splitlines() == [
        f"would remove {store.path / '.z.999999.tmp'} (0 B): an interrupted run creation "
        "(process 999999 is gone)",
        f"would remove {store.path / 'never'} ({_size(store.path / 'never')}): a run that "
        "never committed a checkpoint (stopped before step 0)",
        f"would remove {ckpt / '.00000004.h5.999999.tmp'} (4 B): a temporary file of an "
        "interrupted write",
        f"would remove {ckpt / '00000002.h5.corrupt'} ({_size(ckpt / '00000002.h5.corrupt')}): "
        "a corrupt checkpoint, moved aside when it was replaced",
        f"would remove {ckpt / '00000009.h5'} (8 B): an unreadable checkpoint no index lists "
        "(Unable to synchronously open file (file signature not found))",
        f"would repair {run.path / 'run.h5'} (0 B): its index lists step 2 whose file is gone",
        f"6 item(s), {out.splitlines()[-1].split(', ')[1]}",
    ]
    assert sorted(p.name for p in store.path.rglob("*")) == before  # a report changes nothing
    code, out, _ = _gc("--store", str(store.path), "--yes")
    assert code == 0 and out.splitlines()[-1].startswith("6 of 6 cleaned up")
    assert [r.name for r in store.runs()] == ["r"]
    assert [s.step for s in store.run("r").steps()] == [0, 1, 3]
    assert sorted(p.name for p in ckpt.iterdir()) == ["00000000.h5", "00000001.h5", "00000003.h5"]
    assert _gc("--store", str(store.path))[1] == f"nothing to clean up in {store.path}\n"
    from conftest import assert_same_state

    assert_same_state(store.run("r").load(3), reference)


def _size(path) -> str:
    from mmnb.cli_gc import size_text

    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return size_text(sum(p.stat().st_size for p in files))


def test_browser_clean_up_in_two_clicks(store, micro):
    pytest.importorskip("ipywidgets")
    from mmnb.widgets import Browser

    run = mmnb.train("r", store=store, max_steps=2, **micro)
    stale = run.path / "ckpt" / ".00000003.h5.999999.tmp"
    stale.write_bytes(b"half")
    browser = Browser(store)
    try:
        assert browser.cleanup.confirm.layout.display == "none"
        items = browser.cleanup.ask()
        assert [i.path for i in items] == [stale] and stale.exists()
        assert (
            "clean up would remove" in browser.log.text()
            and "interrupted write" in browser.log.text()
        )
        assert browser.cleanup.confirm.layout.display == ""
        browser.cleanup.clean()
        assert not stale.exists() and browser.cleanup.confirm.layout.display == "none"
        assert "clean up: 1 item(s) done" in browser.log.text()
    finally:
        browser.close()
