"""Where the widgets' messages and errors go: one Output widget per front-end object.

A widget callback runs inside the kernel's comm handler (or in a training or action thread);
an exception raised there would only reach the kernel log, so the user would see a button that
does nothing. Every callback is wrapped by `Log.guard`, which writes what it raised into the
Output: a user mistake (StoreError, ValueError) as one line, anything else with its traceback.
Appending to an Output's `outputs` is a trait change, safe from any thread; nothing is printed.
"""

from __future__ import annotations

import functools
import threading
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import ipywidgets as w

from ..store import StoreError

F = TypeVar("F", bound=Callable[..., Any])

# Errors whose message says what to do; a traceback would only hide it.
USER_ERRORS = (StoreError, ValueError)


class Log:
    """An Output widget holding messages and captured errors, newest last."""

    def __init__(self, max_entries: int = 50) -> None:
        self.output = w.Output(layout=w.Layout(max_height="16em", overflow="auto", flex="1"))
        self.output.add_class("mmnb-log")
        self.max_entries = max_entries
        self._lock = threading.Lock()  # callbacks and worker threads append concurrently
        self.clear_button = w.Button(
            description="Clear", icon="times", tooltip="clear these messages",
            layout=w.Layout(width="auto"),
        )  # fmt: skip
        self.clear_button.on_click(lambda _: self.clear())
        # Hidden while empty: an empty log takes no room.
        self.view = w.HBox(
            [self.output, self.clear_button],
            layout=w.Layout(display="none", align_items="flex-start"),
        )
        self.view.add_class("mmnb-log-box")

    def message(self, text: str) -> None:
        self._append({"output_type": "stream", "name": "stdout", "text": text.rstrip() + "\n"})

    def error(self, err: BaseException, context: str = "") -> None:
        prefix = f"{context}: " if context else ""
        if isinstance(err, USER_ERRORS):
            text = f"{prefix}{err}\n"
        else:
            text = prefix + "".join(traceback.format_exception(err))
        self._append({"output_type": "stream", "name": "stderr", "text": text})

    def guard(self, fn: F, context: str = "") -> F:
        """`fn`, with any Exception it raises written here instead of lost."""

        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # shown to the user; KeyboardInterrupt still propagates
                self.error(err, context)
                return None

        return guarded  # type: ignore[return-value]

    def text(self) -> str:
        """Everything shown, as plain text (for tests and text front-ends)."""
        return "".join(o.get("text", "") for o in self.output.outputs)

    def clear(self) -> None:
        with self._lock:
            self.output.outputs = ()
            self.view.layout.display = "none"

    def _append(self, entry: dict[str, str]) -> None:
        with self._lock:
            self.output.outputs = (*self.output.outputs, entry)[-self.max_entries :]
            self.view.layout.display = ""
