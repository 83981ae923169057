"""The HDF5 store: layout, bit-exact round trips, corruption, locking, branching, retention."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch

import mmnb
from conftest import assert_same_state
from mmnb.store import CorruptCheckpoint, Store, StoreError, read_tree, write_tree
from mmnb.store.h5guard import collect
from mmnb.store.image import SparseImage, write_file
from mmnb.store.schema import TORCH_STORAGE, Rule


@pytest.mark.parametrize("writer", ["hdf5", "image"])
def test_tree_round_trip_is_bit_exact(tmp_path, writer):
    tree = {
        "bf16": torch.randn(5, 3).to(torch.bfloat16),
        "f32": torch.randn(4),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(7),
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0, 3),
        "u8": torch.get_rng_state(),
        "np": np.arange(5, dtype=np.uint32),
        "nested": {"a": 1, "b": [1, 2, "x"], "c": None, "t": torch.ones(2), "e": {}},
        "text": "héllo",
    }
    tree["tied"] = tree["f32"]  # shares storage: stored once, as a hard link
    manifest = {"groups": {"g": None}, "datasets": {}}
    path = tmp_path / "t.h5"
    if writer == "hdf5":
        with h5py.File(path, "w") as f:
            write_tree(f.create_group("g"), tree, manifest, prefix="g/")
    else:  # HDF5 lays the file out in memory, mmnb writes the bytes
        image, raw = SparseImage(), []
        with h5py.File(image, "w", libver="latest") as f:
            sink = lambda offset, array: raw.append((offset, array))  # noqa: E731
            write_tree(f.create_group("g"), tree, manifest, sink=sink, prefix="g/")
        write_file(path, image, raw)
        assert raw and sum(a.nbytes for _, a in raw) > 5000

    def rule(p, entry):
        if "torch" in entry:
            return Rule(TORCH_STORAGE[entry["torch"]], tuple(entry["shape"]), entry["torch"])
        return Rule(np.dtype(entry["numpy"]), tuple(entry["shape"]), None)

    with h5py.File(path, "r") as f:
        back = read_tree(collect(f, "g"), manifest, "g", rule, path.stat().st_size)
        assert f["g/bf16"].dtype == np.uint16 and f["g/bf16"].attrs["dtype"] == "bfloat16"
        assert f["g/tied"].id == f["g/f32"].id  # one dataset, two names
    for key in ("bf16", "f32", "f16", "i64", "scalar", "u8", "empty", "tied"):
        assert back[key].dtype == tree[key].dtype
        assert torch.equal(back[key], tree[key]), key
    assert np.array_equal(back["np"], tree["np"])
    assert back["nested"]["b"] == [1, 2, "x"] and back["nested"]["c"] is None
    assert torch.equal(back["nested"]["t"], torch.ones(2)) and back["nested"]["e"] == {}
    assert back["text"] == "héllo"


@pytest.fixture
def trained(store, micro):
    run = mmnb.train("r", store=store, max_steps=6, save_every=2, schedule="constant", **micro)
    return store, run


def test_layout_is_plain_hdf5(trained):
    store, run = trained
    assert [s.step for s in run.steps()] == [0, 2, 4, 6]
    with h5py.File(run.run_file, "r") as f:
        assert f.attrs["format_version"] == 2
        config = json.loads(f.attrs["config"])
        assert config["train"]["max_steps"] == 6
        assert json.loads(f.attrs["parent"]) is None
        assert "<|im_start|>" in f.attrs["tokenizer"]
        assert list(f["steps"]) == ["00000000", "00000002", "00000004", "00000006"]
        emb = f["steps/00000004/model/model.embed_tokens.weight"]
        assert emb.shape == (300, 32) and "xxh3" in emb.attrs
        for group in ("optim", "schedule", "rng", "data", "trainer", "metrics"):
            assert group in f["steps/00000004"], group
        assert f["steps/00000004/metrics/loss"].shape == (4,)
        assert "exp_avg" in f["steps/00000004/optim/state/model.embed_tokens.weight"]


def test_metadata_reads_no_tensor(trained, monkeypatch):
    store, run = trained
    monkeypatch.setattr(h5py.Dataset, "__getitem__", _forbidden)
    steps = store.run("r").steps()
    assert [s.step for s in steps] == [0, 2, 4, 6]
    assert steps[-1].epoch == 0 and steps[-1].loss is not None
    assert store.run("r").status() == "finished"


def _forbidden(*args, **kwargs):
    raise AssertionError("a dataset was read")


def test_load_round_trips_the_trainer_state(trained):
    store, run = trained
    state = run.load()
    assert state["trainer"]["step"] == 6
    live = run.trainer.state_dict()
    assert_same_state(state, live)
    assert torch.equal(state["rng"]["torch"], live["rng"]["torch"])


def _flip_byte_in(path, dataset):
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset()
    with open(path, "r+b") as fh:
        fh.seek(offset + 5)
        byte = fh.read(1)
        fh.seek(offset + 5)
        fh.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("damage", ["bitflip", "truncate"])
def test_corrupt_checkpoint_is_reported_and_skipped(trained, damage):
    store, run = trained
    path = run.path / run.step_info(6).file
    if damage == "bitflip":
        _flip_byte_in(path, "model/model.layers.0.mlp.up_proj.weight")
    else:
        os.truncate(path, path.stat().st_size // 2)
    with pytest.warns(UserWarning, match=str(path.name)):
        state = run.load()
    assert state["trainer"]["step"] == 4  # the older checkpoint still loads
    with pytest.raises(CorruptCheckpoint, match="00000006"):
        run.load(6)


def test_second_writer_is_refused(trained):
    store, _ = trained
    first, second = store.run("r"), store.run("r")
    first.open_writer()
    try:
        with pytest.raises(StoreError, match="being written by another trainer"):
            second.open_writer()
        assert second.status() == "training"
        assert [s.step for s in second.steps()] == [0, 2, 4, 6]  # readers never block
    finally:
        first.close_writer()
    second.open_writer()
    second.close_writer()


def test_branch_shares_history_and_leaves_parent_untouched(trained, micro):
    store, run = trained
    parent_files = {p: p.stat().st_mtime_ns for p in run.path.rglob("*")}
    a = mmnb.branch("r", 4, "a", store=store, lr=1e-3, max_steps=9)
    b = mmnb.branch("r", 4, "b", store=store, lr=1e-3, max_steps=9)
    assert a.parent == ("r", 4)
    assert [s.step for s in a.steps()] == [0, 2, 4, 6, 8, 9]
    assert [s.run for s in a.steps()] == ["r", "r", "r", "a", "a", "a"]
    assert not any(
        p.name.startswith("0000000") for p in (a.path / "ckpt").iterdir() if int(p.stem) <= 4
    )
    assert_same_state(a.load(), b.load())
    assert a.load()["metrics"]["lr"][-1] != run.load()["metrics"]["lr"][-1]
    assert {p: p.stat().st_mtime_ns for p in run.path.rglob("*")} == parent_files
    with h5py.File(a.run_file, "r") as f:  # the inherited steps are reachable from the branch
        assert f["steps/00000002/trainer"].attrs["json"]


def test_branch_with_other_data_starts_a_stage(trained, tmp_path):
    store, _ = trained
    from mmnb.corpus import CHAT_PATH

    sft = mmnb.branch("r", 6, "sft", store=store, data=str(CHAT_PATH), epochs=1)
    state = sft.load()
    assert state["schedule"]["plan"]["start"] == 6
    assert json.loads(h5py.File(sft.run_file, "r").attrs["config"])["train"]["data"] == str(
        CHAT_PATH
    )
    assert sft.latest().epoch == 1


def test_changed_trajectory_field_on_resume_is_refused(trained):
    store, _ = trained
    for field in ("batch_size", "seed", "data", "hidden_size"):
        with pytest.raises(ValueError, match=field):
            mmnb.resume("r", store=store, **{field: 8})
    with pytest.raises(ValueError, match="hidden_size changes the model"):
        mmnb.branch("r", 4, "x", store=store, hidden_size=64)
    assert [r.name for r in store.runs()] == ["r"]


def test_retention_keeps_newest_and_branch_points(store, micro):
    run = mmnb.train("k", store=store, max_steps=10, save_every=1, keep_last=2, **micro)
    # step 0 is the plan's start and 8 its decay start (an extension continues from there)
    assert [s.step for s in run.steps()] == [0, 8, 9, 10]
    run2 = mmnb.train("k2", store=store, max_steps=4, save_every=1, start=False, **micro)
    mmnb.resume("k2", store=store, stop_at=3)
    mmnb.branch("k2", 3, "child", store=store, start=False)
    mmnb.resume("k2", store=store, keep_last=1)
    # child lists k2's steps 0-3 as its history (3 is its branch point): none is deleted
    assert [s.step for s in run2.steps()] == [0, 1, 2, 3, 4]


def test_unknown_run_and_step(trained):
    store, run = trained
    with pytest.raises(StoreError, match="no run named 'nope'"):
        store.run("nope")
    with pytest.raises(StoreError, match="no checkpoint at step 5"):
        run.load(5)
    with pytest.raises(StoreError, match="already exists"):
        mmnb.train("r", store=store, max_steps=1)


def test_runs_lists_store(trained):
    store, _ = trained
    mmnb.branch("r", 2, "child", store=store, start=False)
    assert [(r.name, r.parent) for r in Store(store.path).runs()] == [
        ("child", ("r", 2)),
        ("r", None),
    ]


def test_non_finite_state_is_never_committed(trained):
    store, run = trained
    state = run.load(6)
    state["trainer"]["step"] = 7
    state["optim"]["state"]["model.norm.weight"]["exp_avg"][3] = float("inf")
    files = sorted(p.name for p in (run.path / "ckpt").iterdir())
    run.open_writer()
    try:
        with pytest.raises(StoreError, match="refusing to checkpoint step 7: optim.model.norm"):
            run.commit(state, ["requested"])
    finally:
        run.close_writer()
    assert sorted(p.name for p in (run.path / "ckpt").iterdir()) == files
    assert [s.step for s in run.steps()] == [0, 2, 4, 6]


def test_json_in_and_out_is_standard(trained, capsys):
    from mmnb.cli import main
    from mmnb.store import jsonio

    nan, inf = float("nan"), float("inf")
    assert (
        jsonio.dumps({"loss": nan, "x": [inf, 1.5, -inf]})
        == '{"loss": null, "x": [null, 1.5, null]}'
    )
    with pytest.raises(ValueError, match="not JSON compliant"):
        jsonio.dumps_state({"lr": nan})  # state: an error, never written
    for text, why in (('{"a": NaN}', "NaN"), ('{"a": 1, "a": 2}', "duplicate key 'a'")):
        with pytest.raises(ValueError, match=why):
            jsonio.loads(text)
    store, _ = trained
    assert main(["runs", "--store", str(store.path), "--json"]) == 0
    rows = jsonio.loads(capsys.readouterr().out)["runs"]  # strict: no NaN/Infinity in it
    assert [row["name"] for row in rows] == ["r"]


def _rewrite_json(path, group, edit):
    """Change one JSON value of a checkpoint in place, as a flipped bit would."""
    with h5py.File(path, "r+") as f:
        values = json.loads(f[group].attrs["json"])
        edit(values)
        f[group].attrs["json"] = json.dumps(values)


def test_json_values_are_under_a_checksum(trained):
    store, run = trained
    path = run.path / run.step_info(6).file
    _rewrite_json(path, "data", lambda v: v.update(position=v["position"] - 4))
    with pytest.warns(UserWarning, match="checksum mismatch in the json attribute of /data"):
        assert run.load()["trainer"]["step"] == 4
    with pytest.raises(CorruptCheckpoint, match="00000006.h5 is unreadable or corrupt"):
        run.load(6)


def test_resume_recomputes_and_replaces_a_corrupt_newest_checkpoint(trained):
    store, run = trained
    original = run.load(6)
    path = run.path / run.step_info(6).file
    _flip_byte_in(path, "optim/state/model.norm.weight/exp_avg")
    events = []
    with pytest.warns(UserWarning, match="00000006.h5.*trying an older checkpoint"):
        mmnb.resume("r", store=store, listeners=[events.append])
    assert (path.parent / "00000006.h5.corrupt").is_file()  # kept aside for inspection
    notes = [e.info["text"] for e in events if e.kind == "notice"]
    assert notes == [f"checkpoint {path} was corrupt; moved to 00000006.h5.corrupt and rewritten"]
    assert [s.step for s in run.steps()] == [0, 2, 4, 6]
    assert "end" in run.step_info(6).reasons and "repair" not in run.step_info(6).reasons
    assert_same_state(run.load(6), original)


def _to_version_1(root):
    """Turn a store into exactly what format version 1 wrote: no manifests, no index checksum."""
    for path in root.rglob("ckpt/*.h5"):
        with h5py.File(path, "r+") as f:
            del f.attrs["manifest"], f.attrs["manifest_xxh3"]
            f.attrs["format_version"] = 1
    for path in root.rglob("run.h5"):
        with h5py.File(path, "r+") as f:
            del f.attrs["xxh3"]
            f.attrs["format_version"] = 1
            index = json.loads(f.attrs["index"])
            f.attrs["index"] = json.dumps(
                [{k: v for k, v in e.items() if k != "checksum"} for e in index]
            )


def test_version_1_store_is_read_and_continued(trained):
    store, run = trained
    mmnb.branch("r", 4, "b", store=store, lr=1e-3, max_steps=7, start=False)
    expected = run.load(6)
    _to_version_1(store.path)
    with h5py.File(run.run_file) as f:
        assert f.attrs["format_version"] == 1 and "xxh3" not in f.attrs
    assert [s.step for s in store.run("r").steps()] == [0, 2, 4, 6]
    assert_same_state(store.run("r").load(6), expected)
    b = mmnb.resume("b", store=store)  # version-1 history, version-2 commits
    assert [s.step for s in b.steps()] == [0, 2, 4, 6, 7]
    with h5py.File(b.run_file) as f:
        assert f.attrs["format_version"] == 2 and "xxh3" in f.attrs
    with h5py.File(b.path / b.step_info(7).file) as f:
        assert f.attrs["format_version"] == 2
    with h5py.File(b.path / b.step_info(4).file) as f:
        assert f.attrs["format_version"] == 1
    assert b.load(7)["trainer"]["step"] == 7 and b.load(4)["trainer"]["step"] == 4


def test_newer_format_versions_are_refused_naming_both(trained):
    store, run = trained
    with h5py.File(run.path / run.step_info(6).file, "r+") as f:
        f.attrs["format_version"] = 3
    with pytest.raises(
        CorruptCheckpoint, match="format version 3; this mmnb reads versions up to 2"
    ):
        run.load(6)
    with h5py.File(run.run_file, "r+") as f:
        f.attrs["format_version"] = 7
    with pytest.raises(StoreError, match="format version 7; this mmnb reads versions up to 2"):
        store.run("r").steps()
