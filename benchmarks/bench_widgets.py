"""What the widgets cost: dashboard overhead on training, and browser slider latency.

    python benchmarks/bench_widgets.py            # tiny preset + 1,000-checkpoint run
    python benchmarks/bench_widgets.py --quick    # fewer steps, 200 checkpoints

1. Training with a `Dashboard` listener vs without, side by side in one process, the two
   alternating within each round (`benchlib.alternate`), the ratio paired per round, median
   and range over >= 5 rounds; an event every step (log_every=1), the worst case.
   Target: ratio <= 1.03. Printed for the tiny preset (150 steps, ~15 s: the longer run) and
   for a micro model whose 1–2 ms steps expose the per-event cost (1,500 steps, ~2 s: the
   short run), with the PNG plot and (when ipympl is installed) with ipympl's canvas as a
   connected front-end gets it (frames sent as changed pixels). The dashboard draws on a
   render thread of its own; printed apart: the listener's time in the training thread, the
   render thread's drawing time (both as fractions of training; in CPython the second still
   competes for the GIL), and, outside the training time, building the dashboard (its empty
   first picture, made in the cell before training) and the wait after training for the final
   picture (what `freeze()` at the end of a `%train` cell waits for).
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
    """The dashboard as a listener, with the time its calls take in the training thread (the
    drawing is on its render thread, whose time `Renderer.seconds` counts)."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        self.seconds = 0.0
        self.drawing = 0.0  # the render thread's drawing time while training ran
        self.plots = 0  # pictures drawn while training ran
        self.end = 0.0  # after training: until the final line and picture are drawn

    def __call__(self, event) -> None:  # noqa: ANN001
        t0 = time.perf_counter()
        self.dashboard(event)
        self.seconds += time.perf_counter() - t0


def _fit_seconds(setup, steps: int, listener: _Timed | None) -> float:
    model_cfg, train_cfg, dataset = setup
    trainer = Trainer(model_cfg, dataclasses.replace(train_cfg, max_steps=steps), dataset)
    if listener is not None:
        trainer.listeners.append(listener)
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    if listener is not None:
        renderer = listener.dashboard._renderer
        listener.drawing = sum(renderer.seconds.values())
        listener.plots = renderer.draws["plot"]
        # What `freeze()` waits for at the end of a cell: the render thread's last picture.
        # Outside the training time (training has ended), and before the next round starts.
        t0 = time.perf_counter()
        assert listener.dashboard.wait(timeout=120)
        listener.end = time.perf_counter() - t0
    return seconds


def overhead(label: str, options: dict, steps: int, rounds: int, interactive: bool) -> None:
    model_cfg, train_cfg = resolve("tiny", log_every=1, epochs=100, **options)
    tokenizer = tokenizer_for(None, model_cfg.vocab_size)
    setup = (model_cfg, train_cfg, build_dataset(None, tokenizer, train_cfg.max_seq_len))
    # Warm-up of both: allocator, kernels, and matplotlib's one-time font set-up (paid once
    # per kernel, by the first dashboard).
    _fit_seconds(setup, max(steps // 10, 5), None)
    _fit_seconds(setup, max(steps // 10, 5), _Timed(_dashboard(interactive, plot_interval=0)))
    timed: list[_Timed] = []
    built: list[float] = []

    def shown() -> float:
        t0 = time.perf_counter()
        timed.append(_Timed(_dashboard(interactive)))  # built untimed, as in a notebook cell
        built.append(time.perf_counter() - t0)
        return _fit_seconds(setup, steps, timed[-1])

    times = alternate({"bare": lambda: _fit_seconds(setup, steps, None), "shown": shown}, rounds)
    dash = timed[-1].dashboard
    listener = [t.seconds / b for t, b in zip(timed, times["bare"], strict=True)]
    drawing = [t.drawing / b for t, b in zip(timed, times["bare"], strict=True)]
    plots = [t.plots for t in timed]
    plot = "ipympl canvas" if dash.plot.interactive else "PNG plot"
    print(
        f"{label}, {plot}: {steps} steps, {rounds} rounds, an event per step\n"
        f"  seconds without dashboard {spread(times['bare'])}, with {spread(times['shown'])}"
        f" ({steps / median(times['bare']):.0f} steps/s)\n"
        f"  with / without {spread(ratios(times['shown'], times['bare']))} (target <= 1.03)\n"
        f"  in the training thread: the listener / training {spread(listener)}; on the render "
        f"thread while training: drawing / training {spread(drawing)}, the plot drawn "
        f"{spread(plots, '{:.0f}')}x (last run in all: {dash.plot.full_draws} full draws, "
        f"{dash.plot.layouts} layouts)\n"
        f"  outside training: building the dashboard (its first, empty picture) "
        f"{spread(built)}s; after training until the final picture {spread([t.end for t in timed])}s"
    )
    for t in timed:
        t.dashboard.close()


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
