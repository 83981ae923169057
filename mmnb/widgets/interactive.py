"""Interactive plots (zoom, pan, hover readout) through ipympl, where a front-end can show them.

`enabled(choice)` decides, once per plot, between ipympl's canvas widget and the static PNG in
an `ipywidgets.Image` (`plots.Plot` does either):

- `choice` True / False, else `$MMNB_PLOTS` (`interactive` / `static`), else automatic:
- interactive only when ipympl is importable AND a kernel is running that has subshells
  (ipykernel >= 7: the canvas's messages are handled by a helper subshell, so it draws while a
  cell blocks on training; without a kernel nothing shows a widget — scripts, tests get the
  image) AND the front-end is not
  one known not to load ipympl's JavaScript by default — Google Colab (custom widgets are off
  until `enable_custom_widget_manager()`) and VS Code (third-party widget scripts are off until
  allowed in its settings). There `MMNB_PLOTS=interactive` asks for the canvas anyway.

Saved notebooks, nbconvert and viewers without widgets show the static image in either case:
the owners (`Dashboard.freeze`) put a PNG of the final state into the output's `text/html`.

The canvas (`_Canvas`, a subclass of ipympl's) draws through its `Plot`: a full draw — one the
user's zoom, pan or a device-pixel-ratio change asks for — also draws the live curves, and the
browser's messages are handled under the plot's lock, so a training thread's updates and the
user's navigation never draw at once. ipympl sizes the image by the device pixel ratio, so the
figure stays at 100 dpi (CSS pixels) and is sharp on HiDPI screens.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
import sys
import warnings
from base64 import b64encode
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .comms import helper_subshell, route

if TYPE_CHECKING:
    from .plots import Plot

MODES = ("auto", "interactive", "static")


def available() -> bool:
    """ipympl is installed (`pip install "mmnb[interactive]"`)."""
    return importlib.util.find_spec("ipympl") is not None


def _kernel() -> bool:
    """A kernel that can keep a canvas live while a cell blocks (see `comms`)."""
    return helper_subshell() is not None


def _front_end_without_ipympl() -> str | None:
    if "google.colab" in sys.modules:
        return "Colab"
    if any(key.startswith("VSCODE_") for key in os.environ):
        return "VS Code"
    return None


def enabled(choice: bool | None = None) -> bool:
    """Whether a new plot is interactive (see the module docstring)."""
    if choice is None:
        mode = os.environ.get("MMNB_PLOTS", "auto").strip().lower() or "auto"
        if mode not in MODES:
            raise ValueError(f"MMNB_PLOTS must be one of {', '.join(MODES)}, not {mode!r}")
        if mode == "static":
            return False
        if mode == "interactive":
            return available()
        return available() and _kernel() and _front_end_without_ipympl() is None
    return bool(choice) and available()


@functools.cache
def _canvas_class() -> type:
    from ipympl.backend_nbagg import Canvas

    class PlotCanvas(Canvas):
        """ipympl's canvas, drawing through its `Plot` (`_plot`)."""

        _plot: Plot

        def draw(self) -> None:  # a full draw: navigation, a resize, a new front-end
            with self._plot.lock:
                self._plot.render(full=True)
                self.push()

        def push(self) -> None:
            """Send the buffer to the front-end as a whole picture, never a diff: frames are
            pushed without waiting for the front-end to ask, and ipympl's front-end drops a
            frame that has not loaded when the next one arrives (it revokes its URL), so a
            diff against a dropped frame would be drawn over an older picture (a short run
            then ended showing its empty first frame)."""
            self._force_full = True
            self._png_is_old = True
            self.manager.refresh_all()

        def _handle_message(self, obj: Any, content: Any, buffers: Any) -> None:
            with self._plot.lock:
                super()._handle_message(obj, content, buffers)

        def send_binary(self, data: bytes) -> None:
            if self.syncing_data_url:
                # No front-end has said it is there yet: keep the frame as the widget's
                # initial image, a data URL (ipympl stores bare base64 here, which a front-end
                # then fails to load, and the canvas never initialises).
                pixels = self._last_buff.view(dtype=np.uint8).reshape((*self._last_buff.shape, 4))
                with io.BytesIO() as png:
                    Image.fromarray(pixels).save(png, format="png", compress_level=1)
                    self._data_url = "data:image/png;base64," + b64encode(png.getvalue()).decode()
            self.send({"data": '{"type": "binary"}'}, buffers=[data])

    return PlotCanvas


def canvas(plot: Plot) -> Any:
    """An ipympl canvas widget showing `plot.figure`, drawn through `plot`."""
    from ipympl.backend_nbagg import FigureManager

    subshell = helper_subshell()  # made before the canvas, which talks as soon as it exists
    view = _canvas_class()(plot.figure)
    view._plot = plot
    if subshell is not None:
        route(view, subshell)  # handled at once, even while a cell blocks on training
    with warnings.catch_warnings():  # ipympl's Toolbar passes traitlets an old-style argument
        warnings.simplefilter("ignore", DeprecationWarning)
        manager = FigureManager(view, 0)
    if subshell is not None:
        route(manager.toolbar, subshell)
    view.header_visible = False  # no "Figure 0" title
    view.resizable = False  # the figure's layout is made for its size
    view.toolbar_position = "left"

    def home(*_args: Any) -> None:
        # Home: forget the user's zoom and pan, and follow the data again.
        manager.toolbar._nav_stack.clear()
        manager.toolbar.set_history_buttons()
        plot.follow_data()
        view.draw()

    manager.toolbar.home = home
    return view
