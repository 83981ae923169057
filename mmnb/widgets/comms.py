"""Widget messages while a cell blocks: Stop and Checkpoint-now during a blocking `%train`.

A kernel handles the browser's widget messages (button clicks, slider moves) on its main
thread, between cells: while `%train` blocks, a click waits until training has ended. IPykernel
7 runs "subshells" — threads with their own event loop that handle the shell messages routed to
them — and routes a comm's messages to the subshell its `_reply_subshell_for` names. So the
dashboard's and the history browser's widgets (`serve`) get a helper subshell (one per kernel,
started on first use): their messages are handled there at once and in the order they were
sent, while training keeps the main thread: the training thread, its numbers, Ctrl-C (SIGINT
reaches the main thread) and "Run All" are exactly as without it. Their callbacks take their
own locks against code that a cell runs on the main thread.

Where the kernel has no subshells (ipykernel < 7, other kernels, no kernel), `serve` returns
False, messages wait for the main thread as usual, and the dashboard hides Stop and Checkpoint
now during a blocking run, saying how to stop.

ipympl's canvas talks from the moment its model exists (its size, its frames), not only on a
click, so `interactive.canvas` routes it as soon as it is made — and plots are interactive only
where a helper subshell exists: elsewhere a canvas in a blocking cell would stay blank.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

_SUBSHELLS: dict[int, str] = {}  # id(kernel) -> the helper subshell's id
_LOCK = threading.Lock()


def _kernel() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - widgets need IPython anyway
        return None
    shell = get_ipython()
    return getattr(shell, "kernel", None)


def _helper_subshell(kernel: Any) -> str | None:
    """The id of this kernel's helper subshell, created on first use; None if unsupported."""
    if not getattr(kernel, "_supports_kernel_subshells", False):
        return None
    manager = getattr(getattr(kernel, "shell_channel_thread", None), "manager", None)
    create = getattr(manager, "_create_subshell", None)
    loop = getattr(manager, "_shell_channel_io_loop", None)
    if create is None or loop is None:
        return None
    with _LOCK:
        if id(kernel) not in _SUBSHELLS:
            # Subshells are created on the shell-channel thread (as a create_subshell_request
            # from a front-end would be).
            future: concurrent.futures.Future[str] = concurrent.futures.Future()

            def make() -> None:
                try:
                    future.set_result(create())
                except BaseException as err:  # handed to the caller below
                    future.set_exception(err)

            loop.add_callback(make)
            try:
                _SUBSHELLS[id(kernel)] = future.result(timeout=10)
            except Exception:
                return None
        return _SUBSHELLS[id(kernel)]


def helper_subshell() -> str | None:
    """The id of this kernel's helper subshell (created on first use); None where the kernel
    has none (ipykernel < 7, another kernel, no kernel)."""
    kernel = _kernel()
    return None if kernel is None else _helper_subshell(kernel)


def route(widget: Any, subshell: str) -> bool:
    """Have `subshell` handle the browser's messages for `widget`; False if it has no comm."""
    comm = getattr(widget, "comm", None)
    if comm is None:
        return False
    # ipykernel asks the comm which subshell handles its incoming messages.
    comm._reply_subshell_for = lambda data, default, _id=subshell: _id
    return True


def serve(*roots: Any) -> bool:
    """Route the messages of `roots` and every widget inside them to the helper subshell, so
    they are handled in the order they were sent, and at once; True if they are.

    In order: JupyterLab 4.6 sends a widget's messages over a subshell of its own once that
    subshell has started ("comms over subshells"), and over the main shell until then, so a
    field's new value (main shell, busy) could arrive after the click that reads it (subshell).
    At once: while a cell runs, the controls still answer."""
    subshell = helper_subshell()
    if subshell is None:
        return False
    stack, seen = list(roots), set()
    while stack:
        widget = stack.pop()
        if id(widget) in seen:
            continue
        seen.add(id(widget))
        stack.extend(getattr(widget, "children", ()))
        route(widget, subshell)
    return True
