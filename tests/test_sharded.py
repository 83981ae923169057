"""Sharded checkpoint files (`mmnb.store.sharded`): virtual datasets over per-rank shards, read
whole by plain h5py and in row blocks by mmnb, and refused when they are not that layout.

The files are built here the way rank 0 and the shard writers build them (write_tree for each
rank's rows, add_virtual for the checkpoint file) — no process group needed; the torchrun jobs
of tests/test_dist.py write them for real.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mmnb.store.h5state import ChecksumError, read_tree, write_tree
from mmnb.store.sharded import (
    ShardEntry,
    ShardLayoutError,
    TensorRef,
    add_virtual,
    read_rows,
    shard_file_name,
)

STEP = 30
WEIGHT = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3)  # 7 rows over 2 ranks: 4 + 3


def _checkpoint(folder: Path) -> Path:
    """ckpt/00000030.h5 with `model/w` (virtual over two shards) and `model/b` (plain)."""
    entries = []
    for rank, (start, stop) in enumerate([(0, 4), (4, 7)]):
        with h5py.File(folder / shard_file_name(STEP, rank), "w", libver="latest") as f:
            write_tree(f, {"model": {"w": WEIGHT[start:stop].clone()}})
            digest = str(f["model/w"].attrs["xxh3"])
        entries.append([ShardEntry("model/w", (7, 3), "float32", start, stop, digest)])
    path = folder / f"{STEP:08d}.h5"
    with h5py.File(path, "w", libver="latest") as f:
        write_tree(f.create_group("model"), {"b": torch.ones(3)})
        add_virtual(f, STEP, entries)
    return path


def test_plain_h5py_reads_the_whole_tensor(tmp_path):
    path = _checkpoint(tmp_path)
    with h5py.File(path, "r") as f:
        assert f["model/w"].is_virtual
        assert np.array_equal(f["model/w"][()], WEIGHT.numpy())
    with h5py.File(path, "r", locking=False) as f:
        tree = read_tree(f["model"])  # mmnb's reader checks every shard's checksum
    assert torch.equal(tree["w"], WEIGHT) and torch.equal(tree["b"], torch.ones(3))


def test_a_loader_reads_only_the_shards_its_rows_touch(tmp_path):
    path = _checkpoint(tmp_path)
    (tmp_path / shard_file_name(STEP, 1)).unlink()  # rank 1's rows are not needed below
    ref = TensorRef(path, "/model/w", (7, 3), "float32")
    assert torch.equal(ref.read((1, 3)), WEIGHT[1:3])
    with pytest.raises(Exception, match="rank1.h5"):  # CorruptCheckpoint naming the shard
        ref.read((2, 6))


def test_a_flipped_bit_in_a_shard_is_found(tmp_path):
    path = _checkpoint(tmp_path)
    with h5py.File(tmp_path / shard_file_name(STEP, 1), "r+") as f:
        f["model/w"][0, 0] = 99.0  # the data changes, its checksum attribute does not
    with h5py.File(path, "r", locking=False) as f:
        with pytest.raises(ChecksumError, match="rank1"):
            read_rows(f["model/w"])
        assert np.array_equal(read_rows(f["model/w"], (0, 4)), WEIGHT[:4].numpy())


def _virtual(path: Path, sources: list[tuple[str, int, int]], shards_attr: list | None = None):
    """A checkpoint file whose `model/w` maps rows to (file, start, stop) as given."""
    layout = h5py.VirtualLayout(shape=(7, 3), dtype=np.float32)
    for name, start, stop in sources:
        layout[start:stop] = h5py.VirtualSource(name, "/model/w", shape=(stop - start, 3))
    with h5py.File(path, "w", libver="latest") as f:
        ds = f.require_group("model").create_virtual_dataset("w", layout)
        ds.attrs["dtype"] = "float32"
        pinned = shards_attr if shards_attr is not None else [[*s, "0"] for s in sources]
        ds.attrs["shards"] = __import__("json").dumps(pinned)


@pytest.mark.parametrize(
    "sources, match",
    [
        ([("../other/00000030.rank0.h5", 0, 7)], "not a shard of step 30"),
        ([("/etc/00000030.rank0.h5", 0, 7)], "not a shard of step 30"),
        ([("00000020.rank0.h5", 0, 7)], "not a shard of step 30"),
        ([("secrets.h5", 0, 7)], "not a shard of step 30"),
        ([("00000030.rank0.h5", 0, 4)], "do not tile"),  # rows 4..6 would be fill values
        ([("00000030.rank0.h5", 0, 4), ("00000030.rank1.h5", 5, 7)], "do not tile"),
    ],
)
def test_virtual_sources_outside_the_layout_are_refused(tmp_path, sources, match):
    _checkpoint(tmp_path)  # the genuine shards are there; the crafted file points elsewhere
    path = tmp_path / f"{STEP:08d}.h5"
    _virtual(path, sources)
    with h5py.File(path, "r", locking=False) as f, pytest.raises(ShardLayoutError, match=match):
        read_rows(f["model/w"])


def test_virtual_dataset_must_agree_with_its_pinned_shards(tmp_path):
    _checkpoint(tmp_path)
    path = tmp_path / f"{STEP:08d}.h5"
    sources = [("00000030.rank0.h5", 0, 4), ("00000030.rank1.h5", 4, 7)]
    _virtual(path, sources, shards_attr=[["00000030.rank1.h5", 0, 7, "0"]])
    with (
        h5py.File(path, "r", locking=False) as f,
        pytest.raises(ShardLayoutError, match="disagree"),
    ):
        read_rows(f["model/w"])
    # Right layout, wrong pinned checksum: the file on disk is not the one committed.
    _virtual(path, sources, shards_attr=[[*s, "0123456789abcdef"] for s in sources])
    with h5py.File(path, "r", locking=False) as f, pytest.raises(ChecksumError):
        read_rows(f["model/w"])
