"""What the widgets cost: dashboard overhead on training, and browser slider latency.

    python benchmarks/bench_widgets.py            # tiny preset + 1,000-checkpoint run
    python benchmarks/bench_widgets.py --quick    # fewer steps, 200 checkpoints

1. Training with a `Dashboard` listener vs without, side by side in one process, the two
   alternating within each round (`benchlib.alternate`), the ratio paired per round, median
   and range over >= 5 rounds; an event every step (log_every=1), the worst case.
   Target: ratio <= 1.03. Printed for the tiny preset and for a micro model whose 1–2 ms
   steps expose the per-event cost, with the PNG plot and (when ipympl is installed) with
   ipympl's canvas as a connected front-end gets it (frames sent as changed pixels).
   The dashboard's own time is printed split: its per-step work as a fraction of training,
   and the two full draws every run pays once (the first picture, the final one).
2. A slider move in the history browser on a run of 1,000 checkpoints (built by training a
   micro model with save_every=1): the time from setting the slider to the plot PNG and
   metadata being replaced, sample generation aside. Target: < 200 ms.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import mmnb  # noqa: E402
from benchlib import MIN_ROUNDS, alternate, footer, header, median, ratios, spread  # noqa: E402
from mmnb.config import resolve  # noqa: E402
from mmnb.data import build_dataset, tokenizer_for  # noqa: E402
from mmnb.train import Trainer  # noqa: E402
from mmnb.widgets import Browser, Dashboard, interactive  # noqa: E402

MICRO = dict(
    hidden_size=32,
    layers=1,
    heads=2,
    kv_heads=1,
    intermediate_size=64,
    vocab_size=300,
    max_seq_len=32,
    batch_size=4,
)


def _dashboard(interactive: bool, **kwargs) -> Dashboard:
    dash = Dashboard(interactive=interactive, **kwargs)
    if dash.plot.interactive:
        # As with a front-end connected: frames go out as messages, not as a data URL too.
        dash.plot.widget.syncing_data_url = False
    return dash


class _Timed:
    """The dashboard as a listener, its own time split: the first and last event's redraws
    (a full plot draw each, once per run) apart from the per-step work (folding, throttled
    redraws) — the two costs scale differently with a run's length."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        self.seconds: dict[str, float] = {"first picture": 0.0, "per step": 0.0, "end": 0.0}
        self._drawn = False

    def __call__(self, event) -> None:  # noqa: ANN001
        t0 = time.perf_counter()
        draws = self.dashboard.plot.full_draws
        self.dashboard(event)
        cost = time.perf_counter() - t0
        if event.kind == "stop":
            self.seconds["end"] += cost
        elif not self._drawn and self.dashboard.plot.full_draws > draws:
            self._drawn = True
            self.seconds["first picture"] += cost
        else:
            self.seconds["per step"] += cost


def _fit_seconds(setup, steps: int, listener: _Timed | None) -> float:
    model_cfg, train_cfg, dataset = setup
    trainer = Trainer(model_cfg, dataclasses.replace(train_cfg, max_steps=steps), dataset)
    if listener is not None:
        trainer.listeners.append(listener)
    t0 = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - t0


def overhead(label: str, options: dict, steps: int, rounds: int, interactive: bool) -> None:
    model_cfg, train_cfg = resolve("tiny", log_every=1, epochs=100, **options)
    tokenizer = tokenizer_for(None, model_cfg.vocab_size)
    setup = (model_cfg, train_cfg, build_dataset(None, tokenizer, train_cfg.max_seq_len))
    # Warm-up of both: allocator, kernels, and matplotlib's one-time font set-up (paid once
    # per kernel, by the first dashboard).
    _fit_seconds(setup, max(steps // 10, 5), None)
    _fit_seconds(setup, max(steps // 10, 5), _Timed(_dashboard(interactive, plot_interval=0)))
    timed: list[_Timed] = []

    def shown() -> float:
        timed.append(_Timed(_dashboard(interactive)))  # built untimed, as in a notebook cell
        return _fit_seconds(setup, steps, timed[-1])

    times = alternate({"bare": lambda: _fit_seconds(setup, steps, None), "shown": shown}, rounds)
    dash = timed[-1].dashboard
    split = {k: [t.seconds[k] for t in timed] for k in timed[0].seconds}
    per_step = [t / b for t, b in zip(split.pop("per step"), times["bare"], strict=True)]
    plot = "ipympl canvas" if dash.plot.interactive else "PNG plot"
    print(
        f"{label}, {plot}: {steps} steps, {rounds} rounds, an event per step\n"
        f"  seconds without dashboard {spread(times['bare'])}, with {spread(times['shown'])}"
        f" ({steps / median(times['bare']):.0f} steps/s)\n"
        f"  with / without {spread(ratios(times['shown'], times['bare']))} (target <= 1.03); "
        f"last run drew text {dash.draws['text']}x, plot {dash.draws['plot']}x "
        f"({dash.plot.full_draws} full draws)\n"
        f"  the dashboard's own time: per-step work / training {spread(per_step)}; once per run:"
        + "".join(f" {k} {spread(v)}s" for k, v in split.items())
    )


def slider(folder: Path, n: int) -> None:
    store = mmnb.Store(folder / "store")
    t0 = time.perf_counter()
    mmnb.train("many", store=store, max_steps=n, save_every=1, epochs=1000, log_every=1, **MICRO)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = Browser(store)  # reads the index and the newest checkpoint's metrics once
    opened = time.perf_counter() - t0
    steps = [s.step for s in store.run("many").steps()]
    assert len(steps) == n + 1
    rng = random.Random(0)
    moves = []
    for _ in range(60):
        step = rng.choice(steps)
        if step == b.slider.value:
            continue
        t0 = time.perf_counter()
        b.slider.value = step  # what a settled drag sends: the observer redraws
        moves.append(time.perf_counter() - t0)
        assert b.meta_text().startswith(f"many step {step} ")
    t0 = time.perf_counter()
    b.refresh()  # nothing changed: no index is re-read
    refresh = time.perf_counter() - t0
    t0 = time.perf_counter()
    b.sampler.tokens.value = 32
    b.sampler.generate()
    sample = time.perf_counter() - t0
    moves.sort()
    print(
        f"\nhistory browser on a run of {n + 1} checkpoints (built in {build:.1f}s):\n"
        f"  open {opened * 1000:.0f} ms; slider move median {statistics.median(moves) * 1000:.1f}"
        f" ms, p90 {moves[int(len(moves) * 0.9)] * 1000:.1f} ms, max {moves[-1] * 1000:.1f} ms"
        f" (target < 200 ms)\n"
        f"  refresh (unchanged) {refresh * 1000:.1f} ms; "
        f"first sample of 32 tokens (loads weights) {sample * 1000:.0f} ms"
    )
    b.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    rounds = MIN_ROUNDS if args.quick else 7
    header(
        "bench_widgets: the dashboard's cost on training, the browser's slider",
        [
            "training with / without a Dashboard <= 1.03",
            "slider move on 1,000 checkpoints < 200 ms",
        ],
    )
    kinds = [False] + ([True] if interactive.available() else [])
    for canvas in kinds:
        overhead("tiny preset", {}, 40 if args.quick else 150, rounds, canvas)
        overhead("micro model", MICRO, 200 if args.quick else 1500, rounds, canvas)
    folder = Path(tempfile.mkdtemp(prefix="mmnb-bench-", dir=os.environ.get("BENCH_DIR")))
    try:
        slider(folder, 200 if args.quick else 1000)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    footer()


if __name__ == "__main__":
    main()
