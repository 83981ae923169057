"""Export to a Hugging Face folder, side by side with transformers' own save_pretrained.

    flock /tmp/mmnb-bench.lock python benchmarks/bench_export.py           # minimind2, 7 rounds
    flock /tmp/mmnb-bench.lock python benchmarks/bench_export.py --quick   # minimind2-small, 5
    flock /tmp/mmnb-bench.lock python benchmarks/bench_export.py --levers  # + the design's levers

Target: `mmnb export --format hf` of a minimind2 (104M) checkpoint takes less time than
`save_pretrained` of the same model, with the same durability. The methods alternate in every
round (the order rotates) and every ratio is paired within its round:

- export (store -> folder): `mmnb.export.export` as `mmnb export` runs it once its imports are
  done: open the store and the run, check the checkpoint's manifest and layout, stream every
  tensor from the checkpoint file into model.safetensors verifying its checksum and
  finiteness on the way, write config, generation config and tokenizer files, fsync them,
  rename the folder into place and fsync its parent. Warm: the checkpoint file is in the page
  cache (read once before timing); cold: its pages are dropped first (posix_fadvise DONTNEED).
- save_pretrained + fsync (memory -> folder): the `LlamaForCausalLM` transformers loads from
  the export, saved to a new folder, then every file it wrote, the folder and its parent
  fsynced — the durability export gives. It reads nothing, so it has no cold case.
- for reference, not a target: save_pretrained without fsync.

`--levers` adds export (warm) with the design's choices undone one at a time: 1 MiB and
16 MiB read chunks instead of 4 MiB, and no early writeback (the fsync at the end does it all).
Every output is deleted and the disk synced between methods, untimed; one untimed round of
every method precedes the timed ones.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import benchlib
import mmnb
from mmnb import safetensors_format
from mmnb.durable import fsync
from mmnb.export import export
from mmnb.store import streamed

TARGET = "export (store -> folder, warm) / (save_pretrained + fsync) < 1"


def _fsync_folder(folder: Path) -> None:
    """What export does for durability: every file, the folder, and the folder's parent."""
    for file in folder.iterdir():
        fsync(file)
    fsync(folder)
    fsync(folder.parent)


def _read_through(path: Path) -> None:
    """Bring a file into the page cache (untimed)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(16 * 2**20):
            pass


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="minimind2-small, 5 rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--levers", action="store_true", help="also time the design's levers")
    parser.add_argument("--raw", action="store_true", help="print every round's time too")
    args = parser.parse_args()
    preset = "minimind2-small" if args.quick else "minimind2"
    rounds = args.rounds or (5 if args.quick else 7)
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise SystemExit(
            "this benchmark compares against transformers: pip install transformers"
        ) from None
    hf_logging.disable_progress_bar()  # its bars would interleave with the figures

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(tempfile.mkdtemp(prefix="mmnb-bench-export-"))
    os.environ.setdefault("MMNB_CACHE", str(work / "cache"))
    store_path = work / "store"
    run = mmnb.train(
        "m", store=mmnb.Store(store_path), preset=preset, max_seq_len=64, batch_size=1,
        start=False,
    )  # fmt: skip
    ckpt = run.checkpoint_path(run.step_info(0))
    reference = export(run, format="hf", out=work / "reference")
    model = AutoModelForCausalLM.from_pretrained(reference.path)
    params = sum(p.numel() for p in model.parameters())  # the tied head once
    out = work / "out"

    def settle() -> None:
        shutil.rmtree(out, ignore_errors=True)
        os.sync()  # nothing of one method's writes is still in flight during the next

    def export_from_store() -> None:
        export(mmnb.Store(store_path).run("m"), format="hf", out=out)

    def ours(cold: bool, **levers: int) -> Callable[[], float]:
        def method() -> float:
            settle()
            if cold:
                benchlib.drop_page_cache(ckpt)
            else:
                _read_through(ckpt)
            saved = {key: getattr(_LEVERS[key], key) for key in levers}
            for key, value in levers.items():
                setattr(_LEVERS[key], key, value)
            try:
                return _timed(export_from_store)
            finally:
                for key, value in saved.items():
                    setattr(_LEVERS[key], key, value)

        return method

    def theirs(durable: bool) -> Callable[[], float]:
        def method() -> float:
            settle()

            def save() -> None:
                model.save_pretrained(out)
                if durable:
                    _fsync_folder(out)

            return _timed(save)

        return method

    methods: dict[str, Callable[[], float]] = {
        "export, warm (store -> folder)": ours(cold=False),
        "export, cold (store -> folder)": ours(cold=True),
        "save_pretrained + fsync": theirs(durable=True),
        "save_pretrained, no fsync": theirs(durable=False),
    }
    if args.levers:
        methods["lever: 1 MiB chunks (warm)"] = ours(cold=False, CHUNK=2**20)
        methods["lever: 16 MiB chunks (warm)"] = ours(cold=False, CHUNK=16 * 2**20)
        methods["lever: no early writeback (warm)"] = ours(cold=False, WRITEBACK=2**62)

    benchlib.header(
        f"mmnb export --format hf vs transformers save_pretrained ({preset})",
        [TARGET, "durability: both sides fsync every file they write (mmnb always does)"],
    )
    print(
        f"model: {preset}, {params / 1e6:.1f}M parameters, fp32 "
        f"({ckpt.stat().st_size / 2**20:.0f} MiB checkpoint), {type(model).__name__}"
    )
    for method in methods.values():  # one untimed round: the first of each ran slow here
        method()
    times = benchlib.alternate(methods, rounds)
    settle()
    width = max(map(len, methods))
    for name, values in times.items():
        print(f"{name:<{width}}  {benchlib.spread(values)} s  (median, range; n={len(values)})")
        if args.raw:
            print(f"{'':<{width}}  rounds: {' '.join(f'{v:.3f}' for v in values)}")
    base = times["save_pretrained + fsync"]
    print()
    for name in methods:
        if name != "save_pretrained + fsync":
            ratio = benchlib.ratios(times[name], base)
            print(f"{name:<{width}}  / save_pretrained + fsync: {benchlib.spread(ratio, '{:.2f}')}")
    ratio = benchlib.median(benchlib.ratios(times["export, warm (store -> folder)"], base))
    print(f"\ntarget {TARGET}: {ratio:.2f}, {'met' if ratio < 1 else 'NOT met'}")
    benchlib.footer()
    shutil.rmtree(work, ignore_errors=True)


_LEVERS = {"CHUNK": streamed, "WRITEBACK": safetensors_format}  # constant -> its module


if __name__ == "__main__":
    main()
