"""Drawing a widget's state on a thread of its own, throttled and within a time budget.

A trainer calls its listeners in the training thread. A listener that drew there (a matplotlib
figure of four panels takes ~40-80 ms, its PNG ~10 ms) would stop training for that long, so the
`Dashboard` only folds an event into its state and calls `changed()`; a `Renderer` thread draws.

    renderer = Renderer(lock, prepare, {"text": 0.2, "plot": 0.75}, budget=0.01)
    with lock:                     # the listener, in the training thread
        ...fold the event...
        renderer.changed(force=renderer.kinds if event_ends_something else ())
    renderer.flush()               # everything received so far is drawn (freeze, tests)

`prepare(kinds)` is called under `lock` and returns, per kind due, a callable that draws from
a copy of the state taken then; the callables run outside `lock`, so the training thread never
waits for a picture. What the thread costs the training is bounded as before: each kind is
drawn at most every `interval` seconds, and after each draw the next one waits until that draw's
cost is `budget` of the time since — however slow drawing is on this machine. The first draw of
a session (`start()`) has no previous draw to pay for it: it comes when its expected cost (the
kind's last measured cost) is within `budget` of the session's expected length (`horizon()`:
elapsed plus the trainer's ETA), else when the elapsed time alone covers it. A two-second run
thus shows its curves at the end, a ten-minute one after `interval`.

Off the training thread is not free in CPython: matplotlib's Agg drawing holds the GIL, which a
training step with many small ops needs between ops. The budget is what bounds that; PNGs are
compressed by zlib with the GIL released (`plots.encode_png`).

The thread is a daemon that never prints (a draw's exception goes to `on_error`), ends by itself
once the owner says the session has ended (`ended()`) and everything is drawn, is started again
by the next change, and is stopped by `stop()`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

Draw = Callable[[], None]


class Renderer:
    def __init__(
        self,
        lock: threading.RLock,
        prepare: Callable[[set[str]], dict[str, Draw]],
        intervals: dict[str, float],
        *,
        budget: float,
        ended: Callable[[], bool],
        horizon: Callable[[], float | None],
        on_error: Callable[[BaseException], None],
        name: str = "mmnb-render",
    ) -> None:
        self._cond = threading.Condition(lock)
        self._prepare, self._ended, self._horizon = prepare, ended, horizon
        self._on_error, self._name = on_error, name
        self.intervals, self.budget = dict(intervals), budget
        self.cost = dict.fromkeys(intervals, 0.0)  # the last draw's seconds, per kind
        self.draws = dict.fromkeys(intervals, 0)
        self.seconds = dict.fromkeys(intervals, 0.0)  # drawing time so far, per kind
        self.thread_ids: set[int] = set()  # the threads that drew (tests)
        self._next = dict.fromkeys(intervals, 0.0)  # earliest time of each kind's next draw
        self._first = dict.fromkeys(intervals, False)  # the session's first draw is pending
        self._session_start = 0.0
        self._seq = 0  # changes so far
        self._drawn = dict.fromkeys(intervals, 0)  # the change each kind last showed
        self._force: set[str] = set()  # kinds to draw at once, throttles aside
        self._quit = False
        self._idle = False  # the thread waits for a change, with no deadline
        self._thread: threading.Thread | None = None

    # ---- the owner's side (under its lock) ----
    def start(self) -> None:
        """A session begins (training starts): first draws follow the session rule."""
        with self._cond:
            self._session_start = time.perf_counter()
            for kind in self.intervals:
                self._first[kind] = True
                self._next[kind] = self._session_start + self.intervals[kind]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.intervals)

    def changed(self, force: Iterable[str] = ()) -> None:
        """The state changed; the kinds in `force` are drawn at once, throttles aside."""
        with self._cond:
            self._seq += 1
            if force:
                self._force.update(force)
            if self._thread is None:
                self._launch()
            elif force or self._idle:
                self._cond.notify_all()

    # ---- waiting for it ----
    def flush(self, timeout: float | None = None) -> bool:
        """Draw every change made so far now and wait for it; False on timeout."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        with self._cond:
            if threading.current_thread() is self._thread:
                return False  # a draw of ours: it is drawing already
            target = self._seq
            if all(seen >= target for seen in self._drawn.values()):
                return True
            self._force.update(self.intervals)
            if self._thread is None:
                self._launch()
            self._cond.notify_all()
            while any(seen < target for seen in self._drawn.values()):
                left = None if deadline is None else deadline - time.perf_counter()
                if left is not None and left <= 0:
                    return False
                if self._thread is None:  # stopped meanwhile: another one draws
                    self._force.update(self.intervals)
                    self._launch()
                self._cond.wait(left)
            return True

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread (after the draw in progress); the next change starts another."""
        with self._cond:
            thread = self._thread
            if thread is None:
                return
            self._quit = True
            self._cond.notify_all()
        if thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None

    # ---- the thread ----
    def _launch(self) -> None:
        self._quit = False
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def _due(self, now: float) -> tuple[set[str], float | None]:
        """The kinds to draw now, else how long to wait (None: until a change)."""
        pending = [k for k in self.intervals if self._drawn[k] < self._seq]
        self._force.intersection_update(pending)
        due, wait = set(), None
        for kind in pending:
            if kind in self._force:
                due.add(kind)
                continue
            at = self._next[kind]
            if self._first[kind] and now >= at:
                at = self._first_at(kind, now)
            if now >= at:
                due.add(kind)
            else:
                wait = at - now if wait is None else min(wait, at - now)
        return due, wait

    def _first_at(self, kind: str, now: float) -> float:
        # The first draw of a session: now if its cost is within budget of the session's
        # expected length; else when the elapsed time covers it (checked each interval, as the
        # expected length becomes known).
        cost, elapsed = self.cost[kind], now - self._session_start
        horizon = self._horizon() or 0.0
        if cost <= self.budget * max(elapsed, horizon):
            return now
        covered = self._session_start + cost / self.budget
        return min(covered, now + self.intervals[kind])

    def _loop(self) -> None:
        me = threading.current_thread()
        while True:
            with self._cond:
                while True:
                    if self._quit or self._thread is not me:
                        self._finish(me)
                        return
                    due, wait = self._due(time.perf_counter())
                    if due:
                        break
                    pending = any(seen < self._seq for seen in self._drawn.values())
                    if not pending and self._ended():
                        self._finish(me)  # the session has ended and is drawn: done
                        return
                    self._idle = wait is None
                    self._cond.wait(wait)
                    self._idle = False
                seq = self._seq
                self._force.difference_update(due)
                try:
                    draws = self._prepare(due)
                except Exception as err:
                    draws = {}
                    self._on_error(err)
            costs = {}
            for kind, draw in draws.items():
                started = time.perf_counter()
                try:
                    draw()
                except Exception as err:
                    self._on_error(err)
                costs[kind] = (started, time.perf_counter() - started)
            with self._cond:
                for kind in due:
                    self._drawn[kind] = seq
                for kind, (started, cost) in costs.items():
                    self.cost[kind], self._first[kind] = cost, False
                    self.draws[kind] += 1
                    self.seconds[kind] += cost
                    # Wait `interval`, or long enough that this draw is `budget` of the time.
                    self._next[kind] = started + max(self.intervals[kind], cost / self.budget)
                self.thread_ids.add(threading.get_ident())
                pending = any(seen < self._seq for seen in self._drawn.values())
                if not pending and self._ended():
                    self._finish(me)  # gone before a flush waiting for this draw returns
                    return
                self._cond.notify_all()

    def _finish(self, me: threading.Thread) -> None:
        if self._thread is me:
            self._thread = None
        self._cond.notify_all()  # a flush waiting on a thread that is gone
