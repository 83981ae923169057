"""`%train` (in an InteractiveShell, with the live display) vs `mmnb.train(...)`: the magic's cost.

    python benchmarks/bench_magics.py            # tiny preset, 16x128, 12 pairs of 30-step runs
    python benchmarks/bench_magics.py --quick    # fewer steps, 6 rounds

Both train the same config into a temporary store, with a progress event every step (the
worst case for the display). They are measured side by side in one process, alternating
which goes first; the median and range of the per-pair ratios are printed (target <= 1.03).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config

import benchlib
import mmnb

OPTIONS = dict(preset="tiny", batch_size=16, max_seq_len=128, log_every=1)


def magic_line(name: str, store: Path, steps: int) -> str:
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in OPTIONS.items())
    return f"{name} {flags} --max-steps {steps} --no-sample --store {store}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps, rounds = (10, 6) if args.quick else (30, 12)
    benchlib.header("%train vs mmnb.train", ["%train / mmnb.train <= 1.03 (wall, paired)"])

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "mmnb")
    store = Path(tempfile.mkdtemp(prefix="bench-magics-"))
    draws = 0

    def via_magic(i: int) -> tuple[float, float]:
        nonlocal draws
        start = time.perf_counter(), time.process_time()
        with capture_output() as cap:  # a front-end that keeps display updates: drawn in place
            shell.run_line_magic("train", magic_line(f"magic-{i}", store, steps))
        draws += len(cap.outputs)
        return time.perf_counter() - start[0], time.process_time() - start[1]

    def via_api(i: int) -> tuple[float, float]:
        start = time.perf_counter(), time.process_time()
        mmnb.train(f"api-{i}", store=store, max_steps=steps, **OPTIONS)
        return time.perf_counter() - start[0], time.process_time() - start[1]

    via_api(-1)  # warm up: tokenizer and data cache, kernels, allocator
    via_magic(-1)
    draws = 0
    pairs = []
    for i in range(rounds):
        # Alternate which goes first, so drift and a busy machine hit both alike.
        if i % 2:
            a = via_api(i)
            m = via_magic(i)
        else:
            m = via_magic(i)
            a = via_api(i)
        pairs.append((m, a))
    magic, api = sum(m[0] for m, _ in pairs), sum(a[0] for _, a in pairs)
    ratios = [m[0] / a[0] for m, a in pairs]
    # CPU time is what a busy machine disturbs least (other processes take wall time).
    cpu = sum(m[1] for m, _ in pairs) / sum(a[1] for _, a in pairs)
    print(
        f"{rounds} rounds of {steps} steps ({OPTIONS['batch_size']}x{OPTIONS['max_seq_len']}, "
        f"tiny): %train {magic:.2f} s, mmnb.train {api:.2f} s, "
        f"{draws / rounds:.1f} display draws per run"
    )
    print(
        f"%train / mmnb.train: wall {benchlib.spread(ratios)} median (range) of pairs, "
        f"{magic / api:.3f} summed; CPU {cpu:.3f}  (target <= 1.03)"
    )
    benchlib.footer()


if __name__ == "__main__":
    main()
