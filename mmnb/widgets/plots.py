"""Curves drawn off-screen with Agg into PNG bytes, for an `ipywidgets.Image`.

No pyplot: each `Plot` owns a Figure on its own Agg canvas, so nothing touches matplotlib's
global figure list or the notebook's inline backend, and drawing works from any thread.

Drawing is the display's main cost (a full draw of two panels takes ~40 ms on a slow core), so
a Plot draws its static parts (axes, ticks, labels and the lines marked `static`) once into a
cached background and, on later updates, only blits the changing artists onto it (~3 ms).
The background is redrawn only when data leaves the axes' limits, which are then widened with
headroom (`grow` along x, `pad` along y), so a growing training curve costs a full draw a
handful of times per run.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

# A palette that reads on light and dark notebook themes.
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


class Plot:
    """Panels side by side (e.g. loss and lr), each holding named artists."""

    def __init__(
        self,
        panels: Sequence[str] = ("loss", "lr"),
        *,
        width: float = 7.5,
        height: float = 2.4,
        dpi: int = 80,
        grow: float = 1.3,
        pad: float = 0.1,
        live: bool = False,
        zero: Sequence[str] = (),
    ) -> None:
        self.figure = Figure(figsize=(width, height), dpi=dpi)
        self.canvas = FigureCanvasAgg(self.figure)
        # Fixed margins instead of tight_layout: a layout pass on every full draw costs as
        # much as the draw itself, and the labels never change.
        self.figure.subplots_adjust(left=0.08, right=0.98, bottom=0.2, top=0.88, wspace=0.22)
        axes = self.figure.subplots(1, len(panels), squeeze=False)[0]
        self.axes = dict(zip(panels, axes, strict=True))
        for name, ax in self.axes.items():
            ax.set_title(name, fontsize=9, loc="right")  # the left corner holds the 1e-3 offset
            ax.set_xlabel("step", fontsize=8, labelpad=1)
            ax.tick_params(labelsize=7, pad=1)
            ax.grid(alpha=0.3, linewidth=0.5)
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
            # Few ticks: tick labels are most of a full draw's cost (45 -> 28 ms).
            ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(4))
        # `live`: the data keep changing (a training curve), so y gets headroom relative to
        # the values, not only to their spread, and re-limiting stays rare.
        self.grow, self.pad, self.live = grow, pad, live
        self.zero = set(zero)  # panels whose y axis starts at 0 (an lr that decays to ~0)
        self._artists: dict[str, tuple[str, Any, bool]] = {}  # key -> (panel, artist, static)
        self._xmax: dict[str, float] = {}  # a known horizon per panel (e.g. planned steps)
        self._background: Any = None
        self.full_draws = 0

    # ---- artists ----
    def line(self, key: str, panel: str, *, static: bool = False, **style: Any) -> None:
        """Add an (empty) line; `static` ones are part of the cached background."""
        style = {"linewidth": 1.0, **style}
        (artist,) = self.axes[panel].plot([], [], animated=not static, **style)
        self._artists[key] = (panel, artist, static)
        self._background = None

    def remove(self, key: str) -> None:
        panel, artist, _ = self._artists.pop(key)
        artist.remove()
        self._background = None

    def clear(self) -> None:
        for key in list(self._artists):
            self.remove(key)
        self._xmax.clear()
        for ax in self.axes.values():
            ax.legend_ = None

    def keys(self) -> list[str]:
        return list(self._artists)

    def set(self, key: str, x: Any, y: Any) -> None:
        panel, artist, static = self._artists[key]
        artist.set_data(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
        if static:
            self._background = None

    def set_xmax(self, panel: str, xmax: float) -> None:
        """Show x up to `xmax` (the plan's last step) so the axes need not grow step by step."""
        if self._xmax.get(panel) != xmax:
            self._xmax[panel] = xmax
            self._background = None

    def legend(self, panel: str) -> None:
        self.axes[panel].legend(fontsize=7, loc="upper right", frameon=False)
        self._background = None

    # ---- rendering ----
    def png(self) -> bytes:
        """The figure as PNG bytes: a blit onto the cached background when limits still hold."""
        if self._background is None or not self._limits_hold():
            self._full_draw()
        else:
            self.canvas.restore_region(self._background)
        for panel, artist, static in self._artists.values():
            if not static and artist.get_visible():
                self.axes[panel].draw_artist(artist)
        width, height = self.canvas.get_width_height()
        image = Image.frombuffer("RGBA", (width, height), self.canvas.buffer_rgba(), "raw")
        out = io.BytesIO()
        # Level 1: a few ms instead of tens; these images live for seconds, size barely matters.
        image.save(out, format="png", compress_level=1)
        return out.getvalue()

    def _bounds(self, panel: str) -> tuple[float, float, float, float] | None:
        lo_x = lo_y = np.inf
        hi_x = hi_y = -np.inf
        for p, artist, _ in self._artists.values():
            if p != panel or not artist.get_visible():
                continue
            x, y = artist.get_data()
            x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.any():
                x, y = x[ok], y[ok]
                lo_x, hi_x = min(lo_x, x.min()), max(hi_x, x.max())
                lo_y, hi_y = min(lo_y, y.min()), max(hi_y, y.max())
        if not np.isfinite(lo_x):
            return None
        return lo_x, hi_x, lo_y, hi_y

    def _limits_hold(self) -> bool:
        for panel, ax in self.axes.items():
            bounds = self._bounds(panel)
            if bounds is None:
                continue
            lo_x, hi_x, lo_y, hi_y = bounds
            (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
            if lo_x < x0 or hi_x > x1 or lo_y < y0 or hi_y > y1:
                return False
        return True

    def _full_draw(self) -> None:
        for panel, ax in self.axes.items():
            bounds = self._bounds(panel)
            if bounds is None:
                continue
            lo_x, hi_x, lo_y, hi_y = bounds
            x1 = self._xmax.get(panel)
            if x1 is None or x1 < hi_x:
                # Headroom: a growing curve crosses the edge again only after `grow` times
                # as many steps.
                x1 = lo_x + max(hi_x - lo_x, 1.0) * self.grow
            ax.set_xlim(min(lo_x, 0.0), x1)
            span = hi_y - lo_y or abs(hi_y) or 1.0
            if self.live:
                span = max(span, abs(hi_y))
            # Losses and learning rates are never negative: no axis room below 0.
            low = 0.0 if panel in self.zero else lo_y - self.pad * span
            ax.set_ylim(max(low, 0.0) if lo_y >= 0 else low, hi_y + self.pad * span)
        self.full_draws += 1
        self.canvas.draw()  # animated artists are skipped: the background holds the rest
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
