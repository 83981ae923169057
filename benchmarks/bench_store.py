"""Store speed and size, side by side with torch.save/torch.load in one run.

    python benchmarks/bench_store.py            # minimind2-small state (~310 MB) + listing
    python benchmarks/bench_store.py --quick    # tiny state

Prints ratios: checkpoint save / torch.save, load / torch.load, bytes on disk / raw tensor
bytes, peak extra memory while saving / state bytes, resume-to-first-step / fresh-start-to-
first-step, and the time to list a run of 1,000 checkpoints and read its metrics.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import mmnb
from mmnb.config import config_to_dict, resolve
from mmnb.data import build_dataset, tokenizer_for
from mmnb.store import Store
from mmnb.train import Trainer


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _tensor_bytes(tree) -> int:
    seen, total = set(), 0
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, torch.Tensor):
            key = (node.untyped_storage().data_ptr(), node.dtype, tuple(node.shape))
            if key not in seen:
                seen.add(key)
                total += node.numel() * node.element_size()
    return total


def _torchify(tree):
    if isinstance(tree, dict):
        return {k: _torchify(v) for k, v in tree.items()}
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(tree.astype(np.int64) if tree.dtype == np.uint64 else tree)
    return tree


def save_load(preset: str, folder: Path) -> None:
    model_cfg, train_cfg = resolve(preset, batch_size=2, max_seq_len=64, max_steps=1)
    tokenizer = tokenizer_for(None, model_cfg.vocab_size)
    dataset = build_dataset(None, tokenizer, train_cfg.max_seq_len)
    trainer = Trainer(model_cfg, train_cfg, dataset)
    trainer.fit()  # one step, so AdamW moments exist
    state = trainer.state_dict()
    store = Store(folder / "store")
    run = store.create_run("bench", config_to_dict(model_cfg, train_cfg), tokenizer.to_json())
    run.open_writer()
    step = [0]

    def save_h5() -> None:
        step[0] += 1
        state["trainer"] = {**state["trainer"], "step": step[0]}
        state["schedule"] = {**state["schedule"], "step": step[0]}
        run.commit(state, ["bench"])

    plain = _torchify(state)  # weights_only torch.load refuses numpy arrays

    def save_torch() -> None:
        # A new file each time, as checkpoints are: on this VM first-touched page-cache pages
        # cost several times more than reused ones, so both sides must pay the same.
        step[0] += 1
        path = folder / f"state-{step[0]}.pt"
        torch.save(plain, path)
        with open(path, "rb") as f:  # the store fsyncs; make torch.save durable too
            os.fsync(f.fileno())

    t_h5 = t_pt = float("inf")
    for _ in range(3):  # alternate, so drift and cache state hit both
        t_h5 = min(t_h5, _best(save_h5, 1))
        t_pt = min(t_pt, _best(save_torch, 1))
    last_pt = folder / f"state-{step[0]}.pt"
    t_load = t_tload = float("inf")
    for _ in range(3):
        t_load = min(t_load, _best(lambda: run.load(run.latest().step), 1))
        t_tload = min(t_tload, _best(lambda: torch.load(last_pt, weights_only=True), 1))
    raw = _tensor_bytes(state)
    on_disk = run.latest().bytes
    run.close_writer()
    print(f"\n{preset}: state {raw / 2**20:,.1f} MiB of tensors")
    print(
        f"  save:  store {t_h5:.3f}s  torch.save {t_pt:.3f}s  ratio {t_h5 / t_pt:.2f} (target <= 1)"
    )
    print(
        f"  load:  store {t_load:.3f}s  torch.load {t_tload:.3f}s  ratio {t_load / t_tload:.2f} (target <= 1)"
    )
    print(f"  bytes on disk / raw tensor bytes: {on_disk / raw:.4f} (target <= 1.02)")


def save_memory(preset: str, folder: Path) -> None:
    """Peak RSS growth while committing, in a fresh process, relative to the state's bytes."""
    code = f"""
from mmnb.config import resolve
from mmnb.data import build_dataset, tokenizer_for
from mmnb.store import Store
from mmnb.train import Trainer
from mmnb.config import config_to_dict
m, t = resolve({preset!r}, batch_size=2, max_seq_len=64, max_steps=1)
tok = tokenizer_for(None, m.vocab_size)
tr = Trainer(m, t, build_dataset(None, tok, 64)); tr.fit()
state = tr.state_dict()
run = Store({str(folder / "mem")!r}).create_run("m", config_to_dict(m, t), tok.to_json())
run.open_writer()
def hwm():  # VmHWM: peak RSS of this process (ru_maxrss would be inherited from the parent)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
before = hwm()
run.commit(state, ["x"])
after = hwm()
raw = sum(p.numel() * 4 for p in tr.model.parameters()) * 3
print((after - before) * 1024 / raw)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    extra = float(out.stdout.strip())
    print(f"  peak extra memory while saving / state bytes: {extra:.2f} (target <= 1)")


def resume_vs_fresh(preset: str, folder: Path) -> None:
    opts = dict(preset=preset, batch_size=4, max_seq_len=256, epochs=1)
    store = folder / "rf"
    t0 = time.perf_counter()
    mmnb.train("a", store=store, stop_at=1, **opts)
    fresh = time.perf_counter() - t0
    t0 = time.perf_counter()
    mmnb.resume("a", store=store, stop_at=2)
    resumed = time.perf_counter() - t0
    print(
        f"  resume to first step {resumed:.2f}s / fresh start to first step {fresh:.2f}s "
        f"= {resumed / fresh:.2f} (target <= 1.5)"
    )


def listing(folder: Path, n: int) -> None:
    store = folder / "many"
    micro = dict(
        hidden_size=32,
        layers=1,
        heads=2,
        kv_heads=1,
        intermediate_size=64,
        vocab_size=300,
        max_seq_len=32,
        batch_size=2,
    )
    t0 = time.perf_counter()
    mmnb.train("many", store=store, max_steps=n, save_every=1, epochs=1000, **micro)
    build = time.perf_counter() - t0
    s = Store(store)

    def read() -> None:
        run = s.run("many")
        assert len(run.steps()) == n + 1
        assert len(run.metrics()["loss"]) == n

    t = _best(read)
    print(
        f"\nlisting a run of {n + 1} checkpoints and reading its metrics: {t * 1000:.1f} ms "
        f"(target < 200 ms; building it took {build:.1f}s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    preset = "tiny" if args.quick else "minimind2-small"
    folder = Path(tempfile.mkdtemp(prefix="mmnb-bench-", dir=os.environ.get("BENCH_DIR")))
    try:
        save_load(preset, folder)
        save_memory(preset, folder)
        resume_vs_fresh(preset, folder)
        listing(folder, 100 if args.quick else 1000)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {rss:,.0f} MiB")


if __name__ == "__main__":
    main()
