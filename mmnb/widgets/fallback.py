"""The static twin of a widget output: shown wherever the widget is not.

A widget output (`application/vnd.jupyter.widget-view+json`) renders only next to its live
kernel, or from widget state saved with the notebook through widget JavaScript fetched from a
CDN. Elsewhere its `text/html` is never shown: nbconvert's HTML shows the widget (an empty box
offline) when the notebook holds widget state, as nbclient saves it, and the widget's
`text/plain` when it does not, as JupyterLab saves it; a notebook reopened without its kernel
says "model not found". So a front-end object that matters after the fact (the training
dashboard) shows a second output, its twin: empty while it lives, the final state as plain HTML
(`update`) once it ends. A CSS rule in the twin hides it while a view of the widget is on the
page (`:has()` on a class unique to this widget), so a live JupyterLab, Notebook 7 or VS Code
shows the widget alone, and everywhere the widget does not render the twin shows instead.

Colab puts every output into its own frame, where the rule cannot see the widget: no twin
there, a live Colab shows the widget itself.
"""

from __future__ import annotations

import sys
import uuid
from typing import Any

import ipywidgets as w


class StaticTwin:
    def __init__(self, view: w.Widget) -> None:
        self.uid = uuid.uuid4().hex[:12]
        view.add_class(f"mmnb-live-{self.uid}")
        self.handle: Any = None
        self.html = ""  # the body last shown

    def show(self) -> None:
        """Display the (empty) twin now, right after the widget's own output."""
        if "google.colab" in sys.modules:
            return
        from IPython.display import display

        self.handle = display(self.bundle(""), raw=True, display_id=True)

    def update(self, body: str, text: str = "") -> None:
        """Show `body` (HTML) wherever the widget does not render; `text` for text viewers."""
        self.html = body
        if self.handle is not None:
            self.handle.update(self.bundle(body, text), raw=True)

    def bundle(self, body: str, text: str = "") -> dict[str, str]:
        live, static = f"mmnb-live-{self.uid}", f"mmnb-static-{self.uid}"
        style = (
            f"<style>:root:has(.{live}) .{static}, "
            f":root:has(.{live}) .jp-OutputArea-child:has(.{static}) {{display:none}}</style>"
        )
        return {
            "text/html": f"{style}<div class='mmnb-static {static}'>{body}</div>",
            "text/plain": text,
        }
