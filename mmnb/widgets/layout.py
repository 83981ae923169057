"""Helpers shared by the widget front-ends."""

from __future__ import annotations

import ipywidgets as w


def close_tree(*roots: w.Widget) -> None:
    """Close `roots` and every widget inside them (a Box's close() leaves its children open,
    and an open widget keeps its comm and its kernel-side state alive)."""
    stack = list(roots)
    seen: set[int] = set()
    while stack:
        widget = stack.pop()
        if id(widget) in seen:
            continue
        seen.add(id(widget))
        stack.extend(getattr(widget, "children", ()))
        widget.close()
