"""Training speed side by side with MiniMind's own loop, and model FLOPs utilisation.

    python benchmarks/bench_vs_minimind.py --minimind-src /path/to/minimind     # full run
    python benchmarks/bench_vs_minimind.py --minimind-src DIR --quick           # a smoke run
    python benchmarks/bench_vs_minimind.py                                      # mmnb only

MiniMind's source is taken by path and never copied here; without it (or without the
`transformers` package its model imports) its loop is skipped and the mmnb figures and the MFU
are still measured. Its `trainer.train_pretrain.train_epoch` runs unchanged, on the same batches
of the same data and tokenizer, with a model of the same shape (read from MiniMind's own model,
so either generation works: MiniMind2 at c090b69 matches the `minimind2-small` preset exactly).

Methods alternate inside each round, one optimizer step per call, K steps per method per round;
per-round ratios to MiniMind are paired, and medians and ranges over the rounds are printed.
MFU is the model's FLOPs per step (matmuls and causal attention, 3x the forward) over the step
time, divided by the GEMM ceiling measured here for the same dtype and thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
import time
import types
import warnings
from pathlib import Path

import torch

import benchlib
from mmnb.config import ModelConfig, resolve
from mmnb.data import build_dataset, epoch_order, tokenizer_for
from mmnb.train import Trainer

TARGETS = [
    "best mmnb configuration >= 2.0x MiniMind's train_epoch tokens/s (same shape, batch, data)",
    "fp32 trainer within 3% of the bare loop: see benchmarks/bench_train.py",
    "MFU reported against the GEMM ceiling measured below (no fixed target)",
]


# ---- MiniMind, by path ----------------------------------------------------------------------


def load_minimind(src: Path) -> types.ModuleType | str:
    """MiniMind's train_pretrain module, or a one-line reason why it cannot run here."""
    if not (src / "trainer" / "train_pretrain.py").is_file():
        return f"{src} has no trainer/train_pretrain.py"
    try:
        import transformers  # noqa: F401  (MiniMind's model is a transformers PreTrainedModel)
    except ImportError:
        return "MiniMind's model needs the `transformers` package (pip install transformers)"
    try:
        import datasets  # noqa: F401
    except ImportError:
        # MiniMind's dataset module imports Hugging Face `datasets` at import time; its loop
        # is fed our batches here, so an empty stand-in suffices for the import to succeed.
        stub = types.ModuleType("datasets")
        for name in ("load_dataset", "Features", "Sequence", "Value"):
            setattr(stub, name, None)
        sys.modules["datasets"] = stub
    sys.path.insert(0, str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("trainer.train_pretrain")


class MiniMindLoop:
    """MiniMind's `train_epoch` with the globals its `__main__` block would set (CPU, fp32: its
    autocast is a nullcontext on CPU, and its GradScaler is disabled unless dtype is float16)."""

    def __init__(self, mod: types.ModuleType, batches, lr: float) -> None:
        from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

        self.mod, self.batches = mod, batches
        torch.manual_seed(42)
        mod.lm_config = MiniMindConfig(hidden_size=512, num_hidden_layers=8, use_moe=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod.model = MiniMindForCausalLM(mod.lm_config)
            mod.scaler = torch.cuda.amp.GradScaler(enabled=False)
        mod.optimizer = torch.optim.AdamW(mod.model.parameters(), lr=lr)
        mod.autocast_ctx = contextlib.nullcontext()
        mod.args = argparse.Namespace(
            device="cpu",
            epochs=1,
            learning_rate=lr,
            accumulation_steps=1,
            grad_clip=1.0,
            log_interval=10**9,  # no logging and no checkpoint inside the timed steps
            save_interval=10**9,
            save_dir="/nonexistent",
            save_weight="pretrain",
        )
        self.step = 0

    def run(self, k: int) -> float:
        batches = [self.batches[(self.step + i) % len(self.batches)] for i in range(k)]
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # iters is the epoch's planned length: only the lr schedule and the final-step
            # checkpoint read it, and a huge value keeps that checkpoint out of the timing.
            self.mod.train_epoch(0, batches, 10**9, start_step=self.step)
        self.step += k
        return time.perf_counter() - t0

    def model_config(self) -> ModelConfig:
        """mmnb's config of the same shape, read off MiniMind's instantiated model."""
        m = self.mod.model
        layer = m.model.layers[0]
        attn, mlp = layer.self_attn, layer.mlp
        head_dim = attn.head_dim
        return ModelConfig(
            vocab_size=m.lm_head.out_features,
            hidden_size=m.lm_head.in_features,
            num_hidden_layers=len(m.model.layers),
            num_attention_heads=attn.q_proj.out_features // head_dim,
            num_key_value_heads=attn.k_proj.out_features // head_dim,
            head_dim=head_dim,
            intermediate_size=mlp.gate_proj.out_features,
            rms_norm_eps=layer.input_layernorm.eps,
            rope_theta=float(self.mod.lm_config.rope_theta),
            qk_norm=hasattr(attn, "q_norm"),
        )


# ---- mmnb -----------------------------------------------------------------------------------


class MmnbLoop:
    """The trainer itself (no store attached: checkpoint I/O is bench_store.py's subject)."""

    def __init__(self, model_cfg: ModelConfig, dataset, dtype: str, compile_: bool, b: int):
        _, train_cfg = resolve(
            "minimind2-small",
            batch_size=b,
            max_seq_len=dataset.seq_len,
            epochs=1000,
            dtype=dtype,
            compile=compile_,
            log_every=10**6,
        )
        self.trainer = Trainer(model_cfg, train_cfg, dataset)

    def run(self, k: int) -> float:
        self.trainer.config.stop_at = self.trainer.step + k
        t0 = time.perf_counter()
        self.trainer.fit()
        return time.perf_counter() - t0


# ---- FLOPs and the GEMM ceiling --------------------------------------------------------------


def flops_per_step(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Training FLOPs of one step: 3x the forward (backward = 2x), matmuls and causal attention."""
    d, h, k, f = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per_layer = d * h * f + 2 * d * k * f + h * f * d + 3 * d * cfg.intermediate_size
    linear = cfg.num_hidden_layers * per_layer + d * cfg.vocab_size  # + the LM head
    tokens = batch * seq
    # Causal attention: each query sees (seq+1)/2 keys on average; QK^T and PV, 2 FLOPs a MAC.
    attention = cfg.num_hidden_layers * 2 * 2 * h * f * (seq + 1) / 2
    return 3 * tokens * (2 * linear + attention)


class Gemm:
    """The GEMM ceiling: the best of the model's own matmul shapes (M = tokens per step) in one
    dtype, picked once, then timed inside every round like the training loops, so each round's
    MFU divides by a ceiling measured under that round's conditions."""

    def __init__(self, cfg: ModelConfig, tokens: int, dtype: torch.dtype) -> None:
        d, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
        shapes = [(d, d), (d, i), (i, d), (d, v)]
        pairs = {
            kn: (torch.randn(tokens, kn[0], dtype=dtype), torch.randn(kn[0], kn[1], dtype=dtype))
            for kn in shapes
        }
        rates = {kn: max(self._rate(*pairs[kn]) for _ in range(3)) for kn in shapes}
        self.shape = max(shapes, key=rates.get)
        self.a, self.b = pairs[self.shape]
        self.flops = 2 * tokens * self.shape[0] * self.shape[1]
        self.reps = max(1, int(2e9 / self.flops))  # ~2 GFLOP per call

    @staticmethod
    def _rate(a: torch.Tensor, b: torch.Tensor) -> float:
        t0 = time.perf_counter()
        a @ b
        return 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - t0)

    def run(self) -> float:
        t0 = time.perf_counter()
        for _ in range(self.reps):
            self.a @ self.b
        return time.perf_counter() - t0

    def rates(self, seconds: list[float]) -> list[float]:
        return [self.reps * self.flops / s for s in seconds]


# ---- main -----------------------------------------------------------------------------------


def measure(args, threads: int, minimind, dataset, batches, model_cfg) -> dict[str, float]:
    """Alternated rounds at `threads`; returns {loop: median tokens/s} (and prints the table)."""
    torch.set_num_threads(threads)
    b, t = args.batch_size, args.seq_len
    print(f"\n## {threads} thread(s)")
    loops: dict[str, object] = {}
    if minimind is not None:
        loops["MiniMind"] = MiniMindLoop(minimind, batches, lr=5e-4)
    variants = [("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)]
    if args.quick:
        variants = [("fp32", False), ("bf16", False), ("bf16", True)]
    for dtype, comp in variants:
        loops[f"mmnb {dtype}{' compile' if comp else ''}"] = MmnbLoop(
            model_cfg, dataset, dtype, comp, b
        )
    warm = {}
    for name, loop in loops.items():  # warm-up: allocator, kernels, and compilation
        t0 = time.perf_counter()
        loop.run(args.warmup)
        warm[name] = time.perf_counter() - t0
    print(
        "  warm-up ({} steps): {}".format(
            args.warmup, ", ".join(f"{n} {s:.1f}s" for n, s in warm.items())
        )
    )
    gemms = {name: Gemm(model_cfg, b * t, dt) for name, dt in
             (("fp32", torch.float32), ("bf16", torch.bfloat16))}  # fmt: skip
    k = args.steps
    methods = {n: (lambda lp=lp: lp.run(k)) for n, lp in loops.items()}
    methods |= {f"GEMM {n}": g.run for n, g in gemms.items()}
    times = benchlib.alternate(methods, args.rounds)
    ceiling = {n: g.rates(times.pop(f"GEMM {n}")) for n, g in gemms.items()}
    for name, g in gemms.items():
        print(
            f"  GEMM ceiling {name}: {benchlib.spread([r / 1e9 for r in ceiling[name]], '{:.1f}')}"
            f" GFLOP/s ({b * t}x{g.shape[0]} @ {g.shape[0]}x{g.shape[1]}, the best of the "
            "model's shapes, timed in the same rounds)"
        )
    flops = flops_per_step(model_cfg, b, t)
    print(f"\n  {b}x{t} tokens per step, {flops / 1e9:.1f} GFLOP per step, {k} steps per call")
    print("  | loop | tokens/s median (range) | x MiniMind (paired) | MFU (paired) |")
    print("  |---|---|---|---|")
    medians = {}
    for name, secs in times.items():
        per_step = [s / k for s in secs]
        tps = [b * t / s for s in per_step]
        medians[name] = benchlib.median(tps)
        dtype = "bf16" if "bf16" in name else "fp32"
        mfu = [flops / s / c for s, c in zip(per_step, ceiling[dtype], strict=True)]
        vs = "-"
        if "MiniMind" in times and name != "MiniMind":
            vs = benchlib.spread(benchlib.ratios(times["MiniMind"], secs), "{:.2f}")
        print(
            f"  | {name} | {benchlib.spread(tps, '{:,.0f}')} | {vs} | "
            f"{benchlib.spread([100 * m for m in mfu], '{:.0f}%')} of {dtype} GEMM |"
        )
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minimind-src", type=Path, help="a MiniMind checkout (not copied)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per call")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="5 rounds of 1 step, one thread count")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup = 5, 1, 2
        args.threads = str(torch.get_num_threads())
    benchlib.header("mmnb vs MiniMind: training tokens/s and MFU", TARGETS)

    minimind = None
    if args.minimind_src is None:
        print("MiniMind: skipped (no --minimind-src given)")
    else:
        loaded = load_minimind(args.minimind_src.expanduser().resolve())
        if isinstance(loaded, str):
            print(f"MiniMind: skipped ({loaded})")
        else:
            minimind = loaded
            print(f"MiniMind: {args.minimind_src}  (train_pretrain.train_epoch, fp32 on CPU)")

    if minimind is not None:
        model_cfg = MiniMindLoop(minimind, [], 5e-4).model_config()
    else:
        model_cfg, _ = resolve("minimind2-small")
    tokenizer = tokenizer_for(None, model_cfg.vocab_size)
    dataset = build_dataset(None, tokenizer, args.seq_len)
    order = epoch_order(len(dataset), 1337, 0)
    b = args.batch_size
    batches = [dataset.batch(order[i : i + b]) for i in range(0, 64 * b, b)]
    print(
        f"model: {model_cfg.num_hidden_layers}x{model_cfg.hidden_size}, "
        f"kv heads {model_cfg.num_key_value_heads}, SwiGLU {model_cfg.intermediate_size}, "
        f"qk-norm {model_cfg.qk_norm}; data: bundled corpus, {len(dataset)} samples of "
        f"{args.seq_len}; batch {b}x{args.seq_len}; {args.rounds} rounds"
    )
    results = {}
    for threads in (int(x) for x in args.threads.split(",")):
        results[threads] = measure(args, threads, minimind, dataset, batches, model_cfg)
    best = max(
        (
            (th, name, tps)
            for th, r in results.items()
            for name, tps in r.items()
            if name != "MiniMind"
        ),
        key=lambda x: x[2],
    )
    line = f"\nfastest mmnb loop: {best[1]} at {best[0]} thread(s), {best[2]:,.0f} tokens/s"
    if "MiniMind" in results[best[0]]:
        line += f" = {best[2] / results[best[0]]['MiniMind']:.2f}x MiniMind at that thread count"
    print(line + " (medians; the paired ratios above are the figures to quote)")
    benchlib.footer()
    print(f"peak resident memory of this process: {benchlib.peak_rss_mib():,.0f} MiB")


if __name__ == "__main__":
    main()
