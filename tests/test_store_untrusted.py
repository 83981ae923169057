"""A store is untrusted input: names, links and special files never lead outside it.

Every malicious store here is refused with one StoreError naming the file, and (where strace
runs) no file outside the store is ever opened.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import h5py
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


def test_damaged_run_files_hide_no_intact_run(victim, capsys):
    store, _ = victim
    for name in ("t", "e", "m"):
        mmnb.branch("r", 1, name, store=store, start=False)
    runfile = {n: store.path / n / "run.h5" for n in ("t", "e", "m")}
    runfile["t"].write_bytes(runfile["t"].read_bytes()[:100])  # truncated
    runfile["e"].write_bytes(b"")  # empty
    runfile["m"].write_bytes(b"\x89HDF\r\n\x1a\n" + b"\xff" * 500)  # malformed
    assert main(["runs", "--store", str(store.path)]) == 0
    out, err = capsys.readouterr()
    assert [line.split()[0] for line in out.splitlines()] == ["r"]
    assert sorted(err.splitlines()) == [
        f"mmnb: warning: run file {runfile[n]} is unreadable or corrupt ({why}); skipping run {n}"
        for n, why in sorted(_why(runfile).items())
    ]
    pytest.importorskip("ipywidgets")
    from mmnb.widgets import Browser

    browser = Browser(store)
    try:
        assert [value for _, value in browser.runs.options] == ["r"]
        assert all(f"skipping run {n}" in browser.log.text() for n in runfile)
    finally:
        browser.close()


def _why(runfile):
    """What HDF5 says about each damaged file (the reason in the warning)."""
    out = {}
    for name, path in runfile.items():
        try:
            h5py.File(path, "r").close()
        except OSError as err:
            out[name] = str(err)
    return out


def test_symlinked_run_folder_is_skipped(victim, tmp_path):
    store, outside = victim
    (store.path / "r").rename(outside / "r")
    (store.path / "r").symlink_to(outside / "r")
    with pytest.warns(UserWarning, match="run folder .*r is a symlink, not a folder; refused"):
        assert store.runs() == []
    with pytest.raises(StoreError, match="is a symlink"):
        store.run("r")


# ---- crafted stores: each refused, and nothing outside the store is ever opened ----

BAITS = ("bait.h5", "bait.bin", "precious")
NORM = "model/model.norm.weight"  # a (32,) float32 dataset of the micro model


def _ckpt(store_path, step=2):
    return store_path / "r" / "ckpt" / f"{step:08d}.h5"


def _reseal(store_path, changes: dict, step: int = 2) -> None:
    """What an attacker can do: make the manifest describe the crafted datasets and recompute
    every checksum (manifest and run index), so only mmnb's structural checks stand between
    the store and the files it points at."""
    import json

    from mmnb.store.h5state import checksum
    from mmnb.store.runfile import read_run_file, write_run_file

    path = _ckpt(store_path, step)
    with h5py.File(path, "r+") as f:
        manifest = json.loads(f.attrs["manifest"])
        for key, entry in changes.items():
            manifest["datasets"][key].update(entry)
        text = json.dumps(manifest)
        f.attrs["manifest"] = text
        f.attrs["manifest_xxh3"] = checksum(text)
    meta, index = read_run_file(store_path / "r" / "run.h5", "r")
    for info in index:
        if info.step == step:
            info.checksum = checksum(text)
    write_run_file(store_path / "r", meta, index)


def _raw_run_file(store_path, edit) -> None:
    """Rewrite run.h5's attributes through `edit(raw)`, with a valid checksum."""
    from mmnb.store.h5state import checksum
    from mmnb.store.runfile import _canonical

    path = store_path / "r" / "run.h5"
    with h5py.File(path, "r") as f:
        raw = {k: f.attrs[k] for k in f.attrs}
    raw = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()}
    edit(raw)
    raw["xxh3"] = checksum(_canonical({k: _plain(v) for k, v in raw.items()}))
    path.unlink()
    with h5py.File(path, "w", libver="latest") as f:
        for key, value in raw.items():
            f.attrs[key] = value


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _edit_index(store_path, edit) -> None:
    import json

    def change(raw):
        entries = json.loads(raw["index"])
        raw["index"] = edit(entries)

    _raw_run_file(store_path, change)


def _external_link(s, out):
    with h5py.File(_ckpt(s), "r+") as f:
        del f[NORM]
        f[NORM] = h5py.ExternalLink(str(out / "bait.h5"), "/w")


def _external_storage(s, out):
    import numpy as np

    from mmnb.store.h5state import checksum

    with h5py.File(_ckpt(s), "r+") as f:
        del f[NORM]
        f.create_dataset(NORM, (32,), "<f4", external=[(str(out / "bait.bin"), 0, 128)])
        f[NORM].attrs["dtype"] = "float32"
    _reseal(s, {NORM: {"xxh3": checksum(np.fromfile(out / "bait.bin", "<f4"))}})


def _virtual_outside(s, out):
    import numpy as np

    from mmnb.store.h5state import checksum

    layout = h5py.VirtualLayout((32,), "<f4")
    # relative to the checkpoint's folder, as HDF5 resolves it: ../../../outside/bait.h5
    source = os.path.relpath(out / "bait.h5", _ckpt(s).parent)
    layout[:] = h5py.VirtualSource(source, "w", (32,))
    with h5py.File(_ckpt(s), "r+", libver="latest") as f:
        del f[NORM]
        f.create_virtual_dataset(NORM, layout)
    _reseal(s, {NORM: {"xxh3": checksum(np.fromfile(out / "bait.bin", "<f4"))}})


def _index_file_outside(s, out):
    def edit(entries):
        import json

        entries[-1]["file"] = "../../outside/bait.h5"
        return json.dumps(entries)

    _edit_index(s, edit)


def _duplicate_index_entry(s, out):
    import json

    _edit_index(s, lambda entries: json.dumps(entries + [entries[-1]]))


def _duplicate_index_key(s, out):
    import json

    _edit_index(s, lambda entries: json.dumps(entries)[:-2] + ', "step": 1}]')


def _unknown_index_key(s, out):
    import json

    _edit_index(s, lambda entries: json.dumps([{**e, "evil": 1} for e in entries]))


def _memory_bomb(s, out):
    with h5py.File(_ckpt(s), "r+") as f:
        del f[NORM]
        f.create_dataset(NORM, (2**40,), "<f4")  # 4 TiB declared, nothing stored
        f[NORM].attrs["dtype"] = "float32"
    _reseal(s, {NORM: {"shape": [2**40]}})


def _non_finite_weights(s, out):
    import numpy as np

    from mmnb.store.h5state import checksum

    nan = np.full(32, np.nan, "<f4")  # never committed by mmnb: crafted, under valid checksums
    with h5py.File(_ckpt(s), "r+") as f:
        f[NORM][...] = nan
        f[NORM].attrs["xxh3"] = checksum(nan)
    _reseal(s, {NORM: {"xxh3": checksum(nan)}})


def _link_cycle(s, out):
    with h5py.File(_ckpt(s), "r+") as f:
        f["model/loop"] = f["model"]  # a hard link to its own parent group


def _attr_of_another_type(s, out):
    with h5py.File(_ckpt(s), "r+") as f:
        f.attrs["summary"] = [1, 2, 3]


def _run_attr_of_another_type(s, out):
    _raw_run_file(s, lambda raw: raw.update(created="yesterday"))


def _newer_format(s, out):
    _raw_run_file(s, lambda raw: raw.update(format_version=3))


def _symlinked_run_folder(s, out):
    shutil.copytree(s / "r", out / "r")
    shutil.rmtree(s / "r")
    (s / "r").symlink_to(out / "r")


def _symlinked_lock(s, out):
    (s / "r" / "LOCK").unlink(missing_ok=True)
    (s / "r" / "LOCK").symlink_to(out / "precious")


def _fifo_lock(s, out):
    (s / "r" / "LOCK").unlink(missing_ok=True)
    os.mkfifo(s / "r" / "LOCK")


# case → (craft, what the StoreError says, the attempts that must be refused)
CKPT, INDEX, LOCK = ("load", "mapped", "streamed"), ("steps", "load", "writer"), ("writer",)
MALICIOUS = {
    "external link": (_external_link, "is an external link; refused", CKPT),
    "external raw storage": (_external_storage, "keeps its data in an external file", CKPT),
    "virtual dataset to outside": (_virtual_outside, "lies outside the store; refused", CKPT),
    "index file outside": (_index_file_outside, "listed at '../../outside/bait.h5', not", INDEX),
    "duplicated index entry": (_duplicate_index_entry, "the index lists a step twice", INDEX),
    "duplicated index key": (_duplicate_index_key, "duplicate key 'step'", INDEX),
    "unknown index key": (_unknown_index_key, "unknown key 'evil'", INDEX),
    "memory bomb": (_memory_bomb, "[1099511627776]; the config implies float32 [32]", CKPT),
    "non-finite weights": (_non_finite_weights, "norm.weight holds non-finite values", CKPT),
    "link cycle": (_link_cycle, "is reached twice (a link cycle); refused", CKPT),
    "attribute of another type": (_attr_of_another_type, "'summary' of / is not a scalar", CKPT),
    "run attribute of another type": (
        _run_attr_of_another_type,
        "'created' of / has the wrong type",
        INDEX,
    ),
    "newer format": (_newer_format, "format version 3; this mmnb reads versions up to 2", INDEX),
    "symlinked run folder": (_symlinked_run_folder, "is a symlink, not a folder; refused", INDEX),
    "symlinked LOCK": (_symlinked_lock, "LOCK is a symlink, not a regular file; refused", LOCK),
    "FIFO LOCK": (_fifo_lock, "LOCK is a FIFO, not a regular file; refused", LOCK),
}

# Loads every crafted store the ways a user would (API, CLI listing, opening for writing) and
# prints one JSON line per store. The marker open tells the audit where loading begins.
AUDIT_CHILD = r"""
import contextlib, io, json, sys, warnings
from mmnb.cli import main
from mmnb.store import Store, StoreError
from mmnb.store.streamed import streamed_checkpoint

warnings.simplefilter("ignore")
cases = json.loads(sys.argv[1])
try:
    open("/mmnb-audit-start")
except OSError:
    pass
for case, path in cases.items():
    said = []
    for attempt in ("steps", "load", "writer", "mapped", "streamed", "cli"):
        try:
            if attempt == "cli":
                err = io.StringIO()
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    main(["runs", "--store", path])
                said.append(err.getvalue())
                continue
            run = Store(path).run("r")
            if attempt == "steps":
                run.steps()
            elif attempt == "load":
                run.load(2)
            elif attempt == "mapped":  # the zero-copy reader of mmnb export --format minimind
                run.mapped(2)
            elif attempt == "streamed":  # export --format hf: every chunk, as a writer takes it
                for source in (streamed_checkpoint(run, 2) or {}).values():
                    for _ in source.chunks():
                        pass
            else:
                run.open_writer()
                run.close_writer()
            said.append(f"{attempt}: accepted")
        except StoreError as err:
            said.append(f"{attempt}: StoreError: {err}")
        except BaseException as err:
            said.append(f"{attempt}: {type(err).__name__}: {err}")
    print(json.dumps({"case": case, "said": said}), flush=True)
"""


def _allowed_prefixes() -> list[str]:
    import site
    import sysconfig

    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages()}
    paths |= {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths |= {os.path.dirname(os.path.dirname(mmnb.__file__)), "/proc", "/sys", "/dev"}
    paths |= {os.environ.get("MMNB_CACHE", "/nonexistent")}
    return [os.path.realpath(p) for p in paths]


def test_malicious_stores_are_refused_and_nothing_outside_is_opened(tmp_path, base):
    import json

    import numpy as np

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("precious\n")
    bait = np.arange(32, dtype="<f4") + 1000
    bait.tofile(outside / "bait.bin")
    with h5py.File(outside / "bait.h5", "w") as f:
        f["w"] = bait
    stores = {}
    for i, (case, (craft, _, _)) in enumerate(MALICIOUS.items()):
        path = tmp_path / f"s{i:02d}"
        shutil.copytree(base, path, symlinks=True)
        craft(path, outside)
        stores[case] = str(path)
    before = {p.name: p.stat().st_mtime_ns for p in outside.iterdir()}

    strace = shutil.which("strace")
    log = tmp_path / "strace.log"
    command = [sys.executable, "-c", AUDIT_CHILD, json.dumps(stores)]
    if strace:
        command = [strace, "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(log)]
        command += ["--seccomp-bpf", sys.executable, "-c", AUDIT_CHILD, json.dumps(stores)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if strace and proc.returncode != 0 and "ptrace" in proc.stderr:
        strace = None  # no ptrace in this container: run the checks without the audit
        proc = subprocess.run(command[command.index(sys.executable) :], capture_output=True,
                              text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["case"]: r["said"] for r in map(json.loads, proc.stdout.splitlines())}
    assert results.keys() == MALICIOUS.keys()
    for case, (_, message, refused) in MALICIOUS.items():
        attempts = ("steps", "load", "writer", "mapped", "streamed", "cli")
        said = dict(zip(attempts, results[case], strict=True))
        for attempt in refused:
            assert said[attempt].startswith(f"{attempt}: StoreError: "), (case, said)
        assert message in " ".join(said[a] for a in refused), (case, message, said)
        for attempt in attempts[:-1]:  # a StoreError or fine, nothing else
            assert said[attempt].split(": ")[1] in ("StoreError", "accepted"), (case, said)
        cli = said["cli"]  # `mmnb runs`: the damaged run is named and skipped, no traceback
        if refused != CKPT:
            assert cli.startswith("mmnb: warning: ") and "skipping" in cli, (case, cli)
        assert all(line.startswith("mmnb: warning: ") for line in cli.splitlines()), (case, cli)
    assert (outside / "precious").read_text() == "precious\n"
    assert {p.name: p.stat().st_mtime_ns for p in outside.iterdir()} == before
    if not strace:
        pytest.skip("strace is not available: refusals checked, file-open audit not run")
    opened = _opened_after_marker(log.read_text())
    allowed = _allowed_prefixes() + [os.path.realpath(tmp_path)]
    outside_real = os.path.realpath(outside)
    bad = []
    for path in opened:
        real = os.path.realpath(path)
        if os.path.basename(path) in BAITS or real.startswith(outside_real):
            bad.append(path)
        elif not any(real == p or real.startswith(p + os.sep) for p in allowed):
            bad.append(path)
    assert opened and not bad, bad


def _opened_after_marker(log: str) -> list[str]:
    """Paths of every open/openat in the strace log after the child's marker open."""
    import re

    paths, started = [], False
    for line in log.splitlines():
        match = re.search(r'open(?:at2?)?\((?:[^,]+, )?"((?:[^"\\]|\\.)*)"', line)
        if not match:
            continue
        path = match.group(1)
        if path == "/mmnb-audit-start":
            started = True
        elif started:
            paths.append(path)
    return paths
