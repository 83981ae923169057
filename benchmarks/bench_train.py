"""Trainer vs a bare PyTorch loop, and training throughput per preset and dtype.

    python benchmarks/bench_train.py                # ratio + tokens/s table
    python benchmarks/bench_train.py --quick        # fewer steps

Ratios are measured side by side in one process, alternating blocks so drift hits both.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from mmnb.config import resolve
from mmnb.data import build_dataset, tokenizer_for
from mmnb.model import MiniMind
from mmnb.train import Trainer


def make(preset: str, dtype: str, batch: int, seq: int, accum: int = 1):
    model_cfg, train_cfg = resolve(
        preset, dtype=dtype, batch_size=batch, max_seq_len=seq, accum=accum, epochs=100
    )
    tokenizer = tokenizer_for(None, model_cfg.vocab_size)
    dataset = build_dataset(None, tokenizer, seq)
    return model_cfg, train_cfg, dataset


def bare_loop(model_cfg, train_cfg, dataset, steps: int) -> float:
    """The loop a user would write by hand: same model, data, AdamW, accumulation, clip."""
    model = MiniMind(model_cfg, seed=train_cfg.seed)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=train_cfg.lr,
        betas=(train_cfg.beta1, train_cfg.beta2),
        weight_decay=train_cfg.weight_decay,
    )
    bf16 = train_cfg.dtype == "bf16"
    b, a = train_cfg.batch_size, train_cfg.accum
    model.train()
    # The trainer flushes denormals (see train._flush_denormals); without it late fp32 steps
    # can be 10-40x slower on x86, which would flatter the trainer.
    torch.set_flush_denormal(True)
    start = time.perf_counter()
    for step in range(steps):
        for micro in range(a):
            lo = (step * a + micro) * b
            x, y = dataset.batch(list(range(lo, lo + b)))
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                loss = model(x, y).loss
            (loss / a).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    torch.set_flush_denormal(False)
    return elapsed


def trainer_loop(model_cfg, train_cfg, dataset, steps: int) -> float:
    trainer = Trainer(model_cfg, train_cfg, dataset)
    trainer.config.stop_at = steps
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start


def ratio(preset: str, dtype: str, batch: int, seq: int, steps: int, rounds: int) -> float:
    cfgs = make(preset, dtype, batch, seq)
    bare_loop(*cfgs, 2)  # warm up kernels and allocator
    trainer_loop(*cfgs, 2)
    bare = trainer = 0.0
    for _ in range(rounds):
        bare += bare_loop(*cfgs, steps)
        trainer += trainer_loop(*cfgs, steps)
    return trainer / bare


def throughput(preset: str, dtype: str, batch: int, seq: int, steps: int) -> float:
    cfgs = make(preset, dtype, batch, seq)
    trainer_loop(*cfgs, 2)
    seconds = trainer_loop(*cfgs, steps)
    return steps * batch * seq / seconds


def gemm_ratio() -> float:
    """bf16 / fp32 matmul throughput on this CPU: the ceiling for bf16 training speed-ups."""

    def rate(dtype: torch.dtype) -> float:
        a, b = torch.randn(1024, 512, dtype=dtype), torch.randn(512, 1408, dtype=dtype)
        for _ in range(3):
            a @ b
        start = time.perf_counter()
        for _ in range(20):
            a @ b
        return 20 / (time.perf_counter() - start)

    return rate(torch.bfloat16) / rate(torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps, rounds = (5, 2) if args.quick else (20, 3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    r = ratio("tiny", "fp32", 16, 128, steps * 2, rounds)
    print(f"trainer / bare loop, tiny fp32 16x128: {r:.3f}  (target <= 1.03)")
    r = ratio("minimind2-small", "fp32", 4, 256, max(steps // 4, 2), rounds)
    print(f"trainer / bare loop, minimind2-small fp32 4x256: {r:.3f}  (target <= 1.03)")
    rows = []
    for preset, batch, seq, n in (("tiny", 16, 128, steps * 2), ("minimind2-small", 4, 256, steps)):
        fp32 = throughput(preset, "fp32", batch, seq, n)
        bf16 = throughput(preset, "bf16", batch, seq, n)
        rows.append((preset, batch, seq, fp32, bf16))
    print("\n| preset | batch x seq | fp32 tok/s | bf16 tok/s | bf16/fp32 |")
    print("|---|---|---|---|---|")
    for preset, batch, seq, fp32, bf16 in rows:
        print(f"| {preset} | {batch}x{seq} | {fp32:,.0f} | {bf16:,.0f} | {bf16 / fp32:.2f} |")
    print(f"\nbf16/fp32 matmul throughput on this CPU (1024x512 @ 512x1408): {gemm_ratio():.2f}")
    print(f"tiny preset, peak resident memory of a training process: {tiny_rss_mib():,.0f} MiB")


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


if __name__ == "__main__":
    main()
