"""Fuzzing: random byte damage to a checkpoint and to run.h5 is either harmless or one StoreError.

One child process loads the mutations one after another (a fixed list of seeds, so a failure
reproduces) and reports each outcome on a line; the parent gives every mutation a deadline
and restarts the child after a crash or a hang, which are failures like any other exception
or a load that silently returns a different state.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

import mmnb

# (target, seed): 200 mutations of the newest checkpoint, 200 of the run's index.
SEEDS = [("ckpt", s) for s in range(200)] + [("run", 1000 + s) for s in range(200)]
DEADLINE = 30.0  # seconds for one mutation (a load takes milliseconds)

CHILD = r'''
import random, shutil, sys, warnings
from pathlib import Path
import h5py, numpy as np, torch
from mmnb.store import Store, StoreError

warnings.simplefilter("ignore")
pristine, scratch = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(pristine, scratch)
FILES = {"ckpt": Path("r/ckpt/00000002.h5"), "run": Path("r/run.h5")}
ORIGINAL = {k: (pristine / p).read_bytes() for k, p in FILES.items()}

def data_ranges(path):
    """Byte ranges of the datasets' raw data: the rest is HDF5 structure and attributes."""
    ranges = []
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.id.get_offset() is not None:
                ranges.append((obj.id.get_offset(), obj.id.get_offset() + obj.id.get_storage_size()))
        f.visititems(visit)
    return ranges

STRUCTURE = {}
for key, rel in FILES.items():
    mask = np.ones(len(ORIGINAL[key]), bool)
    for a, b in data_ranges(pristine / rel):
        mask[a:b] = False
    STRUCTURE[key] = np.flatnonzero(mask)

def mutate(data, key, seed):
    rng = random.Random(seed)
    buf = bytearray(data)
    kind = rng.random()
    if kind < 0.1:  # truncated
        return bytes(buf[: rng.randrange(len(buf))])
    if kind < 0.2:  # a block overwritten
        at = rng.randrange(len(buf) - 64)
        buf[at : at + 64] = bytes(rng.randrange(256) for _ in range(64))
        return bytes(buf)
    for _ in range(rng.choice([1, 1, 1, 2, 3, 8])):
        structure = STRUCTURE[key]
        at = int(structure[rng.randrange(len(structure))]) if rng.random() < 0.7 else rng.randrange(len(buf))
        buf[at] ^= rng.randrange(1, 256)
    return bytes(buf)

def snapshot(store):
    run = store.run("r")
    return {
        "steps": [vars(s) for s in run.steps()],
        "info": run.info(),
        "tokenizer": run.tokenizer_json(),
        "state": run.load(2),
    }

def same(a, b):
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return type(a) is type(b) and a == b

reference = snapshot(Store(pristine))
print("ready", flush=True)
for line in sys.stdin:
    key, seed = line.split()
    target = scratch / FILES[key]
    target.write_bytes(mutate(ORIGINAL[key], key, int(seed)))
    try:
        outcome = "intact" if same(snapshot(Store(scratch)), reference) else "different"
    except StoreError as err:
        outcome = "error " + str(err).replace("\n", " ")[:200]
    except BaseException as err:
        outcome = f"exception {type(err).__name__}: " + str(err).replace("\n", " ")[:200]
    target.write_bytes(ORIGINAL[key])
    print(seed, outcome, flush=True)
'''


class Child:
    """The child process and a line reader with a deadline."""

    def __init__(self, pristine, work) -> None:
        self.err = tempfile.TemporaryFile()
        scratch = tempfile.mkdtemp(dir=work)
        shutil.rmtree(scratch)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(pristine), scratch],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            bufsize=1,
        )
        assert self.readline(120) == "ready", self.stderr()

    def readline(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return line.strip() if line else None

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")[-2000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.err.close()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, small_corpus):
    from conftest import MICRO

    root = tmp_path_factory.mktemp("fuzz") / "store"
    mmnb.train("r", store=root, max_steps=2, save_every=1, **dict(MICRO, data=str(small_corpus)))
    return root


def test_random_damage_is_harmless_or_one_store_error(pristine, tmp_path):
    outcomes: dict[tuple[str, int], str] = {}
    child = Child(pristine, tmp_path)
    try:
        for key, seed in SEEDS:
            child.proc.stdin.write(f"{key} {seed}\n")
            child.proc.stdin.flush()
            started = time.monotonic()
            line = child.readline(DEADLINE)
            if line is None:  # a crash (EOF) or a hang (deadline): both are failures
                dead = child.proc.poll() is not None or time.monotonic() - started < DEADLINE
                outcomes[key, seed] = (
                    f"crash (exit {child.proc.poll()}): {child.stderr()}" if dead else "hang"
                )
                child.close()
                child = Child(pristine, tmp_path)
                continue
            got_seed, _, outcome = line.partition(" ")
            assert int(got_seed) == seed, line
            outcomes[key, seed] = outcome
    finally:
        child.close()
    bad = {k: v for k, v in outcomes.items() if v.split()[0] not in ("intact", "error")}
    assert not bad, "\n".join(f"{k}: {v}" for k, v in bad.items())
    errors = [v for v in outcomes.values() if v.startswith("error")]
    assert len(outcomes) == len(SEEDS) >= 400
    # The damage is real: most mutations hit something mmnb checks (a checksum, HDF5's own).
    assert len(errors) > len(SEEDS) // 2, sorted(outcomes.values())[:20]
    for text in errors:  # one StoreError naming the damaged file
        assert "00000002.h5" in text or "run.h5" in text, text
    if os.environ.get("MMNB_FUZZ_REPORT"):
        print("\n".join(f"{k}: {v}" for k, v in sorted(outcomes.items())))
