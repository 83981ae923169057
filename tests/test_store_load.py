"""Zero-copy loads: a checkpoint's tensors are copy-on-write views of its file, verified."""

from __future__ import annotations

import gc
import sys

import h5py
import numpy as np
import pytest
import torch

import mmnb
from mmnb.store import CorruptCheckpoint
from mmnb.store.lazy import LazyDict, resolved

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")


@pytest.fixture
def trained(store, micro):
    run = mmnb.train("r", store=store, max_steps=2, save_every=2, **micro)
    return run, run.path / run.step_info(2).file


def _mapped_ranges(path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of `path`."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == str(path.resolve()):
                lo, hi = fields[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _tensors(state) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v for k, v in state["model"].items()}
    for name, slots in state["optim"]["state"].items():
        out.update({f"optim/state/{name}/{k}": v for k, v in slots.items()})
    return out


def _inside(tensor: torch.Tensor, ranges) -> bool:
    return any(lo <= tensor.data_ptr() < hi for lo, hi in ranges)


def test_load_maps_the_file_and_equals_a_copied_read(trained):
    run, path = trained
    state = run.load(2)
    ranges = _mapped_ranges(path)
    assert ranges, "the checkpoint file is not mapped"
    tensors = _tensors(state)
    with h5py.File(path, "r") as f:  # plain h5py, copying
        for name, tensor in tensors.items():
            copied = torch.from_numpy(np.asarray(f[name][()]))
            assert torch.equal(tensor, copied), name
            if tensor.nbytes >= 512:  # every tensor of real size is a view of the file
                assert _inside(tensor, ranges), name
                assert tensor.data_ptr() % 64 == 0, name  # aligned as the writer lays it out


def test_loaded_tensors_are_private_copy_on_write(trained):
    run, path = trained
    before = path.read_bytes()
    state = run.load(2)
    weight = state["model"]["model.layers.0.mlp.up_proj.weight"]
    original = weight.clone()
    weight.add_(1.0)  # writable, as any loaded state dict
    assert path.read_bytes() == before  # the file never changes
    again = run.load(2)["model"]["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(again, original)
    assert not torch.equal(weight, original)


def test_flipped_byte_in_a_mapped_tensor_is_detected(trained):
    run, path = trained
    name = "model/model.layers.0.mlp.up_proj.weight"
    original = run.load(2)["model"][name.removeprefix("model/")].clone()
    with h5py.File(path, "r") as f:
        offset = f[name].id.get_offset()
    with open(path, "r+b") as fh:  # a mantissa bit of the second value
        fh.seek(offset + 5)
        byte = fh.read(1)
        fh.seek(offset + 5)
        fh.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CorruptCheckpoint, match=r"checksum mismatch in /model/model\.layers\.0"):
        run.load(2)
    unverified = run.load(2, verify=False)["model"][name.removeprefix("model/")]
    assert not torch.equal(unverified, original)  # the view shows the file's bytes


def test_resumed_trainer_owns_its_state(trained):
    run, path = trained
    state = run.load(2)
    ranges = _mapped_ranges(path)
    trainer = run.trainer
    trainer.load_state_dict(state)
    del state
    for group in trainer.optimizer.state.values():
        for value in group.values():
            assert not _inside(value, ranges)  # training never keeps the file mapped
    for tensor in trainer.model.state_dict().values():
        assert not _inside(tensor, ranges)


def _flip(path, name: str, at: int = 5) -> None:
    with h5py.File(path, "r") as f:
        offset = f[name].id.get_offset()
    with open(path, "r+b") as fh:  # a mantissa bit of the second value
        fh.seek(offset + at)
        byte = fh.read(1)
        fh.seek(offset + at)
        fh.write(bytes([byte[0] ^ 0x10]))


def test_lazy_load_equals_an_up_front_one_and_feeds_torch(trained):
    run, _ = trained
    eager = run.load(2)
    lazy = run.load(2, verify="lazy")
    assert isinstance(lazy["model"], LazyDict)
    assert lazy["model"].unverified() == len(eager["model"])  # nothing read yet
    assert lazy["trainer"] == eager["trainer"]  # JSON groups are plain, checked at load
    plain = resolved(lazy)
    assert lazy["model"].unverified() == 0
    for name, tensor in _tensors(eager).items():
        assert torch.equal(_tensors(plain)[name], tensor), name
    # torch's own loaders take the lazy groups (each tensor verified as they take it)
    trainer = run.trainer
    fresh = run.load(2, verify="lazy")
    trainer.model.load_state_dict(fresh["model"])
    trainer.optimizer.load_state_dict(fresh["optim"])  # starts with state_dict.copy()
    for name, tensor in eager["model"].items():
        assert torch.equal(trainer.model.state_dict()[name], tensor), name


def test_lazy_load_detects_a_flipped_byte_when_the_tensor_is_taken(trained):
    run, path = trained
    name = "model.layers.0.mlp.up_proj.weight"
    _flip(path, f"model/{name}")
    state = run.load(2, verify="lazy")  # the structure is intact: the load itself succeeds
    other = next(k for k in state["model"] if k != name)
    assert isinstance(state["model"][other], torch.Tensor)  # intact tensors are handed out
    for take in (
        lambda: state["model"][name],
        lambda: dict(state["model"]),
        lambda: list(state["model"].values()),
        lambda: state["model"].copy(),
        lambda: resolved(state),
    ):
        with pytest.raises(CorruptCheckpoint, match=rf"{path}.*checksum mismatch in /model/"):
            take()
    assert state["model"].unverified() == 1  # the corrupt tensor is never handed out


@pytest.mark.parametrize("verify", [True, "lazy", False])
def test_a_dropped_state_unmaps_the_file_at_once(trained, verify):
    """No reference cycle keeps a load's mapping alive until the garbage collector runs: the
    file's pages are released when the state is (retention can free its space)."""
    run, path = trained
    gc.disable()
    try:
        state = run.load(2, verify=verify)
        weight = state["model"]["model.layers.0.mlp.up_proj.weight"]
        assert _mapped_ranges(path)
        del state
        assert _mapped_ranges(path)  # a tensor taken out keeps its view valid
        del weight
        assert not _mapped_ranges(path)
    finally:
        gc.enable()
