"""Curves drawn off-screen with Agg into PNG bytes, for an `ipywidgets.Image`.

No pyplot: each `Plot` owns a Figure on its own Agg canvas, so nothing touches matplotlib's
global figure list or the notebook's inline backend, and drawing works from any thread.

Readable and crisp: the figure is laid out at `width` x `height` inches of 100 CSS pixels and
rendered at `scale` times that (2 by default), and the image is shown at its CSS size, so it
stays sharp on a high-DPI screen (device pixel ratio up to `scale`) and text is ~12 px at 100 %
zoom. Constrained layout keeps every tick label and title inside the image; it costs as much
as the drawing itself, so it runs only when the texts it makes room for change length (the
longest tick label, an axis offset like 1e-3, titles, labels, legends: `_text_key`) and for a
settled (final) picture, and full draws in between reuse the axes' positions.

Axes follow the data, as TensorBoard's do: x spans the steps drawn so far (plus headroom), not
the planned total; a known horizon (`set_horizon`) is a faint dashed line when it is in view
and a note in the x label otherwise.

Drawing is the display's main cost (a full draw of four panels takes tens of ms), so a Plot
draws its static parts (axes, ticks, labels and the lines marked `static`) once into a cached
background and, on later updates, only blits the changing artists onto it. The background is
redrawn only when data leaves the axes' limits, which are then widened with headroom (`grow`
along x, `pad` along y), so a growing training curve costs a full draw a few dozen times per
run.

Where it is shown (`widget`): a crisp PNG in an `ipywidgets.Image`, or — when ipympl is
installed and the front-end can show it (`interactive.enabled`) — ipympl's canvas, with zoom,
pan and a hover readout (step and value). The user's zoom or pan of a panel holds while new
data arrive (the panel stops following the data) until the toolbar's Home. `show()` pushes the
current state to either; `snapshot()` is a 2x PNG for static fallbacks (saved notebooks).
PNGs are unfiltered RGB compressed by zlib (`encode_png`): a third of PIL's time, and zlib runs
with the GIL released, so a render thread's encoding does not hold up a training thread.
"""

from __future__ import annotations

import io
import struct
import threading
import zlib
from collections.abc import Sequence
from typing import Any

import ipywidgets as w
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.ticker import LogFormatter, MaxNLocator

from . import interactive as _interactive

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
        interactive: bool | None = None,
    ) -> None:
        self.interactive = _interactive.enabled(interactive)
        # ipympl renders at the device pixel ratio itself: its figure is at CSS resolution.
        self.scale = 1.0 if self.interactive else scale
        self.figure = Figure(figsize=(width, height), dpi=CSS_DPI * self.scale, layout="none")
        # Run by `_full_draw` when the texts it makes room for change (see the docstring).
        self._layout = ConstrainedLayoutEngine(w_pad=0.04, h_pad=0.04, wspace=0.03, hspace=0.05)
        self._layout_key: Any = None
        self.layouts = 0  # how often the layout ran
        FigureCanvasAgg(self.figure)
        # Drawing from a training thread vs the user's navigation (ipympl's messages).
        self.lock = threading.RLock()
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
            ax.format_coord = _readout(self.titles[name])  # ipympl's hover readout
        self._xlabel_rows = {ax for ax in axes[-columns:]}  # the bottom row names the x axis
        # `live`: the data keep changing (a training curve), so y gets headroom relative to
        # the values, not only to their spread, and re-limiting stays rare.
        self.grow, self.pad, self.live = grow, pad, live
        self._settled = False  # see settle()
        self.zero = set(zero)  # panels whose y axis starts at 0 (an lr that decays to ~0)
        self.log: set[str] = set()  # panels with a log y axis
        self._artists: dict[str, tuple[str, Any, bool]] = {}  # key -> (panel, artist, static)
        self._horizon: float | None = None  # the planned last step, if known
        self._horizon_lines: dict[str, Any] = {}
        self._background: Any = None
        self._background_size: tuple[int, int] | None = None
        self._auto: dict[str, tuple[Any, Any]] = {}  # panel -> the limits we last set
        self.full_draws = 0
        self._label_x()
        self.widget: Any = None
        if self.interactive:
            self.widget = _interactive.canvas(self)
            # A canvas cannot shrink like an image: in a narrower cell it scrolls sideways.
            # (+8: ipympl's margins around the canvas)
            self.widget.layout = w.Layout(
                width=f"{self.css_size[0] + 8}px", max_width="100%", overflow="auto hidden"
            )
        else:
            css_w, _ = self.css_size
            # Shown at its CSS size (the PNG has `scale` times the pixels: crisp on HiDPI),
            # narrower only when the cell is.
            self.widget = w.Image(
                format="png", layout=w.Layout(width=f"{css_w}px", max_width="100%", height="auto")
            )
        self.widget.add_class("mmnb-plot")

    @property
    def canvas(self) -> FigureCanvasAgg:
        return self.figure.canvas

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
        """Remove every line and legend; the axes follow the new data."""
        for key in list(self._artists):
            self.remove(key)
        for ax in self.axes.values():
            ax.legend_ = None
        self.follow_data()

    def settle(self, settled: bool = True) -> None:
        """The data have stopped changing (training ended): axes fit them without the
        headroom kept for a growing curve; `settle(False)` when they grow again."""
        if settled != self._settled:
            self._settled = settled
            self._background = None

    def follow_data(self) -> None:
        """Forget the user's zoom and pan: every panel's limits follow the data again."""
        self._auto.clear()
        self._background = None

    def user_view(self, panel: str) -> bool:
        """The user zoomed or panned `panel` (ipympl): its limits are theirs."""
        limits = self._auto.get(panel)
        ax = self.axes[panel]
        return limits is not None and (ax.get_xlim(), ax.get_ylim()) != limits

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
            if on:  # "3", "4", "6" on a loss axis, not "3 x 10^0"
                self.axes[panel].yaxis.set_major_formatter(_PlainLog())
                self.axes[panel].yaxis.set_minor_formatter(_PlainLog(minor_thresholds=(2, 0.5)))
            else:
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
    def show(self) -> None:
        """Push the current data to `widget` (a canvas frame, or the Image's PNG)."""
        with self.lock:
            if self.interactive:
                self.render()
                self.canvas.push()  # ipympl: sends the picture to the front-end
            else:
                self.widget.value = self.png()

    def render(self, full: bool = False) -> None:
        """Draw into the canvas's buffer: a blit onto the cached background when the limits
        still hold, else (or when `full`) everything."""
        with self.lock:
            size = self.canvas.get_width_height(physical=True)
            if full or self._background is None or self._background_size != size:
                self._full_draw()
            elif not self._limits_hold():
                self._full_draw()
            else:
                self.canvas.restore_region(self._background)
            for panel, artist, static in self._artists.values():
                if not static and artist.get_visible():
                    self.axes[panel].draw_artist(artist)

    def png(self) -> bytes:
        """The figure as PNG bytes at `scale` times its CSS size."""
        with self.lock:
            self.render()
            width, height = self.canvas.get_width_height(physical=True)
            return encode_png(self.canvas.buffer_rgba(), width, height)

    def snapshot(self) -> bytes:
        """A PNG at 2x the CSS size, curves included: the static fallback of a saved output."""
        with self.lock:
            if not self.interactive:
                return self.png()
            self._lay_out()  # the axes' positions as the 2x image needs them
            live = [a for _, a, static in self._artists.values() if not static]
            for artist in live:
                artist.set_animated(False)  # savefig leaves animated artists out
            try:
                out = io.BytesIO()
                self.figure.savefig(out, format="png", dpi=2 * CSS_DPI)
                return out.getvalue()
            finally:
                for artist in live:
                    artist.set_animated(True)
                self._background = None  # the buffer now holds the 2x image

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
            if bounds is None or self.user_view(panel):
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
            if bounds is None or self.user_view(panel):
                continue
            lo_x, hi_x, lo_y, hi_y = bounds
            # Headroom: a growing curve crosses the edge again only after `grow` times as
            # many steps; the data always fill most of the width.
            span = max(hi_x - lo_x, 1.0)
            grow, live, pad = (
                (1.02, False, 0.08) if self._settled else (self.grow, self.live, self.pad)
            )
            x0 = lo_x if lo is None else lo
            x1 = lo_x + span * grow if hi is None else hi
            if self._horizon is not None and hi is None:
                x1 = min(x1, max(self._horizon, hi_x + 1))  # never past the planned end
            ax.set_xlim(x0, max(x1, x0 + 1))
            if panel in self.log:
                ratio = (hi_y / lo_y) ** pad if lo_y > 0 else 2.0
                ax.set_ylim(lo_y / ratio, hi_y * (ratio if not live else max(ratio, 1.5)))
            else:
                yspan = hi_y - lo_y or abs(hi_y) or 1.0
                if live:
                    yspan = max(yspan, abs(hi_y))
                # Losses and learning rates are never negative: no axis room below 0.
                low = 0.0 if panel in self.zero else lo_y - pad * yspan
                ax.set_ylim(max(low, 0.0) if lo_y >= 0 else low, hi_y + pad * yspan)
            self._auto[panel] = (ax.get_xlim(), ax.get_ylim())
            self._mark_horizon(panel, ax)
        self._lay_out(always=self._settled)
        self.full_draws += 1
        # Agg's own draw (ipympl's would send a frame without the curves); animated artists
        # are skipped: the background holds the rest.
        FigureCanvasAgg.draw(self.canvas)
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        self._background_size = self.canvas.get_width_height(physical=True)

    def _lay_out(self, always: bool = False) -> None:
        """Constrained layout, when the texts it makes room for changed since it last ran."""
        key = self._text_key()
        if always or key != self._layout_key:
            self._layout.execute(self.figure)
            self._layout_key = key
            self.layouts += 1

    def _text_key(self) -> tuple:
        """What the layout depends on: per panel its titles and labels, and per axis the
        longest tick label (in characters) and the offset text, for the limits now set."""
        key: list[Any] = []
        for ax in self.axes.values():
            key += [ax.get_title(loc="right"), ax.get_xlabel(), ax.get_ylabel()]
            legend = ax.get_legend()
            if legend is not None:
                key.append(tuple(t.get_text() for t in legend.get_texts()))
            for axis in (ax.xaxis, ax.yaxis):
                lo, hi = sorted(axis.get_view_interval())
                for ticker, locs in (
                    (axis.major, axis.get_majorticklocs()),
                    (axis.minor, axis.get_minorticklocs() if axis.get_scale() == "log" else ()),
                ):
                    shown = [x for x in locs if lo <= x <= hi]
                    labels = ticker.formatter.format_ticks(shown) if shown else []
                    key += [max(map(len, labels), default=0), ticker.formatter.get_offset()]
        return tuple(key)

    def _mark_horizon(self, panel: str, ax: Any) -> None:
        line = self._horizon_lines.pop(panel, None)
        if line is not None:
            line.remove()
        x0, x1 = ax.get_xlim()
        if self._horizon is not None and x0 <= self._horizon <= x1:
            self._horizon_lines[panel] = ax.axvline(
                self._horizon, color="#888888", linestyle="--", linewidth=1.0, alpha=0.5
            )


def encode_png(rgba: Any, width: int, height: int) -> bytes:
    """An RGBA buffer (Agg's, an opaque figure) as an RGB PNG: unfiltered rows compressed by
    zlib at level 1 — a few ms for a 2x dashboard, most of it with the GIL released (PIL's
    encoder takes three times as long, filtering in C that holds it)."""
    pixels = np.frombuffer(rgba, dtype=np.uint8).reshape(height, width, 4)
    rows = np.zeros((height, 1 + 3 * width), dtype=np.uint8)  # a 0 (no filter) before each row
    np.reshape(rows[:, 1:], (height, width, 3), copy=False)[...] = pixels[..., :3]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            chunk(b"IHDR", header),
            chunk(b"IDAT", zlib.compress(rows.data, 1)),
            chunk(b"IEND", b""),
        )
    )


def _readout(title: str) -> Any:
    """The hover text of a panel: `step 1,234 · loss 4.213`."""

    def format_coord(x: float, y: float) -> str:
        return f"step {x:,.0f} · {title} {y:.4g}"

    return format_coord


class _PlainLog(LogFormatter):
    """Log-axis tick labels as plain numbers, on the ticks matplotlib would label."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:.4g}" if super().__call__(x, pos) else ""
