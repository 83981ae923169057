"""The CUDA checks of distributed and mixed-precision training, for a machine with GPUs.

    python benchmarks/gpu_check.py              # on a machine with 1+ CUDA GPUs
    python benchmarks/gpu_check.py --cpu        # the same checks on CPU (a dry run of the script)

What it checks (each line says PASS or FAIL; the exit status is 1 if any failed):
- exact resume on one GPU: a run stopped and resumed equals the straight run bitwise
  (`torch.equal` on every weight and moment, the loss log too) for fp32, bf16 autocast (where
  the GPU supports it), fp16 with its GradScaler, and `--compile`;
- `--device auto` picks the GPU; TF32 stays off unless `--tf32` (and is recorded);
- with 2+ GPUs: 2-rank DDP and FSDP2 (nccl) resumed at the same world size equal the straight
  runs bitwise; a 2-rank checkpoint resumed on 1 GPU matches to 1e-5;

and what it measures (median and range over 5 alternating rounds):
- tokens/s of DDP on all GPUs against 1 GPU with the same global batch (scaling efficiency);
- the cost of `torch.use_deterministic_algorithms(True)` (which mmnb turns on for CUDA):
  training-step time with / without it, on the minimind2-small preset.

Without a CUDA GPU it says so and exits 0 (unless --cpu).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import benchlib  # noqa: E402

RESULTS: list[tuple[str, bool, str]] = []
MICRO = dict(
    preset="tiny", hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=192,
    vocab_size=512, max_seq_len=64, batch_size=8, log_every=10,
)  # fmt: skip


def check(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}{'  ' + detail if detail else ''}", flush=True)


def same(a: dict, b: dict) -> tuple[bool, str]:
    """Bitwise equality of weights, AdamW state and the loss log; what differs, if anything."""
    for name in a["model"]:
        if not torch.equal(a["model"][name], b["model"][name]):
            return False, f"weights differ: {name}"
    for name, slots in a["optim"]["state"].items():
        for slot, value in slots.items():
            if not torch.equal(value, b["optim"]["state"][name][slot]):
                return False, f"{slot} differs: {name}"
    if a["metrics"]["loss"].tolist() != b["metrics"]["loss"].tolist():
        return False, "loss log differs"
    return True, ""


def close(a: dict, b: dict, atol: float = 1e-5) -> tuple[bool, str]:
    worst = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    return worst <= atol, f"max |diff| {worst:.2e} (tolerance {atol:g})"


def one_gpu_checks(store: Path, device: str) -> None:
    import mmnb

    cuda = device.startswith("cuda")
    if cuda:
        picked = mmnb.dist.resolve_device("auto")
        check("--device auto picks the GPU", picked.type == "cuda", str(picked))
    variants = {"fp32": {}, "fp16": {"dtype": "fp16"}, "compile": {"compile": True}}
    if not cuda or torch.cuda.is_bf16_supported():
        variants["bf16"] = {"dtype": "bf16"}
    for label, extra in variants.items():
        options = dict(MICRO, max_steps=30, device=device, **extra)
        straight = mmnb.train(f"straight-{label}", store=store, **options)
        mmnb.train(f"split-{label}", store=store, stop_at=12, **options)
        split = mmnb.resume(f"split-{label}", store=store, device=device)
        ok, why = same(straight.load(), split.load())
        check(f"exact resume on {device}, {label}", ok, why)
    run = mmnb.train("tf32", store=store, max_steps=2, tf32=True, device=device, **MICRO)
    session = run.info()["history"][0]["session"]
    check("--tf32 is recorded", session["tf32"] is True and run.config_dict()["train"]["tf32"])
    if cuda:
        check("TF32 is off again after training", not torch.backends.cuda.matmul.allow_tf32)


def torchrun(nproc: int, args: list[str]) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={nproc}", "-m", "mmnb", *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def multi_gpu_checks(store: Path, nproc: int, device: str) -> None:
    from mmnb.store import Store

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in MICRO.items()]
    common = ["--store", str(store), "--no-sample", "--save-every", "10", "--device", device]
    for mode, extra in (("ddp", []), ("fsdp", ["--shard"])):
        torchrun(nproc, ["train", f"{mode}-straight", *common, *flags, "--max-steps", "30", *extra])
        torchrun(nproc, ["train", f"{mode}-split", *common, *flags, "--max-steps", "30",
                         "--stop-at", "12", *extra])  # fmt: skip
        torchrun(nproc, ["resume", f"{mode}-split", *common, *extra])
        s = Store(store)
        ok, why = same(s.run(f"{mode}-straight").load(), s.run(f"{mode}-split").load())
        check(f"{nproc}-rank {mode.upper()} exact resume on {device}", ok, why)
    import mmnb

    mmnb.branch("ddp-straight", 10, "ddp-on-1", store=store, device=device)
    s = Store(store)
    ok, why = close(s.run("ddp-on-1").load(), s.run("ddp-straight").load())
    check(f"{nproc}-rank checkpoint continued by 1 process", ok, why)


def scaling(store: Path, nproc: int, device: str, rounds: int) -> None:
    """tokens/s of DDP on `nproc` GPUs against 1 GPU, same global batch."""
    import mmnb
    from mmnb.store import Store

    options = dict(preset="minimind2-small", batch_size=8, max_seq_len=512, max_steps=30,
                   log_every=30)  # fmt: skip
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    one, many = [], []

    def rate(run) -> float:
        m = run.metrics()
        return float((m["tokens"][-1] - m["tokens"][9]) / (m["time"][-1] - m["time"][9]))

    def single() -> float:
        name = f"scale-1-{len(one)}"
        run = mmnb.train(name, store=store, device=device, accum=nproc, **options)
        one.append(rate(run))
        return 0.0

    def ddp() -> float:
        name = f"scale-{nproc}-{len(many)}"
        torchrun(nproc, ["train", name, "--store", str(store), "--no-sample", "--device",
                         device, *flags])  # fmt: skip
        many.append(rate(Store(store).run(name)))
        return 0.0

    benchlib.alternate({"one": single, "ddp": ddp}, rounds)
    speedup = benchlib.ratios(many, one)
    print(f"tokens/s, minimind2-small, global batch {8 * nproc} x 512, steps 11-30:")
    print(f"  1 GPU (accum {nproc})   : {benchlib.spread(one, '{:,.0f}')}")
    print(f"  {nproc} GPUs DDP         : {benchlib.spread(many, '{:,.0f}')}")
    print(f"  speedup             : {benchlib.spread(speedup, '{:.2f}')}x, efficiency "
          f"{benchlib.spread([s / nproc for s in speedup], '{:.0%}')}")  # fmt: skip


def determinism_cost(device: str, rounds: int) -> None:
    """A training step of minimind2-small with and without deterministic algorithms."""
    from mmnb.config import resolve
    from mmnb.data import build_dataset, tokenizer_for
    from mmnb.train import Trainer

    model_cfg, train_cfg = resolve("minimind2-small", batch_size=8, max_seq_len=512)
    tokenizer = tokenizer_for(None, model_cfg.vocab_size)
    dataset = build_dataset(None, tokenizer, train_cfg.max_seq_len)
    trainer = Trainer(model_cfg, dataclasses.replace(train_cfg, dtype="bf16"), dataset,
                      device=device)  # fmt: skip
    trainer._train_step()  # warm-up (kernels chosen, memory allocated)

    def steps(deterministic: bool) -> float:
        torch.use_deterministic_algorithms(deterministic)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            trainer._train_step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / 5

    times = benchlib.alternate(
        {"deterministic": lambda: steps(True), "default": lambda: steps(False)}, rounds
    )
    torch.use_deterministic_algorithms(False)
    ratio = benchlib.ratios(times["deterministic"], times["default"])
    print("training step, minimind2-small, bf16, batch 8 x 512:")
    print(f"  deterministic algorithms   s: {benchlib.spread(times['deterministic'])}")
    print(f"  default                    s: {benchlib.spread(times['default'])}")
    print(f"  cost (deterministic/default): {benchlib.spread(ratio, '{:.3f}')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run the checks on CPU (dry run)")
    parser.add_argument("--rounds", type=int, default=benchlib.MIN_ROUNDS)
    parser.add_argument("--skip-timing", action="store_true", help="only the exactness checks")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.cpu:
        print("no CUDA GPU here: nothing to check (--cpu runs the checks on CPU)")
        return 0
    gpus = torch.cuda.device_count() if not args.cpu else 2
    device = "cpu" if args.cpu else "cuda"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    benchlib.header(
        "mmnb on CUDA: exact resume, DDP/FSDP2, mixed precision",
        ["every check PASS", "DDP tokens/s on N GPUs: report the scaling efficiency"],
    )
    if not args.cpu:
        for i in range(gpus):
            p = torch.cuda.get_device_properties(i)
            print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 "
                  f"{torch.cuda.is_bf16_supported()}")  # fmt: skip
        print(f"torch CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}\n")
    with tempfile.TemporaryDirectory(prefix="mmnb-gpu-check-") as folder:
        store = Path(folder) / "store"
        os.environ.setdefault("MMNB_CACHE", str(Path(folder) / "cache"))
        one_gpu_checks(store, device)
        if gpus >= 2:
            multi_gpu_checks(store, min(gpus, 8) if not args.cpu else 2, device)
        else:
            print("(one GPU: the multi-GPU checks need 2+)")
        if not args.skip_timing:
            determinism_cost(device, args.rounds)
            if gpus >= 2:
                scaling(store, gpus if not args.cpu else 2, device, args.rounds)
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed")
    benchlib.footer()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
