"""Widget messages while a cell blocks: Stop and Checkpoint-now during a blocking `%train`.

A kernel handles the browser's widget messages (button clicks, slider moves) on its main
thread, between cells: while `%train` blocks, a click waits until training has ended. IPykernel
7 runs "subshells" — threads with their own event loop that handle the shell messages routed to
them — and routes a comm's messages to the subshell its `_reply_subshell_for` names. So a
dashboard's controls get a helper subshell (one per kernel, started on first use) and their
clicks are handled there at once, while training keeps the main thread: the training thread,
its numbers, Ctrl-C (SIGINT reaches the main thread) and "Run All" are exactly as without it.

Where the kernel has no subshells (ipykernel < 7, other kernels, no kernel), `serve_while_busy`
returns False and the dashboard hides the buttons during a blocking run, saying how to stop.
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


def serve_while_busy(*widgets: Any) -> bool:
    """Route the browser's messages for `widgets` to a helper subshell; True if they are."""
    kernel = _kernel()
    if kernel is None:
        return False
    subshell = _helper_subshell(kernel)
    if subshell is None:
        return False
    for widget in widgets:
        comm = getattr(widget, "comm", None)
        if comm is None:
            return False
        # ipykernel asks the comm which subshell handles its incoming messages.
        comm._reply_subshell_for = lambda data, default, _id=subshell: _id
    return True
