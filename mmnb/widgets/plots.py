"""Curves drawn off-screen with Agg into PNG bytes, for an `ipywidgets.Image`.

No pyplot: each `Plot` owns a Figure on its own Agg canvas, so nothing touches matplotlib's
global figure list or the notebook's inline backend, and drawing works from any thread.

Readable and crisp: the figure is laid out at `width` x `height` inches of 100 CSS pixels and
rendered at `scale` times that (2 by default), and the image is shown at its CSS size, so it
stays sharp on a high-DPI screen (device pixel ratio up to `scale`) and text is ~12 px at 100 %
zoom. Constrained layout keeps every tick label and title inside the image.

Axes follow the data, as TensorBoard's do: x spans the steps drawn so far (plus headroom), not
the planned total; a known horizon (`set_horizon`) is a faint dashed line when it is in view
and a note in the x label otherwise.

Drawing is the display's main cost (a full draw of four panels takes tens of ms), so a Plot
draws its static parts (axes, ticks, labels and the lines marked `static`) once into a cached
background and, on later updates, only blits the changing artists onto it. The background is
redrawn only when data leaves the axes' limits, which are then widened with headroom (`grow`
along x, `pad` along y), so a growing training curve costs a full draw a few dozen times per
run.
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
CSS_DPI = 100  # CSS pixels per figure inch


class Plot:
    """Panels in a grid (e.g. loss, lr, grad norm, tokens/s), each holding named artists."""

    def __init__(
        self,
        panels: Sequence[str] = ("loss", "lr"),
        *,
        columns: int | None = None,
        width: float = 9.6,
        height: float = 2.6,
        scale: float = 2.0,
        grow: float = 1.3,
        pad: float = 0.1,
        live: bool = False,
        zero: Sequence[str] = (),
        titles: dict[str, str] | None = None,
    ) -> None:
        self.scale = scale
        self.figure = Figure(figsize=(width, height), dpi=CSS_DPI * scale, layout="constrained")
        self.figure.get_layout_engine().set(w_pad=0.04, h_pad=0.04, wspace=0.03, hspace=0.05)
        self.canvas = FigureCanvasAgg(self.figure)
        columns = columns or len(panels)
        rows = -(-len(panels) // columns)
        grid = self.figure.subplots(rows, columns, squeeze=False)
        axes = [ax for row in grid for ax in row]
        for extra in axes[len(panels) :]:
            extra.remove()
        self.axes = dict(zip(panels, axes, strict=False))
        self.titles = {p: (titles or {}).get(p, p) for p in panels}
        for name, ax in self.axes.items():
            # Right: the left corner holds the axis offset (1e-3).
            ax.set_title(self.titles[name], fontsize=10, loc="right")
            ax.tick_params(labelsize=8.5, pad=2)
            ax.grid(alpha=0.3, linewidth=0.5)
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
            # Few ticks: tick labels are most of a full draw's cost.
            ax.xaxis.set_major_locator(MaxNLocator(6, integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(4))
        self._xlabel_rows = {ax for ax in axes[-columns:]}  # the bottom row names the x axis
        # `live`: the data keep changing (a training curve), so y gets headroom relative to
        # the values, not only to their spread, and re-limiting stays rare.
        self.grow, self.pad, self.live = grow, pad, live
        self.zero = set(zero)  # panels whose y axis starts at 0 (an lr that decays to ~0)
        self.log: set[str] = set()  # panels with a log y axis
        self._artists: dict[str, tuple[str, Any, bool]] = {}  # key -> (panel, artist, static)
        self._horizon: float | None = None  # the planned last step, if known
        self._horizon_lines: dict[str, Any] = {}
        self._background: Any = None
        self.full_draws = 0
        self._label_x()

    @property
    def css_size(self) -> tuple[int, int]:
        """(width, height) in CSS pixels: the size to show the PNG at."""
        w, h = self.figure.get_size_inches()
        return round(w * CSS_DPI), round(h * CSS_DPI)

    # ---- artists ----
    def line(self, key: str, panel: str, *, static: bool = False, **style: Any) -> None:
        """Add an (empty) line; `static` ones are part of the cached background."""
        style = {"linewidth": 1.4, **style}
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
        for ax in self.axes.values():
            ax.legend_ = None

    def keys(self) -> list[str]:
        return list(self._artists)

    def set(self, key: str, x: Any, y: Any) -> None:
        panel, artist, static = self._artists[key]
        artist.set_data(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
        if static:
            self._background = None

    def set_visible(self, key: str, visible: bool) -> None:
        artist = self._artists[key][1]
        if artist.get_visible() != visible:
            artist.set_visible(visible)
            self._background = None

    def set_horizon(self, step: float | None) -> None:
        """The plan's last step: a faint marker (when in view) and a note, never an axis limit."""
        if self._horizon != step:
            self._horizon = step
            self._label_x()
            self._background = None

    def set_log(self, panel: str, on: bool) -> None:
        """A log (or linear) y axis for `panel`."""
        if (panel in self.log) != on:
            self.log.symmetric_difference_update({panel})
            self.axes[panel].set_yscale("log" if on else "linear")
            if not on:
                self.axes[panel].ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
                self.axes[panel].yaxis.set_major_locator(MaxNLocator(4))
            self._background = None

    def set_xrange(self, lo: float | None, hi: float | None) -> None:
        """Show only steps in [lo, hi] (None: follow the data)."""
        self._xrange = (lo, hi)
        self._background = None

    def legend(self, panel: str) -> None:
        self.axes[panel].legend(fontsize=9, loc="upper right", frameon=True, framealpha=0.8)
        self._background = None

    def _label_x(self) -> None:
        note = f"step (plan ends at {self._horizon:,.0f})" if self._horizon else "step"
        for ax in self.axes.values():
            ax.set_xlabel(note if ax in self._xlabel_rows else "", fontsize=9, labelpad=2)

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
        width, height = self.canvas.get_width_height(physical=True)
        image = Image.frombuffer("RGBA", (width, height), self.canvas.buffer_rgba(), "raw")
        out = io.BytesIO()
        # Level 1: a few ms instead of tens; these images live for seconds, size barely matters.
        image.save(out, format="png", compress_level=1)
        return out.getvalue()

    def _bounds(self, panel: str) -> tuple[float, float, float, float] | None:
        lo_x = lo_y = np.inf
        hi_x = hi_y = -np.inf
        lo, hi = getattr(self, "_xrange", (None, None))
        for p, artist, _ in self._artists.values():
            if p != panel or not artist.get_visible():
                continue
            x, y = artist.get_data()
            x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
            ok = np.isfinite(x) & np.isfinite(y)
            if panel in self.log:
                ok &= y > 0
            if lo is not None:
                ok &= x >= lo
            if hi is not None:
                ok &= x <= hi
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
        lo, hi = getattr(self, "_xrange", (None, None))
        for panel, ax in self.axes.items():
            bounds = self._bounds(panel)
            if bounds is None:
                continue
            lo_x, hi_x, lo_y, hi_y = bounds
            # Headroom: a growing curve crosses the edge again only after `grow` times as
            # many steps; the data always fill most of the width.
            span = max(hi_x - lo_x, 1.0)
            x0 = lo_x if lo is None else lo
            x1 = lo_x + span * self.grow if hi is None else hi
            if self._horizon is not None and hi is None:
                x1 = min(x1, max(self._horizon, hi_x + 1))  # never past the planned end
            ax.set_xlim(x0, max(x1, x0 + 1))
            if panel in self.log:
                ratio = (hi_y / lo_y) ** self.pad if lo_y > 0 else 2.0
                ax.set_ylim(lo_y / ratio, hi_y * (ratio if not self.live else max(ratio, 1.5)))
            else:
                yspan = hi_y - lo_y or abs(hi_y) or 1.0
                if self.live:
                    yspan = max(yspan, abs(hi_y))
                # Losses and learning rates are never negative: no axis room below 0.
                low = 0.0 if panel in self.zero else lo_y - self.pad * yspan
                ax.set_ylim(max(low, 0.0) if lo_y >= 0 else low, hi_y + self.pad * yspan)
            self._mark_horizon(panel, ax)
        self.full_draws += 1
        self.canvas.draw()  # animated artists are skipped: the background holds the rest
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)

    def _mark_horizon(self, panel: str, ax: Any) -> None:
        line = self._horizon_lines.pop(panel, None)
        if line is not None:
            line.remove()
        x0, x1 = ax.get_xlim()
        if self._horizon is not None and x0 <= self._horizon <= x1:
            self._horizon_lines[panel] = ax.axvline(
                self._horizon, color="#888888", linestyle="--", linewidth=1.0, alpha=0.5
            )
