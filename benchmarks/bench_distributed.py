"""Distributed training and sharded checkpoints, measured side by side in one run.

    python benchmarks/bench_distributed.py            # minimind2-small state, tiny training
    python benchmarks/bench_distributed.py --quick    # tiny everything (a smoke run)

Three measurements (docs/distributed.md), each in its own torchrun job of 2 processes:

1. save: a 2-rank FSDP2 checkpoint written as shards in parallel (`store.sharded`) against
   the same state gathered to rank 0 (`get_state_dict(full_state_dict=True)`) and written by
   it alone — alternating per round, both fsynced, timed on rank 0 between barriers.
   Target: sharded / gathered <= 0.6.
2. train: tokens/s of 2-rank DDP with 1 thread each against 1 process with 1 thread and the
   same global batch (accum doubled) — alternating per round; tokens/s from the trainer's own
   per-step clock after warm-up steps. Target: >= 1.6x; scaling efficiency = speedup / 2.
3. load: bytes read (`/proc/self/io` rchar) when 1 process loads the weights of that 2-rank
   checkpoint (`mmnb.load_model`), against the checkpoint's bytes on disk and the weights'
   own bytes. Target: reads only the tensors it needs (~ the weights, not the moments).

Run with nothing else on the machine for figures worth quoting; under load they are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import benchlib  # noqa: E402

TARGETS = [
    "2-rank sharded save / rank-0 gathered save <= 0.6 (shards written in parallel)",
    "2-rank DDP, 1 thread each: tokens/s >= 1.6x one process, 1 thread, same global batch",
    "loading a 2-rank checkpoint in 1 process reads only the tensors it needs",
]


def torchrun(args: list[str], nproc: int = 2, timeout: float = 1800) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={nproc}", __file__, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"torchrun {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def plain(args: list[str], timeout: float = 1800) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def result(stdout: str) -> dict:
    """The worker's one JSON line (prefixed RESULT)."""
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise SystemExit(f"no result in:\n{stdout[-2000:]}")


# ---- 1 and 3: saving and loading a sharded checkpoint ----------------------------------------


def worker_save(preset: str, folder: str, rounds: int) -> None:
    """In each rank of a 2-process job: FSDP2 state after one step; sharded vs gathered saves."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from mmnb.config import config_to_dict, resolve
    from mmnb.data import build_dataset, tokenizer_for
    from mmnb.dist import Parallel
    from mmnb.store import Run, Store
    from mmnb.store.sharded import commit_sharded
    from mmnb.train import Trainer

    par = Parallel.from_env("cpu", shard=True)
    model_cfg, train_cfg = resolve(
        preset, batch_size=1, max_seq_len=64, max_steps=1, world_size=par.world_size
    )
    tokenizer = tokenizer_for(None, model_cfg.vocab_size)
    dataset = build_dataset(None, tokenizer, train_cfg.max_seq_len)
    trainer = Trainer(model_cfg, train_cfg, dataset, parallel=par)
    trainer._train_step()  # AdamW's moments exist: weights + 2 moments per parameter
    store = Store(Path(folder) / "store")
    config = config_to_dict(model_cfg, train_cfg)
    if par.is_main:
        run = store.create_run("shards", config, tokenizer.to_json())
        run.open_writer()
        gathered = store.create_run("gathered", config, tokenizer.to_json())
        gathered.open_writer()
    par.barrier()
    run = run if par.is_main else Run(store, "shards")
    step = [0]
    state = trainer.state_dict()

    def at_step(tree: dict, n: int) -> dict:
        # Each save a step of its own (the store checks the step in trainer and schedule).
        return {
            **tree,
            "trainer": {**tree["trainer"], "step": n},
            "schedule": {**tree["schedule"], "step": n},
        }

    def sharded() -> float:
        nonlocal state
        step[0] += 1
        state = at_step(state, step[0])
        par.barrier()
        t0 = time.perf_counter()
        commit_sharded(run, state, ["bench"], [], par)
        par.barrier()
        seconds = time.perf_counter() - t0
        if par.is_main:  # keep the disk small: only the newest of each
            for old in run.steps()[:-1]:
                run.delete(old.step)
        return seconds

    def gather_then_write() -> float:
        step[0] += 1
        par.barrier()
        t0 = time.perf_counter()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full_model = get_model_state_dict(trainer.model, options=options)
        full_optim = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=options)
        if par.is_main:
            whole = {**state, "model": full_model}
            groups = state["optim"]["param_groups"]
            whole["optim"] = {"state": full_optim["state"], "param_groups": groups}
            gathered.commit(at_step(whole, step[0]), ["bench"])
        par.barrier()
        seconds = time.perf_counter() - t0
        if par.is_main:
            for old in gathered.steps()[:-1]:
                gathered.delete(old.step)
        return seconds

    times = benchlib.alternate({"sharded": sharded, "gathered": gather_then_write}, rounds)
    weights = sum(t.numel() * t.element_size() for t in full_weights(trainer))  # a collective
    if par.is_main:
        last = run.latest()
        files = sorted((run.path / "ckpt").glob(f"{last.step:08d}*.h5"))
        print(
            "RESULT "
            + json.dumps(
                {
                    "times": times,
                    "bytes": sum(p.stat().st_size for p in files),
                    "full_weights_bytes": weights,
                }
            )
        )
    par.close()


def full_weights(trainer) -> list:
    """The model's whole tensors (tied ones once), gathered from the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    unique = {}
    for tensor in full.values():
        unique.setdefault((tensor.data_ptr(), tuple(tensor.shape)), tensor)
    return list(unique.values())


def worker_load(folder: str) -> None:
    """One process: load the weights of the newest 2-rank checkpoint; count bytes read."""
    from mmnb.api import load_model
    from mmnb.store import Store

    run = Store(Path(folder) / "store").run("shards")
    # The first checkpoint read imports torch._dynamo (the store checks shapes against a model
    # on the meta device): megabytes of modules that are not the checkpoint's bytes.
    run.metrics()

    def rchar() -> int:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar")).split()[1])

    before = rchar()
    load_model(run)
    weights_read = rchar() - before
    before = rchar()
    run.load()  # everything: weights, moments, the rest
    all_read = rchar() - before
    print("RESULT " + json.dumps({"weights_read": weights_read, "all_read": all_read}))


# ---- 2: training throughput ------------------------------------------------------------------


def worker_train(folder: str, name: str, accum: int, steps: int, warmup: int) -> None:
    """A run of `steps` (this process, or every rank of a torchrun job); rank 0 reports tok/s
    over the steps after `warmup`, from the trainer's own clock (no startup, no checkpoints)."""
    import mmnb

    run = mmnb.train(
        name,
        store=str(Path(folder) / "train"),
        preset="tiny",
        batch_size=8,
        max_seq_len=128,
        accum=accum,
        max_steps=steps,
        log_every=steps,
        device="cpu",
    )
    if int(os.environ.get("RANK", 0)) == 0:
        m = run.metrics()
        tokens = m["tokens"][-1] - m["tokens"][warmup - 1]
        seconds = m["time"][-1] - m["time"][warmup - 1]
        print("RESULT " + json.dumps({"tokens_per_s": float(tokens / seconds)}))


# ---- the driver ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--rounds", type=int, default=benchlib.MIN_ROUNDS)
    parser.add_argument("--worker", choices=["save", "load", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="minimind2-small", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--accum", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=40, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "save":
        return worker_save(args.preset, args.folder, args.rounds)
    if args.worker == "load":
        return worker_load(args.folder)
    if args.worker == "train":
        return worker_train(args.folder, args.name, args.accum, args.steps, args.warmup)

    benchlib.header("mmnb distributed: sharded saves, DDP scaling, partial loads", TARGETS)
    preset = "tiny" if args.quick else "minimind2-small"
    steps, warmup = (15, 5) if args.quick else (40, 10)
    with tempfile.TemporaryDirectory(prefix="mmnb-bench-dist-") as folder:
        # 1. save
        out = result(torchrun(["--worker", "save", "--folder", folder, "--preset", preset,
                               "--rounds", str(args.rounds)]))  # fmt: skip
        sharded, gathered = out["times"]["sharded"], out["times"]["gathered"]
        ratio = benchlib.ratios(sharded, gathered)
        mib = out["bytes"] / 2**20
        print(f"1. save of a 2-rank FSDP2 checkpoint, {preset} ({mib:.1f} MiB on disk), "
              f"{args.rounds} rounds")  # fmt: skip
        print(f"   sharded (2 ranks write)     s: {benchlib.spread(sharded)}")
        print(f"   gathered to rank 0, 1 write s: {benchlib.spread(gathered)}")
        print(f"   sharded / gathered           : {benchlib.spread(ratio)}   target <= 0.6")
        # 3. load (the newest sharded checkpoint of the save job)
        load = result(plain(["--worker", "load", "--folder", folder]))
        weights = out["full_weights_bytes"]
        print("3. load that checkpoint in 1 process")
        print(f"   checkpoint files on disk     : {out['bytes']:,} bytes")
        print(f"   weights' own bytes           : {weights:,} bytes")
        print(f"   read to load the weights     : {load['weights_read']:,} bytes "
              f"({load['weights_read'] / out['bytes']:.2f} of the files, "
              f"{load['weights_read'] / weights:.2f} x the weights)")  # fmt: skip
        print(f"   read to load everything      : {load['all_read']:,} bytes "
              f"({load['all_read'] / out['bytes']:.2f} of the files)")  # fmt: skip
        # 2. train
        one, two = [], []

        def one_rank() -> float:
            name = f"one-{len(one)}"
            r = result(plain(["--worker", "train", "--folder", folder, "--name", name,
                              "--accum", "2", "--steps", str(steps), "--warmup", str(warmup)]))  # fmt: skip
            one.append(r["tokens_per_s"])
            return 0.0

        def two_ranks() -> float:
            name = f"two-{len(two)}"
            r = result(torchrun(["--worker", "train", "--folder", folder, "--name", name,
                                 "--accum", "1", "--steps", str(steps), "--warmup", str(warmup)]))  # fmt: skip
            two.append(r["tokens_per_s"])
            return 0.0

        benchlib.alternate({"one": one_rank, "two": two_ranks}, args.rounds)
        speedup = benchlib.ratios(two, one)
        print(f"2. training tokens/s, tiny preset, global batch 16 x 128 tokens, steps "
              f"{warmup + 1}-{steps} of {steps}, {args.rounds} rounds")  # fmt: skip
        print(f"   1 process, 1 thread, accum 2 : {benchlib.spread(one, '{:,.0f}')}")
        print(f"   2 ranks DDP, 1 thread each   : {benchlib.spread(two, '{:,.0f}')}")
        print(f"   speedup                      : {benchlib.spread(speedup, '{:.2f}')}x   "
              f"target >= 1.6x")  # fmt: skip
        print(f"   scaling efficiency           : "
              f"{benchlib.spread([s / 2 for s in speedup], '{:.0%}')}")  # fmt: skip
    benchlib.footer()


if __name__ == "__main__":
    main()
