"""Data larger than memory: preparing a ~1 GB JSONL, and how soon training starts from it.

    python benchmarks/bench_data.py                 # ~1 GB generated JSONL
    python benchmarks/bench_data.py --quick         # ~100 MB
    python benchmarks/bench_data.py --size-mb 2048  # any size

1. A JSONL of pretraining documents is generated with the corpus generator (`mmnb.corpus`,
   a new seed per block of documents, so no two blocks repeat).
2. A fresh process trains the tokenizer (on its bounded sample) and prepares the token cache;
   it reports the throughput (MB/s of input, tokens/s) and its peak resident memory (VmHWM of
   that process: one measurement — a peak is a maximum, not a median).
3. From the prepared cache, fresh processes time `mmnb.train` from its call to the end of the
   first optimizer step, with the data file's and token file's pages dropped (cold) or cached
   (warm), alternated with the same on the bundled corpus; the data's own part (finding the
   tokenizer and mapping the token cache) is timed inside; medians and ranges are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import benchlib
from mmnb import corpus

TARGETS = [
    "peak resident memory while preparing a 1 GB JSONL <= 1.5 GiB",
    "first optimizer step within 2 s of calling train on a prepared cache (fresh process)",
    "prep throughput: reported (MB/s of input, tokens/s), no fixed target",
]

_MODEL = dict(hidden_size=64, layers=2, heads=2, kv_heads=1, intermediate_size=128)


def generate(path: Path, size_mb: int) -> float:
    """Write ~size_mb MiB of corpus documents as JSONL; return the seconds it took."""
    t0 = time.perf_counter()
    target = size_mb << 20
    seed = 0
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < target:
            docs = corpus.generate_pretrain(seed=seed, num_docs=2000)
            f.write("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
            seed += 1
    return time.perf_counter() - t0


PREPARE = textwrap.dedent("""
    import json, sys, time
    from mmnb.data import build_dataset, tokenizer_for
    path, vocab = sys.argv[1], int(sys.argv[2])
    t0 = time.perf_counter()
    tok = tokenizer_for(path, vocab)
    t1 = time.perf_counter()
    ds = build_dataset(path, tok, 256)
    t2 = time.perf_counter()
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
    print(json.dumps({"tokenizer_s": t1 - t0, "prepare_s": t2 - t1, "tokens": len(ds._tokens),
                      "peak_kib": int(hwm)}))
""")

FIRST_STEP = textwrap.dedent("""
    import json, sys, tempfile, time
    import mmnb, mmnb.api as api
    path, vocab, model = sys.argv[1] or None, int(sys.argv[2]), json.loads(sys.argv[3])
    data_s = []
    def timed(fn):  # the data's part: finding the tokenizer and mapping the token cache
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                data_s.append(time.perf_counter() - t)
        return wrapper
    api.tokenizer_for, api.build_dataset = timed(api.tokenizer_for), timed(api.build_dataset)
    t0 = time.perf_counter()
    first = []
    def on(event):
        if event.kind == "step" and not first:
            first.append(time.perf_counter() - t0)
    mmnb.train(store=tempfile.mkdtemp(), data=path, vocab_size=vocab, max_steps=1, log_every=1,
               max_seq_len=256, batch_size=4, listeners=[on], **model)
    print(json.dumps({"first_step_s": first[0], "data_s": sum(data_s)}))
""")


def run_child(code: str, *args: str, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env
    )
    if out.returncode:
        raise SystemExit(f"child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="~100 MB, 5 rounds")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--vocab-size", type=int, default=6400)
    args = parser.parse_args()
    if args.quick:
        args.size_mb, args.rounds = 100, 5
    benchlib.header("data larger than memory: streaming preparation", TARGETS)
    folder = Path(tempfile.mkdtemp(prefix="mmnb-bench-data-", dir=os.environ.get("BENCH_DIR")))
    env = {**os.environ, "MMNB_CACHE": str(folder / "cache")}
    try:
        data = folder / "big.jsonl"
        gen_s = generate(data, args.size_mb)
        size = data.stat().st_size
        print(f"generated {size / 2**20:,.0f} MiB of JSONL in {gen_s:.0f}s ({data})")

        prep = run_child(PREPARE, str(data), str(args.vocab_size), env=env)
        mib = size / 2**20
        print(f"\ntokenizer (bounded sample, vocab {args.vocab_size}): {prep['tokenizer_s']:.1f}s")
        print(
            f"prepare: {prep['prepare_s']:.1f}s = {mib / prep['prepare_s']:,.1f} MiB/s, "
            f"{prep['tokens'] / prep['prepare_s']:,.0f} tokens/s ({prep['tokens']:,} tokens)"
        )
        peak = prep["peak_kib"] / 2**20
        print(f"peak resident memory of the preparing process: {peak:.2f} GiB (target <= 1.5)")
        cache_files = list((folder / "cache" / "tokens").glob("v*/tokens.bin"))
        print(f"token file: {cache_files[0].stat().st_size / 2**20:,.0f} MiB")

        model = json.dumps(_MODEL)

        data_times: dict[str, list[float]] = {"cold": [], "warm": [], "bundled": []}

        def first_step(name: str, path: str, drop: bool):
            def call() -> float:
                if drop:
                    benchlib.drop_page_cache(cache_files[0])
                    benchlib.drop_page_cache(data)
                out = run_child(FIRST_STEP, path, str(args.vocab_size), model, env=env)
                data_times[name].append(out["data_s"])
                return out["first_step_s"]

            return call

        methods = {
            "cold": first_step("cold", str(data), True),
            "warm": first_step("warm", str(data), False),
            "bundled": first_step("bundled", "", False),
        }
        for call in methods.values():
            call()  # the tokenizers and the imports are warm for every method from here on
        for values in data_times.values():
            values.clear()
        times = benchlib.alternate(methods, args.rounds)
        print(
            f"\ntrain() call to the end of the first step, fresh process, cache prepared "
            f"({args.rounds} rounds, alternated; the model is {_MODEL['layers']}x"
            f"{_MODEL['hidden_size']}, so the fixed start-up cost shows):"
        )
        labels = {
            "cold": f"{mib:,.0f} MiB data, cold page cache",
            "warm": f"{mib:,.0f} MiB data, warm page cache",
            "bundled": "bundled corpus (1.5 MB), for comparison",
        }
        for name, values in times.items():
            print(
                f"  {labels[name]}: {benchlib.spread(values)} s, of which the data "
                f"(tokenizer + token cache) {benchlib.spread(data_times[name])} s (target <= 2)"
            )
        ratio = benchlib.ratios(times["warm"], times["bundled"])
        print(f"  large / bundled data, warm: {benchlib.spread(ratio, '{:.2f}')}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    benchlib.footer()


if __name__ == "__main__":
    main()
