"""Trainer vs a bare PyTorch loop, and training throughput per preset and dtype.

    python benchmarks/bench_train.py                # 7 rounds
    python benchmarks/bench_train.py --quick        # 5 rounds, fewer steps

The trainer and the bare loop alternate inside each round (the order rotates), each keeping its
model and optimizer warm across rounds; the overhead is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

import benchlib
from mmnb.config import resolve
from mmnb.data import build_dataset, epoch_order, tokenizer_for
from mmnb.model import MiniMind
from mmnb.speed import make_optimizer
from mmnb.train import Trainer

TARGETS = [
    "trainer step / bare loop step <= 1.03 (fp32, tiny and minimind2-small)",
    "tiny preset: peak resident memory of a training process < 1 GiB",
]


def make(preset: str, dtype: str, batch: int, seq: int, compile_: bool = False):
    model_cfg, train_cfg = resolve(
        preset,
        dtype=dtype,
        batch_size=batch,
        max_seq_len=seq,
        epochs=1000,
        compile=compile_,
        log_every=10**6,
    )
    tokenizer = tokenizer_for(None, model_cfg.vocab_size)
    dataset = build_dataset(None, tokenizer, seq)
    return model_cfg, train_cfg, dataset


class BareLoop:
    """The loop a user would write by hand: same model, data order, optimizer, clip, autocast."""

    def __init__(self, model_cfg, train_cfg, dataset) -> None:
        self.cfg, self.dataset = train_cfg, dataset
        self.model = MiniMind(model_cfg, seed=train_cfg.seed)
        self.opt = make_optimizer(self.model.parameters(), train_cfg, torch.device("cpu"))
        self.order = epoch_order(len(dataset), train_cfg.seed, 0)
        self.step = 0

    def run(self, steps: int) -> float:
        b, bf16 = self.cfg.batch_size, self.cfg.dtype == "bf16"
        self.model.train()
        # The trainer flushes denormals (see train._flush_denormals); without it late fp32 steps
        # can be 10-40x slower on x86, which would flatter the trainer.
        torch.set_flush_denormal(True)
        t0 = time.perf_counter()
        for _ in range(steps):
            lo = (self.step * b) % (len(self.order) - b)
            x, y = self.dataset.batch(self.order[lo : lo + b])
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                loss = self.model(x, y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            loss.item()  # the trainer logs the loss every step
            self.step += 1
        elapsed = time.perf_counter() - t0
        torch.set_flush_denormal(False)
        return elapsed


class TrainerLoop:
    def __init__(self, model_cfg, train_cfg, dataset) -> None:
        self.trainer = Trainer(model_cfg, train_cfg, dataset)

    def run(self, steps: int) -> float:
        self.trainer.config.stop_at = self.trainer.step + steps
        t0 = time.perf_counter()
        self.trainer.fit()
        return time.perf_counter() - t0


def overhead(preset: str, batch: int, seq: int, steps: int, rounds: int) -> None:
    cfgs = make(preset, "fp32", batch, seq)
    loops = {"bare": BareLoop(*cfgs), "trainer": TrainerLoop(*cfgs)}
    for loop in loops.values():
        loop.run(2)  # warm up kernels and the allocator
    times = benchlib.alternate(
        {n: (lambda lp=lp: lp.run(steps)) for n, lp in loops.items()}, rounds
    )
    r = benchlib.ratios(times["trainer"], times["bare"])
    print(
        f"trainer / bare loop, {preset} fp32 {batch}x{seq}: {benchlib.spread(r)} "
        f"(median (range) of {rounds} paired rounds of {steps} steps; target <= 1.03)"
    )


def throughput(rows, rounds: int) -> None:
    """tokens/s of the trainer per (preset, dtype[, compile]), all alternated in one loop."""
    loops, steps = {}, {}
    for preset, batch, seq, dtype, comp, k in rows:
        name = f"{preset} {batch}x{seq} {dtype}{' compile' if comp else ''}"
        loops[name] = TrainerLoop(*make(preset, dtype, batch, seq, comp))
        steps[name] = (k, batch * seq)
    for loop in loops.values():
        loop.run(2)  # warm-up (and compilation)
    times = benchlib.alternate(
        {n: (lambda lp=lp, k=steps[n][0]: lp.run(k)) for n, lp in loops.items()}, rounds
    )
    print("\n| preset, batch x seq, dtype | trainer tokens/s median (range) |")
    print("|---|---|")
    for name, secs in times.items():
        k, tokens = steps[name]
        print(f"| {name} | {benchlib.spread([k * tokens / s for s in secs], '{:,.0f}')} |")


def tiny_rss_mib() -> float:
    """Peak RSS of a fresh process that trains the tiny preset for 50 steps (target < 1 GiB)."""
    # VmHWM, not ru_maxrss: the latter is inherited from this (much larger) parent process.
    code = (
        "import mmnb, tempfile; "
        "mmnb.train(store=tempfile.mkdtemp(), max_steps=50); "
        "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compile", action="store_true", help="add compiled rows (slow warm-up)")
    args = parser.parse_args()
    steps, rounds = (3, 5) if args.quick else (8, 7)
    benchlib.header("trainer overhead and throughput", TARGETS)
    overhead("tiny", 16, 128, steps * 4, rounds)
    overhead("minimind2-small", 4, 256, max(steps // 2, 1), rounds)
    big = max(steps // 2, 1)
    rows = [
        ("tiny", 16, 128, "fp32", False, steps * 4),
        ("tiny", 16, 128, "bf16", False, steps * 4),
        ("minimind2-small", 4, 256, "fp32", False, big),
        ("minimind2-small", 4, 256, "bf16", False, big),
    ]
    if args.compile:
        rows += [
            ("minimind2-small", 4, 256, "fp32", True, big),
            ("minimind2-small", 4, 256, "bf16", True, big),
        ]
    throughput(rows, rounds)
    print(f"\ntiny preset, peak resident memory of a training process: {tiny_rss_mib():,.0f} MiB")
    benchlib.footer()


if __name__ == "__main__":
    main()
