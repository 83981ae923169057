"""Notebook widgets (ipywidgets 8 + matplotlib Agg): the live training dashboard and the
history browser. Importing this package imports ipywidgets and matplotlib; `import mmnb`
does not (the engine is IPython-free), so `mmnb.browse` imports it on first use.
"""

from __future__ import annotations

from .browser import Browser, browse
from .dashboard import Dashboard

__all__ = ["Browser", "Dashboard", "browse"]
