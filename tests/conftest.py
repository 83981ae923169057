"""Shared fixtures: a private cache, a small corpus and a micro model so tests run in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Micro models run fastest on one thread, and CI has two cores shared by the test process and
# the CLI subprocesses it starts: oversubscribed OpenMP threads spin and slow everything ~20x.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mmnb.corpus import PRETRAIN_PATH  # noqa: E402
from mmnb.store import Store  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# A model far smaller than the tiny preset: the contracts under test do not depend on size.
MICRO = dict(
    preset="tiny",
    hidden_size=32,
    layers=1,
    heads=2,
    kv_heads=1,
    intermediate_size=64,
    vocab_size=300,
    max_seq_len=32,
    batch_size=4,
    log_every=1,
)


@pytest.fixture(autouse=True)
def _one_thread_count():
    # In-process runs are compared bitwise with runs of CLI subprocesses, which take their thread
    # count from OMP_NUM_THREADS: a test module that changes this process's count (once, at
    # import) makes compiled reductions split differently and those comparisons fail far away.
    want = int(os.environ["OMP_NUM_THREADS"])
    assert torch.get_num_threads() == want, f"torch threads {torch.get_num_threads()} != {want}"
    yield
    torch.set_num_threads(want)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    # Tokenised data and trained tokenizers are shared by the whole session (and its
    # subprocesses), never written to the user's ~/.cache.
    os.environ["MMNB_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """The first 30 documents of the bundled corpus (about 80 micro steps per epoch)."""
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    with open(PRETRAIN_PATH, encoding="utf-8") as src:
        lines = [next(src) for _ in range(30)]
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture
def micro(small_corpus) -> dict:
    return dict(MICRO, data=str(small_corpus))


def cli_args(options: dict) -> list[str]:
    """`{'batch_size': 4, 'qk_norm': True}` → ['--batch-size', '4', '--qk-norm']."""
    args: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False and value is not None:
            args += [flag, str(value)]
    return args


def mmnb(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-m", "mmnb", *args], capture_output=True, text=True, **kwargs
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mmnb {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def assert_same_state(a: dict, b: dict, *, metrics: bool = True) -> None:
    """Bitwise equality of weights, AdamW state, counters and (optionally) the loss log."""
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), f"weights differ: {name}"
    assert a["optim"]["state"].keys() == b["optim"]["state"].keys()
    for name, slots in a["optim"]["state"].items():
        for slot, value in slots.items():
            assert torch.equal(value, b["optim"]["state"][name][slot]), f"{slot} differs: {name}"
    for key in ("step", "epoch", "tokens"):
        assert a["trainer"][key] == b["trainer"][key], key
    assert a["data"]["position"] == b["data"]["position"]
    if metrics:
        for key in ("step", "loss", "lr", "grad_norm", "tokens"):
            assert a["metrics"][key].tolist() == b["metrics"][key].tolist(), f"metric {key} differs"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
