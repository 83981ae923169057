"""Loss curves of several runs on one plot, aligned by optimizer step.

A branch's metrics hold its parent's history up to the branch step, so step numbers line up by
construction. When a run's parent is also shown, only the branch's own part is drawn (from its
branch point, marked with a triangle), so each divergence is visible where it happens instead
of hiding under an identical copy of the shared history.
"""

from __future__ import annotations

import threading
from typing import Any

import ipywidgets as w
import numpy as np

from .catalog import Catalog
from .log import Log
from .plots import COLORS, Plot


class Compare:
    """The Compare tab: pick runs, see their loss curves together."""

    def __init__(self, catalog: Catalog, log: Log, *, interactive: bool | None = None) -> None:
        self.catalog = catalog
        label = {"description_width": "initial"}
        self.runs = w.SelectMultiple(options=[], rows=5, description="runs", style=label)
        self.smooth = w.Checkbox(value=False, description="smooth (EMA 0.9)", indent=False)
        # Where runs differ the curves are close: a log y axis and a step range to zoom into.
        self.log_scale = w.Checkbox(value=True, description="log scale", indent=False)
        self.steps = w.IntRangeSlider(
            value=(0, 1),
            min=0,
            max=1,
            description="steps",
            continuous_update=False,
            style=label,
            layout=w.Layout(width="30em"),
        )
        # Zoom, pan and hover through ipympl where it can be shown (`interactive.enabled`).
        # 9 inches: a canvas does not shrink, and this one sits inside the tabs' padding.
        self.plot = Plot(("loss",), width=9.0, height=3.4, grow=1.03, interactive=interactive)
        self._lock = threading.Lock()
        self._following = False  # set while the step range follows the runs: no redraw
        draw = log.guard(lambda _change: self._following or self.draw(), "compare")
        for control in (self.runs, self.smooth, self.log_scale, self.steps):
            control.observe(draw, names="value")
        self.view = w.VBox(
            [
                w.HBox(
                    [self.runs, w.VBox([self.smooth, self.log_scale, self.steps])],
                    layout=w.Layout(align_items="flex-start"),
                ),
                self.plot.widget,
            ]
        )
        self.view.add_class("mmnb-compare")

    def update_options(self) -> None:
        """Follow the catalog (after a refresh); keep the chosen runs that still exist."""
        names = self.catalog.names()
        chosen = tuple(n for n in self.runs.value if n in names)
        if list(self.runs.options) != names:
            self.runs.options = names
            self.runs.value = chosen

    def _follow_steps(self) -> None:
        """The range slider spans the chosen runs' steps; a full range follows them."""
        last = [
            int(self.catalog[n].steps[-1].step)
            for n in self.runs.value
            if n in self.catalog and self.catalog[n].steps
        ]
        top = max(last, default=1)
        if top != self.steps.max:
            was_full = self.steps.value == (self.steps.min, self.steps.max)
            self._following = True  # this draw is already under way (and holds the lock)
            try:
                self.steps.max = max(top, 1)
                if was_full:
                    self.steps.value = (0, self.steps.max)
            finally:
                self._following = False

    def select(self, names: list[str]) -> None:
        self.runs.value = tuple(names)  # draws through the observer

    def draw(self) -> None:
        # The kernel (a click) and a thread that follows an action (a refresh) may both draw.
        with self._lock:
            self._draw()

    def _draw(self) -> None:
        plot = self.plot
        plot.clear()
        plot.set_log("loss", self.log_scale.value)
        self._follow_steps()
        lo, hi = self.steps.value
        full = (self.steps.min, self.steps.max)
        plot.set_xrange(*((None, None) if (lo, hi) == full else (lo, hi)))
        chosen = [n for n in self.runs.value if n in self.catalog]
        for i, name in enumerate(chosen):
            entry = self.catalog[name]
            metrics = entry.metrics()
            steps, loss = metrics.get("step"), metrics.get("loss")
            if steps is None or not len(steps):
                continue
            color = COLORS[i % len(COLORS)]
            if entry.parent and entry.parent[0] in chosen:
                # Start at the branch step, the last shared one, so the lines join there.
                first = int(np.searchsorted(steps, entry.parent[1]))
                steps, loss = steps[first:], loss[first:]
                point = entry.value_at("loss", entry.parent[1])
                if point is not None:
                    plot.line(f"{name}/branch", "loss", static=True, linestyle="none",
                              marker="v", markersize=6, color=color)  # fmt: skip
                    plot.set(f"{name}/branch", [entry.parent[1]], [point])
            if self.smooth.value:
                loss = _ema(np.asarray(loss, dtype=float), 0.9)
            plot.line(name, "loss", static=True, color=color, label=name)
            plot.set(name, steps, loss)
        if chosen:
            plot.legend("loss")
        plot.show()


def _ema(values: np.ndarray, decay: float) -> np.ndarray:
    out = np.empty_like(values)
    acc: Any = values[0] if len(values) else 0.0
    for i, v in enumerate(values):
        acc = decay * acc + (1 - decay) * v
        out[i] = acc
    return out
