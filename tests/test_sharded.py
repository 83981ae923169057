"""Sharded checkpoints (`mmnb.store.sharded`) under store format version 2: virtual datasets over
per-rank shard files, pinned by the checkpoint's manifest, read whole by plain h5py and in row
blocks by mmnb, and refused when they are not that layout.

The checkpoint is committed here through the store's one commit (`Run.commit` with `shards`),
the shard files written the way each rank writes its rows — no process group needed; the
torchrun jobs of tests/test_dist.py write them for real (FSDP2).
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from mmnb import api
from mmnb.store import CorruptCheckpoint, StoreError, h5guard
from mmnb.store.h5state import checksum, tensor_to_numpy
from mmnb.store.sharded import (
    ShardEntry,
    ShardLayoutError,
    TensorRef,
    add_virtual,
    load_lazy,
    pinned_blocks,
    shard_file_name,
    shard_source,
)
from mmnb.store.streamed import streamed_checkpoint

NAME = "model.embed_tokens.weight"  # rows split over two "ranks"


def _sharded_run(store, micro):
    """Run `sh`: step 0 of a micro run committed again with NAME as two shard files."""
    source = api.train("src", store=store, max_steps=1, **micro)
    state = source.load(0)
    whole = state["model"].pop(NAME)
    assert torch.equal(state["model"].pop("lm_head.weight"), whole)  # tied: linked below
    run = store.create_run("sh", source.config_dict(), source.tokenizer_json(), writer=True)
    folder = run.path / "ckpt"
    half = whole.shape[0] // 2 + 1  # uneven blocks, as FSDP2 makes them
    entries = []
    for rank, (start, stop) in enumerate([(0, half), (half, whole.shape[0])]):
        array = tensor_to_numpy(whole[start:stop])
        with h5py.File(folder / shard_file_name(0, rank), "w", libver="latest") as f:
            f.create_dataset(f"model/{NAME}", data=array)
        entry = ShardEntry(f"model/{NAME}", tuple(whole.shape), "float32", start, stop,
                           checksum(array))  # fmt: skip
        tied = ShardEntry("model/lm_head.weight", (), "", start, stop, "", link=f"model/{NAME}")
        entries.append([entry, tied])

    def virtual(f, manifest):
        add_virtual(f, manifest, 0, entries)
        return 0

    run.commit(state, ["start"], shards=virtual)
    return run, whole, half


def test_plain_h5py_and_mmnb_read_the_whole_tensor(store, micro):
    run, whole, _ = _sharded_run(store, micro)
    path = run.path / "ckpt" / "00000000.h5"
    with h5py.File(path, "r") as f:
        assert f[f"model/{NAME}"].is_virtual
        assert np.array_equal(f[f"model/{NAME}"][()], whole.numpy())
    state = run.load(0)  # every check of format version 2, every shard's checksum
    assert torch.equal(state["model"][NAME], whole)
    assert torch.equal(state["model"]["lm_head.weight"], whole)
    ref = store.run("src").load(0)
    for key in ref["model"]:
        assert torch.equal(state["model"][key], ref["model"][key]), key
    model, _ = api.load_model(run, 0)  # a one-process load of a sharded checkpoint
    assert torch.equal(model.state_dict()[NAME], whole)


def test_a_loader_reads_only_the_shards_its_rows_touch(store, micro):
    run, whole, half = _sharded_run(store, micro)
    with h5py.File(run.path / "ckpt" / shard_file_name(0, 1), "r+") as f:
        f[f"model/{NAME}"][0, 0] += 1.0  # rank 1's rows change; nothing else does
    ref = load_lazy(run, 0)["model"][NAME]
    assert isinstance(ref, TensorRef)
    assert torch.equal(ref.read((1, half)), whole[1:half])  # rank 0's rows only: fine
    with pytest.raises(CorruptCheckpoint, match="rank1.h5"):
        ref.read((half - 1, half + 1))
    with pytest.raises(CorruptCheckpoint, match="rank1.h5"):
        run.load(0)


def test_orphan_shards_and_deleted_checkpoints_leave_no_files(store, micro):
    run, _, _ = _sharded_run(store, micro)
    ckpt = run.path / "ckpt"
    (ckpt / shard_file_name(7, 0)).write_bytes(b"")  # a sharded commit of step 7 that died
    run.close_writer()
    run.open_writer()  # the next writer reconciles
    assert not (ckpt / shard_file_name(7, 0)).exists()
    assert (ckpt / shard_file_name(0, 1)).exists()  # a committed checkpoint's shards stay
    run.delete(0)
    assert sorted(p.name for p in ckpt.iterdir()) == []


@pytest.mark.parametrize(
    "name",
    ["../other/00000030.rank0.h5", "/etc/00000030.rank0.h5", "00000020.rank0.h5", "secrets.h5"],
)
def test_virtual_sources_outside_the_checkpoint_are_refused(tmp_path, name):
    """What `Run.load` asks of every virtual source before HDF5 may open it."""
    folder = tmp_path / "run" / "ckpt"
    folder.mkdir(parents=True)
    layout = h5py.VirtualLayout(shape=(7, 3), dtype=np.float32)
    layout[0:7] = h5py.VirtualSource(name, "/model/w", shape=(7, 3))
    path = folder / "00000030.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f.create_group("model").create_virtual_dataset("w", layout)
    with h5py.File(path, "r", locking=False) as f:
        with pytest.raises((ShardLayoutError, StoreError)):
            h5guard.check_dataset(
                f["model/w"], np.dtype(np.float32), (7, 3), path.stat().st_size,
                lambda n: shard_source(tmp_path, folder, n, 30),
            )  # fmt: skip


@pytest.mark.parametrize(
    "shards, match",
    [
        ([["00000030.rank0.h5", 0, 4, "0"]], "do not tile"),  # rows 4..6 would be fill values
        ([["00000030.rank0.h5", 0, 4, "0"], ["00000030.rank1.h5", 5, 7, "0"]], "do not tile"),
        ([["00000030.rank1.h5", 4, 7, "0"], ["00000030.rank0.h5", 0, 4, "0"]], "do not tile"),
        ([["secrets.h5", 0, 7, "0"]], "invalid"),
        ([["00000030.rank0.h5", 0, True, "0"]], "invalid"),
    ],
)
def test_pinned_blocks_must_tile_the_rows(shards, match):
    with pytest.raises(ShardLayoutError, match=match):
        pinned_blocks("model/w", {"shape": [7, 3], "shards": shards}, (7, 3))


def test_a_sharded_checkpoint_is_not_mapped_zero_copy(store, micro):
    run, _, _ = _sharded_run(store, micro)
    assert run.mapped(0) is None  # export falls back to a checked load
    assert streamed_checkpoint(run, 0) is None
