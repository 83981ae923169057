"""Export to a Hugging Face folder, side by side with transformers' own save_pretrained.

    python benchmarks/bench_export.py            # minimind2 (104M), 7 rounds
    python benchmarks/bench_export.py --quick    # minimind2-small (26M), 5 rounds

Target: `mmnb export --format hf` of a minimind2 checkpoint takes less time than
`save_pretrained` of the same model already in memory. The rounds alternate the methods:

- export (store → folder): `mmnb.export.export`, reading the checkpoint from the store (HDF5,
  checksums verified) and writing config, safetensors and tokenizer files;
- write only (memory → folder): `mmnb.export.write_hf` from a state dict in memory, the same
  work as save_pretrained;
- save_pretrained: the `LlamaForCausalLM` transformers loads from the export, saved again.

Warm rounds read the checkpoint from the page cache; cold rounds first evict the checkpoint
file from it (posix_fadvise DONTNEED; outputs are never fsynced by either side). Prints
medians and ranges, the ratios, and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import mmnb
from mmnb.export import export, write_hf
from mmnb.frozen import checkpoint_weights
from mmnb.tokenizer import Tokenizer


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _timed(fn, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def _summary(name: str, times: list[float]) -> str:
    return (
        f"{name:<34} median {statistics.median(times):6.3f} s  "
        f"range {min(times):.3f}-{max(times):.3f} s  (n={len(times)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="minimind2-small, 5 rounds")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    preset = "minimind2-small" if args.quick else "minimind2"
    rounds = args.rounds or (5 if args.quick else 7)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise SystemExit(
            "this benchmark compares against transformers: pip install transformers"
        ) from None

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(tempfile.mkdtemp(prefix="mmnb-bench-export-"))
    os.environ.setdefault("MMNB_CACHE", str(work / "cache"))
    store = mmnb.Store(work / "store")
    run = mmnb.train("m", store=store, preset=preset, max_seq_len=64, batch_size=1, start=False)
    ckpt = run.checkpoint_path(run.step_info(0))
    cfg = mmnb.load_model(run)[0].config
    tokenizer = Tokenizer.from_json(run.tokenizer_json())
    state = checkpoint_weights(run, 0)
    params = sum(t.numel() for k, t in state.items() if k != "lm_head.weight")
    reference = export(run, format="hf", out=work / "reference")
    model = AutoModelForCausalLM.from_pretrained(reference.path)

    times: dict[str, list[float]] = {
        "export, warm (store -> folder)": [],
        "export, cold (store -> folder)": [],
        "write only (memory -> folder)": [],
        "save_pretrained (memory -> folder)": [],
    }
    for i in range(rounds):
        # Alternate which side goes first, so neither always meets a busier disk.
        order = ["ours", "theirs"] if i % 2 == 0 else ["theirs", "ours"]
        for side in order:
            out = work / f"out-{side}"
            if side == "ours":
                _evict(ckpt)
                times["export, cold (store -> folder)"].append(
                    _timed(export, run, format="hf", out=out)
                )
                shutil.rmtree(out)
                times["export, warm (store -> folder)"].append(
                    _timed(export, run, format="hf", out=out)
                )
                shutil.rmtree(out)
                times["write only (memory -> folder)"].append(
                    _timed(write_hf, state, cfg, tokenizer, out, torch.float32)
                )
            else:
                times["save_pretrained (memory -> folder)"].append(
                    _timed(model.save_pretrained, out)
                )
            shutil.rmtree(out)

    med = {k: statistics.median(v) for k, v in times.items()}
    theirs = med["save_pretrained (memory -> folder)"]
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")  # fmt: skip
    print(f"model: {preset}, {params / 1e6:.1f}M parameters, fp32, {type(model).__name__}")
    for name, values in times.items():
        print(_summary(name, values))
    print(f"export warm / save_pretrained: {med['export, warm (store -> folder)'] / theirs:.2f}"
          "  (target < 1)")  # fmt: skip
    print(f"export cold / save_pretrained: {med['export, cold (store -> folder)'] / theirs:.2f}")
    print(f"write only / save_pretrained:  {med['write only (memory -> folder)'] / theirs:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
