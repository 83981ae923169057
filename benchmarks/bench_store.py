"""Store speed and size, side by side with torch.save/torch.load in one run.

    python benchmarks/bench_store.py            # minimind2-small state (~296 MiB), 7 rounds
    python benchmarks/bench_store.py --quick    # tiny state, 5 rounds

Save: a checkpoint commit (new file, fsync, rename, index) vs `torch.save` of the same tensors
to a new file + fsync, alternated. After each save, outside the timing, the written file's pages
are dropped and the previous file of that method is deleted — both methods alike, so neither
reuses the other's just-freed page-cache pages (which alone moved torch.save 0.22 s ↔ 0.75 s).
Load: `Run.load` up front (every checksum and finiteness check before it returns), lazily
(`verify="lazy"`: it returns after the structure checks; each tensor is verified when first
taken — timed alone and with every tensor then taken, `store.lazy.resolved`) and with
`verify=False`, vs `torch.load(weights_only=True)` of the same tensors; cold (the file's pages
dropped with POSIX_FADV_DONTNEED first) and warm (just read); all ten alternated. A loaded
tensor is a copy-on-write view of the mapped file.
Medians and ranges over the rounds; ratios paired per round.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import benchlib
import mmnb
from mmnb.config import config_to_dict, resolve
from mmnb.data import build_dataset, tokenizer_for
from mmnb.store import Store
from mmnb.store.lazy import resolved
from mmnb.train import Trainer

TARGETS = [
    "checkpoint save / torch.save (new file + fsync each) <= 1.0",
    "checkpoint load / torch.load(weights_only=True) <= 0.5, cold and warm page cache "
    '(Run.load(verify="lazy"): tensors verified when first taken)',
    "bytes on disk / raw tensor bytes <= 1.02",
    "extra peak memory while saving / state bytes <= 1",
    "resume to first step / fresh start to first step <= 1.5",
    "--async-save: training stall per checkpoint <= 10% of a blocking save's",
    "list a run of 1,001 checkpoints and read its metrics < 200 ms",
]


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


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def save_load(preset: str, folder: Path, rounds: int) -> None:
    model_cfg, train_cfg = resolve(preset, batch_size=2, max_seq_len=64, max_steps=1)
    tokenizer = tokenizer_for(None, model_cfg.vocab_size)
    dataset = build_dataset(None, tokenizer, train_cfg.max_seq_len)
    trainer = Trainer(model_cfg, train_cfg, dataset)
    trainer.fit()  # one step, so AdamW moments exist
    state = trainer.state_dict()
    plain = _torchify(state)  # weights_only torch.load refuses numpy arrays
    config = config_to_dict(model_cfg, train_cfg)
    run = Store(folder / "store").create_run("bench", config, tokenizer.to_json())
    run.open_writer()
    counter = [0]
    last: dict[str, Path | int] = {}

    def save_h5() -> float:
        counter[0] += 1
        state["trainer"] = {**state["trainer"], "step": counter[0]}
        state["schedule"] = {**state["schedule"], "step": counter[0]}  # checked against it
        seconds = _timed(lambda: run.commit(state, ["bench"]))
        info = run.latest()
        benchlib.drop_page_cache(run.path / info.file)
        if "h5" in last:
            run.delete(last["h5"])
        last["h5"] = info.step
        return seconds

    def save_torch() -> float:
        counter[0] += 1
        path = folder / f"state-{counter[0]}.pt"

        def write() -> None:
            torch.save(plain, path)
            with open(path, "rb") as f:  # the store fsyncs; make torch.save durable too
                os.fsync(f.fileno())

        seconds = _timed(write)
        benchlib.drop_page_cache(path)
        if "pt" in last:
            Path(last["pt"]).unlink()
        last["pt"] = path
        return seconds

    saves = benchlib.alternate({"mmnb": save_h5, "torch.save": save_torch}, rounds)
    h5_file = run.path / run.latest().file
    pt_file = Path(last["pt"])

    def load(fn, path: Path, cold: bool):
        def call() -> float:
            if cold:
                benchlib.drop_page_cache(path)
            return _timed(fn)

        return call

    step = run.latest().step
    h5_load = lambda: run.load(step)  # noqa: E731
    h5_unverified = lambda: run.load(step, verify=False)  # noqa: E731
    h5_lazy = lambda: run.load(step, verify="lazy")  # noqa: E731
    h5_lazy_all = lambda: resolved(run.load(step, verify="lazy"))  # noqa: E731
    pt_load = lambda: torch.load(pt_file, weights_only=True)  # noqa: E731
    variants = {
        "mmnb": h5_load,
        "torch": pt_load,
        "mmnb verify=False": h5_unverified,
        "mmnb lazy": h5_lazy,
        "mmnb lazy, every tensor taken": h5_lazy_all,
    }
    loads = benchlib.alternate(
        {
            f"{name} {cache}": load(fn, pt_file if name == "torch" else h5_file, cache == "cold")
            for cache in ("cold", "warm")
            for name, fn in variants.items()
        },
        rounds,
    )
    raw = _tensor_bytes(state)
    on_disk = run.latest().bytes
    run.close_writer()
    print(f"{preset}: state {raw / 2**20:,.1f} MiB of tensors, {rounds} rounds alternated")
    print(
        f"  save:  mmnb {benchlib.spread(saves['mmnb'])}s  torch.save "
        f"{benchlib.spread(saves['torch.save'])}s  ratio "
        f"{benchlib.spread(benchlib.ratios(saves['mmnb'], saves['torch.save']), '{:.2f}')} "
        "(target <= 1.0)"
    )
    for cache in ("cold", "warm"):
        b = loads[f"torch {cache}"]
        print(f"  load, {cache} page cache:  torch.load {benchlib.spread(b)}s")
        for name, note in (
            ("mmnb", "every checksum and finiteness check before load returns"),
            ("mmnb lazy", "load returns after the structure checks (target <= 0.5)"),
            ("mmnb lazy, every tensor taken", "and then every tensor verified and taken"),
            ("mmnb verify=False", "no checksums; structure and finiteness checked"),
        ):
            a = loads[f"{name} {cache}"]
            ratio = benchlib.spread(benchlib.ratios(a, b), "{:.2f}")
            print(f"    {name}: {benchlib.spread(a)}s  ratio {ratio}  ({note})")
    print(f"  bytes on disk / raw tensor bytes: {on_disk / raw:.4f} (target <= 1.02)")


def save_memory(preset: str, folder: Path) -> None:
    """Peak RSS growth while committing, in a fresh process, relative to the state's bytes."""
    code = f"""
from mmnb.config import config_to_dict, resolve
from mmnb.data import build_dataset, tokenizer_for
from mmnb.store import Store
from mmnb.store.lazy import resolved
from mmnb.train import Trainer
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


def resume_vs_fresh(preset: str, folder: Path, rounds: int) -> None:
    opts = dict(preset=preset, batch_size=4, max_seq_len=256, epochs=1)
    store = folder / "rf"
    for r in range(rounds):  # runs to resume, made beforehand (not timed)
        mmnb.train(f"a{r}", store=store, stop_at=1, **opts)
    n = {"fresh": 0, "resume": 0}

    def fresh() -> None:
        mmnb.train(f"b{n['fresh']}", store=store, stop_at=1, **opts)
        n["fresh"] += 1

    def resume() -> None:
        mmnb.resume(f"a{n['resume']}", store=store, stop_at=2)
        n["resume"] += 1

    times = benchlib.alternate({"fresh": fresh, "resume": resume}, rounds)
    ratio = benchlib.ratios(times["resume"], times["fresh"])
    print(
        f"  resume to first step {benchlib.spread(times['resume'], '{:.2f}')}s / fresh start to "
        f"first step {benchlib.spread(times['fresh'], '{:.2f}')}s = "
        f"{benchlib.spread(ratio, '{:.2f}')} (target <= 1.5)"
    )


def async_stall(preset: str, folder: Path, rounds: int) -> None:
    """What a checkpoint costs the training loop: blocking vs `--async-save`.

    Three trainers of the same model, alternated per round, each running the trainer's own loop
    body for 6 steps: with checkpoints after steps 2 and 4 written blocking or in the
    background (waited for at the end of the round, as the end of training does), or without.
    Reported: the time the loop spent in or waiting for checkpoints (the trainer's own
    account), and the wall time each mode added to the round.
    """
    opts = dict(preset=preset, batch_size=4, max_seq_len=256, epochs=100, keep_last=1)
    trainers = {}
    for mode in ("none", "blocking", "async"):
        run = mmnb.train(mode, store=folder / "stall", start=False, **opts)
        run.open_writer()
        trainers[mode] = (run, run.trainer)
    blocked: dict[str, list[float]] = {m: [] for m in trainers}

    def rounds_of(mode: str):
        _, trainer = trainers[mode]

        def call() -> float:
            trainer.config.async_save = mode == "async"
            before = trainer.checkpoint_seconds
            torch.set_flush_denormal(True)  # as fit() does
            t0 = time.perf_counter()
            for i in range(1, 7):
                trainer._train_step()  # the loop body of Trainer.fit
                trainer.finish_save(wait=False)
                if mode != "none" and i in (2, 4):
                    trainer.checkpoint(["every"], background=True)
            trainer.finish_save(wait=True)
            seconds = time.perf_counter() - t0
            torch.set_flush_denormal(False)
            blocked[mode].append((trainer.checkpoint_seconds - before) / 2)
            return seconds

        return call

    for mode in trainers:
        rounds_of(mode)()  # warm-up
    for values in blocked.values():
        values.clear()
    times = benchlib.alternate({m: rounds_of(m) for m in trainers}, rounds)
    for run, _ in trainers.values():
        run.close_writer()
    added = {
        m: [(t - n) / 2 for t, n in zip(times[m], times["none"], strict=True)]
        for m in ("blocking", "async")
    }
    ratio = benchlib.ratios(blocked["async"], blocked["blocking"])
    print(
        f"\nasync checkpoints ({preset}, {rounds} rounds of 6 steps, checkpoints after 2 and 4):\n"
        f"  loop time in or waiting for a checkpoint, per checkpoint: blocking "
        f"{benchlib.spread(blocked['blocking'])}s, --async-save "
        f"{benchlib.spread(blocked['async'])}s = {benchlib.spread(ratio, '{:.1%}')} of a "
        "blocking save (target <= 10%)\n"
        f"  wall time added per checkpoint (includes CPU shared with the writer thread): "
        f"blocking {benchlib.spread(added['blocking'])}s, async {benchlib.spread(added['async'])}s"
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

    times = benchlib.alternate({"list": read}, benchlib.MIN_ROUNDS)["list"]
    print(
        f"\nlisting a run of {n + 1} checkpoints and reading its metrics: "
        f"{benchlib.spread([t * 1000 for t in times], '{:.1f}')} ms "
        f"(target < 200 ms; building it took {build:.1f}s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    preset = "tiny" if args.quick else "minimind2-small"
    rounds = benchlib.MIN_ROUNDS if args.quick else 7
    benchlib.header("checkpoint store vs torch.save/torch.load", TARGETS)
    folder = Path(tempfile.mkdtemp(prefix="mmnb-bench-", dir=os.environ.get("BENCH_DIR")))
    try:
        save_load(preset, folder, rounds)
        save_memory(preset, folder)
        resume_vs_fresh(preset, folder, rounds)
        async_stall(preset, folder, rounds)
        listing(folder, 100 if args.quick else 1000)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"peak resident memory: {benchlib.peak_rss_mib():,.0f} MiB")
    benchlib.footer()


if __name__ == "__main__":
    main()
