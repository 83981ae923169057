"""The browser's Clean up button: `mmnb gc` in two clicks.

The first click lists in the log what would be removed and why (stale temporary files,
quarantined corrupt checkpoints, runs that never committed a checkpoint, …); the second
removes it. Nothing a run lists is ever touched (`mmnb.store.gc`).
"""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as w

from ..store import Store
from ..store.gc import Garbage, collect, plan
from .log import Log


class Cleanup:
    """A Clean up button and its confirmation, reporting into the browser's log."""

    def __init__(self, store: Store, log: Log, on_change: Callable[[], None]) -> None:
        self.store, self.log, self.on_change = store, log, on_change
        self.pending: list[Garbage] | None = None
        self.button = w.Button(description="Clean up", icon="eraser")
        self.confirm = w.Button(
            description="Confirm clean up", button_style="danger", layout=w.Layout(display="none")
        )
        self.button.on_click(log.guard(lambda _: self.ask(), "clean up"))
        self.confirm.on_click(log.guard(lambda _: self.clean(), "clean up"))
        self.view = w.VBox([self.button, self.confirm])

    def ask(self) -> list[Garbage]:
        """Report what would be removed; arm the confirmation if there is anything."""
        items, notes = plan(self.store)
        for text in notes:
            self.log.message(f"clean up: {text}")
        for item in items:
            self.log.message(f"clean up would {item.action} {item.path}: {item.why}")
        if not items:
            self.log.message(f"clean up: nothing to clean up in {self.store.path}")
        self.pending = items or None
        self.confirm.description = f"Confirm clean up ({len(items)})"
        self.confirm.layout.display = "" if items else "none"
        return items

    def clean(self) -> list[Garbage]:
        if not self.pending:
            raise ValueError("nothing to clean up: click Clean up first")
        done = collect(self.store, self.pending)
        self.pending = None
        self.confirm.layout.display = "none"
        self.log.message(f"clean up: {len(done)} item(s) done")
        self.on_change()
        return done
