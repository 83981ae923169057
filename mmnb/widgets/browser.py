"""The history browser: a store's run tree, a slider over a run's checkpoints, and actions.

    b = mmnb.browse("mmnb-runs")      # works in a fresh kernel, from the store alone

Choosing a run shows its loss and lr curves; the step slider (`continuous_update=False`)
moves a marker along them and shows the checkpoint's metadata. A slider move reads nothing
from disk (the catalog caches each run's index and metrics until its index changes) and only
blits the marker onto a cached plot, so it stays well under 200 ms on a run of 1,000
checkpoints. Tabs below: a text sample of the checkpoint (on Generate), Branch, Extend /
resume, Delete, and Compare. Training actions run in the background, each with its own
dashboard, and the browser refreshes when they end. Everything a callback raises lands in
the log area at the bottom.
"""

from __future__ import annotations

import bisect
import html
import threading
import time
from typing import Any

import ipywidgets as w

from ..describe import reasons_text, state_text
from ..store import Run, StepInfo, Store
from .actions import Actions
from .catalog import Catalog, RunEntry
from .cleanup import Cleanup
from .comms import serve
from .compare import Compare
from .dashboard import Dashboard
from .exporter import ExportTab
from .layout import close_tree
from .log import Log
from .plots import Plot
from .queue import QueueTab
from .sampler import Sampler


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{secs:04.1f}" if hours else f"{minutes}:{secs:04.1f}"


class Browser:
    """The history of a store as widgets. Display it, or call its methods (tests, scripts)."""

    def __init__(
        self,
        store: Store | str | None = None,
        *,
        models: int = 3,
        interactive: bool | None = None,
    ) -> None:
        """`interactive`: the Compare plot as ipympl's zoomable canvas (None: where one can
        be shown, see `mmnb.widgets.interactive`)."""
        self.store = store if isinstance(store, Store) else Store(store)
        self.catalog = Catalog(self.store)
        self.log = Log()
        self.jobs: list[Run] = []  # runs that actions started, oldest first
        self.last_update_s: float | None = None  # how long the last slider move took
        self._selected: tuple[str, int] | None = None
        self._plotted: tuple[str, tuple[int, int]] | None = None  # (run, index stamp)
        self._quiet = False  # set while options change, so observers ignore the churn
        self._lock = threading.RLock()  # kernel callbacks vs threads following actions
        self._watchers: list[threading.Thread] = []
        self._reported: set[str] = set()  # store problems already shown in the log
        self._dashboards: list[Dashboard] = []
        guard = self.log.guard

        self.runs = w.Select(options=[], rows=6, layout=w.Layout(width="auto", flex="1"))
        self.runs.add_class("mmnb-runs")
        self.refresh_button = w.Button(
            description="Refresh", icon="refresh", layout=w.Layout(width="auto")
        )
        self.refresh_button.on_click(guard(lambda _: self.refresh(), "refresh"))
        self.cleanup = Cleanup(self.store, self.log, self.refresh)
        self.status = w.HTML()
        # The slider's value IS the step (so the handle's aria-valuenow/-text is the step and
        # its position shows the distance between checkpoints); a value between two
        # checkpoints snaps to the next one in the direction it moved (`_on_step`).
        self._steps: list[int] = []  # the selected run's checkpoint steps
        self._sent: tuple[int, float] | None = None  # the last value the slider sent, when
        self.slider_box = w.Box(layout=w.Layout(width="98%"))
        self.slider = self._new_slider(0, 1, 0)
        # A PNG (never ipympl's canvas): a slider move blits one marker, in a few ms.
        self.plot = Plot(("loss", "lr"), width=6.6, height=2.5, grow=1.03, interactive=False)
        self.plot.widget.layout.max_width = "68%"
        self.meta = w.HTML()
        self.meta.add_class("mmnb-meta")
        self.plot.line("loss", "loss", static=True, color="#1f77b4")
        self.plot.line("lr", "lr", static=True, color="#2ca02c")
        self.plot.line("ckpts", "loss", static=True, linestyle="none", marker="o", markersize=2.5,
                       color="#7f7f7f", alpha=0.7)  # fmt: skip
        self.plot.line("branches", "loss", static=True, linestyle="none", marker="v",
                       markersize=7, color="#9467bd")  # fmt: skip
        # Automatic recoveries (rollbacks, mmnb.jobs.recovery) where they returned to.
        self.plot.line("recoveries", "loss", static=True, linestyle="none", marker="X",
                       markersize=8, color="#ff7f0e")  # fmt: skip
        self.plot.line("at", "loss", linestyle="none", marker="o", markersize=8, color="#d62728")
        self.plot.line("at_lr", "lr", linestyle="none", marker="o", markersize=6, color="#d62728")

        self.sampler = Sampler(self.log, self.selection, cache_size=models)
        self.actions = Actions(self.catalog, self.log, self.selection, self._job, self.refresh)
        self.compare = Compare(self.catalog, self.log, interactive=interactive)
        self.exporter = ExportTab(self.log, self.selection)
        self.queue = QueueTab(self.store.path, self.log)
        # One (title, view) per tab: another action adds its own line here.
        tabs = [
            ("Sample", self.sampler.view),
            *zip(("Branch", "Extend / resume", "Delete"), self.actions.views, strict=True),
            ("Export", self.exporter.view),
            ("Compare", self.compare.view),
            ("Queue", self.queue.view),
        ]
        self.tabs = w.Tab(children=[v for _, v in tabs], titles=[t for t, _ in tabs])
        self.jobs_box = w.VBox()
        self.view = w.VBox(
            [
                w.HBox([self.runs, w.VBox([self.refresh_button, self.cleanup.view, self.status])]),
                self.slider_box,
                # Top-aligned: a stretched row would stretch the image's height too.
                w.HBox([self.plot.widget, self.meta], layout=w.Layout(align_items="flex-start")),
                self.tabs,
                self.jobs_box,
                self.log.view,
            ]
        )
        self.view.add_class("mmnb-browser")
        # Messages handled in the order they were sent (a field's value before the click that
        # reads it), and while a cell runs (see `comms`).
        serve(self.view)
        self.runs.observe(guard(self._on_run, "choose run"), names="value")
        guard(self.refresh, "refresh")()

    # ---- what is selected ----
    @property
    def checkpoint_steps(self) -> list[int]:
        """The steps the slider stops at: the selected run's checkpoints."""
        return list(self._steps)

    def selection(self) -> tuple[RunEntry, StepInfo] | None:
        """The chosen (run entry, checkpoint), or None."""
        if self._selected is None:
            return None
        name, step = self._selected
        entry = self.catalog.entries.get(name)
        info = entry.by_step.get(step) if entry else None
        return (entry, info) if entry and info else None

    def select(self, run: str, step: int | None = None) -> None:
        """Show `run` at `step` (its newest checkpoint when None)."""
        with self._lock:
            if run not in self.catalog:
                self.catalog.refresh()
            entry = self.catalog[run]
            self._quiet = True
            try:
                self.runs.value = run
                if entry.steps:
                    self._steps = [s.step for s in entry.steps]
                    if step is None or step not in entry.by_step:
                        step = entry.steps[-1].step if step is None else _nearest(entry, step)
                    lo, hi = self._steps[0], max(self._steps[-1], self._steps[0] + 1)
                    if (self.slider.min, self.slider.max) != (lo, hi):
                        self.slider = self._new_slider(lo, hi, step)
                    self.slider.value = step
                    self.slider.disabled = False
                else:
                    self._steps = []
                    self.slider.disabled = True
            finally:
                self._quiet = False
            if entry.steps:
                self._show(entry, entry.by_step[step])  # type: ignore[index]
            else:
                self._selected = None
                self.meta.value = f"<i>{html.escape(run)} has no checkpoint</i>"

    # The observers take the lock before looking at `_quiet`: a user's change that arrives
    # while a thread that follows an action refreshes waits for it, instead of being mistaken
    # for the refresh's own churn.
    def _on_run(self, change: dict[str, Any]) -> None:
        with self._lock:
            if not self._quiet and change["new"] is not None:
                self.select(change["new"])

    def _on_step(self, change: dict[str, Any]) -> None:
        with self._lock:
            if self._quiet or self._selected is None or change["new"] is None:
                return
            entry = self.catalog[self._selected[0]]
            old, new, now = change["old"], change["new"], time.monotonic()
            sent, self._sent = self._sent, (new, now)
            if (
                sent is not None
                and sent[0] != old
                and abs(new - sent[0]) == 1
                and now - sent[1] < 2
            ):
                # Two quick arrow keys: the second left the browser before the first one's
                # snapped step reached it (its handle was still at `sent`), so it means one
                # checkpoint further in its direction, not a jump back.
                step = self._neighbour(old, 1 if new > sent[0] else -1)
            else:
                step = self._snap(old, new)
            if step != change["new"]:
                self._quiet = True  # the snapped value is shown below, once
                try:
                    self.slider.value = step
                finally:
                    self._quiet = False
            info = entry.by_step.get(step)
            if info is not None:
                self._show(entry, info)

    def _new_slider(self, lo: int, hi: int, value: int) -> w.IntSlider:
        """A slider over steps lo..hi, in place of the old one. A new widget, not a new range:
        the browser's slider (noUiSlider) keeps the range it was made with for its Home and End
        keys, so after a change of range End would land on the old last step."""
        slider = w.IntSlider(
            value=value,
            min=lo,
            max=hi,
            description="step",
            continuous_update=False,
            disabled=True,
            style={"description_width": "initial"},
            layout=w.Layout(width="100%"),
        )
        slider.add_class("mmnb-slider")
        slider.observe(self.log.guard(self._on_step, "step"), names="value")
        old = getattr(self, "slider", None)
        self.slider_box.children = (slider,)
        if old is not None:
            serve(slider)
        if old is not None:
            old.close()
        self._sent = None
        return slider

    def _neighbour(self, step: int, direction: int) -> int:
        """The checkpoint after (direction 1) or before (-1) `step`; `step` at either end."""
        steps = self._steps
        if direction > 0:
            i = bisect.bisect_right(steps, step)
            return steps[i] if i < len(steps) else step
        i = bisect.bisect_left(steps, step)
        return steps[i - 1] if i > 0 else step

    def _snap(self, old: int | None, new: int) -> int:
        """The checkpoint a slider value means: itself, else the next one in the direction the
        handle moved (an arrow key moves by one step), else the nearest."""
        steps = self._steps
        if not steps or new in steps:
            return new
        i = bisect.bisect_left(steps, new)
        if old is not None and new > old and i < len(steps):
            return steps[i]
        if old is not None and new < old and i > 0:
            return steps[i - 1]
        candidates = steps[max(i - 1, 0) : i + 1]
        return min(candidates, key=lambda s: (abs(s - new), s))

    # ---- showing a checkpoint ----
    def _show(self, entry: RunEntry, info: StepInfo) -> None:
        started = time.perf_counter()
        self._selected = (entry.name, info.step)
        self._plot_run(entry)
        loss, lr = _values(entry, info)
        at = ([info.step], [loss]) if loss is not None else ([], [])
        self.plot.set("at", *at)
        self.plot.set("at_lr", *(([info.step], [lr]) if lr is not None else ([], [])))
        self.plot.show()
        self.meta.value = self._meta_html(entry, info)
        self.actions.selected(entry, info)
        self.exporter.selected(entry, info)
        self.last_update_s = time.perf_counter() - started
        self.sampler.selected(entry, info)  # may generate: not part of the slider's latency

    def _plot_run(self, entry: RunEntry) -> None:
        if self._plotted == (entry.name, entry.stamp):
            return
        metrics = entry.metrics()
        steps = metrics.get("step", [])
        self.plot.set("loss", steps, metrics.get("loss", []))
        self.plot.set("lr", steps, metrics.get("lr", []))
        marked = [(s.step, _values(entry, s)[0]) for s in entry.steps]
        marked = [(s, v) for s, v in marked if v is not None]  # step 0 too: the first loss
        self.plot.set("ckpts", [s for s, _ in marked], [v for _, v in marked])
        points = [
            (s, entry.value_at("loss", s)) for s in sorted(self.catalog.branch_points(entry.name))
        ]
        points = [(s, v) for s, v in points if v is not None]
        self.plot.set("branches", [s for s, _ in points], [v for _, v in points])
        back = [(s, entry.value_at("loss", s)) for s in recovery_steps(entry.run)]
        back = [(s, v) for s, v in back if v is not None]
        self.plot.set("recoveries", [s for s, _ in back], [v for _, v in back])
        self._plotted = (entry.name, entry.stamp)

    def _meta_html(self, entry: RunEntry, info: StepInfo) -> str:
        kids = [c.name for c in self.catalog.children(entry.name) if c.parent[1] == info.step]  # type: ignore[index]
        loss, lr = _values(entry, info)
        first = " (first batch, initial weights)" if info.step == 0 else ""
        rows = [
            ("run", entry.name + (f" (from {info.run})" if info.inherited else "")),
            ("step", f"{info.step}"),
            ("epoch", f"{info.epoch} (sample {info.position:,})"),
            ("loss", "—" if loss is None else f"{loss:.4f}{first}"),
            ("lr", "—" if lr is None else f"{lr:.3e}" + (" (of step 1)" if first else "")),
            ("tokens", f"{info.tokens:,}"),
            ("time", _duration(info.elapsed)),
            ("size", _size(info.bytes)),
            ("saved", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created))),
            ("why", reasons_text(info.reasons, info.tags)),
        ]
        if kids:
            rows.append(("branches", ", ".join(kids)))
        cells = "".join(
            f"<tr><th style='text-align:right;padding-right:.6em'>{k}</th>"
            f"<td>{html.escape(v)}</td></tr>"
            for k, v in rows
        )
        return f"<table style='font-size:90%;line-height:1.3;white-space:nowrap'>{cells}</table>"

    def meta_text(self) -> str:
        """The selected checkpoint's metadata as text."""
        chosen = self.selection()
        if chosen is None:
            return "no checkpoint selected"
        entry, info = chosen
        loss = "—" if info.loss is None else f"{info.loss:.4f}"
        return (
            f"{entry.name} step {info.step} · epoch {info.epoch} · loss {loss} · "
            f"tokens {info.tokens:,} · {_size(info.bytes)}"
        )

    # ---- keeping up with the store ----
    def refresh(self) -> None:
        """Re-read the store (only runs whose index changed) and keep the selection."""
        with self._lock:
            self.catalog.refresh()
            for text in self.catalog.problems:  # damaged runs: said once, the rest shown
                if text not in self._reported:
                    self._reported.add(text)
                    self.log.message(f"warning: {text}")
            tree = self.catalog.tree()
            self._quiet = True
            try:
                self.runs.options = [(self.catalog.label(n, d), n) for d, n in tree]
            finally:
                self._quiet = False
            self.compare.update_options()
            if hasattr(self, "queue"):
                self.queue.refresh()
            self.status.value = (
                f"<small>{len(tree)} run{'s' * (len(tree) != 1)} in "
                f"<code>{html.escape(str(self.store.path))}</code></small>"
            )
            if self._selected and self._selected[0] in self.catalog:
                self.select(*self._selected)
            elif tree:
                newest = max(self.catalog.entries.values(), key=lambda e: e.stamp[0])
                self.select(newest.name)
            else:
                self._selected = None
                self.meta.value = f"<i>no runs in {html.escape(str(self.store.path))}</i>"

    def _job(self, label: str, run: Run, dash: Dashboard) -> None:
        """An action started `run` in the background: show its dashboard, follow it."""
        with self._lock:
            self.jobs.append(run)
            done = [d for d in self._dashboards if d.state not in ("waiting", "training")]
            for old in done:
                self._dashboards.remove(old)
                old.close()
            self._dashboards.append(dash)
            self.jobs_box.children = [d.view for d in self._dashboards]
            self.refresh()
            self.select(run.name)
            shown = self._selected

        def follow() -> None:
            try:
                run.wait()  # re-raises what ended the training, if it failed
                said = state_text(dash.state, dash.step, {"error": dash.error})
                self.log.message(f"{label}: {run.name} {said}")
            finally:
                self.refresh()
                if self._selected == shown:  # the user still looks where the job started:
                    self.select(run.name)  # show what it trained

        watcher = threading.Thread(target=self.log.guard(follow, label), daemon=True)
        self._watchers.append(watcher)
        watcher.start()

    def wait(self, timeout: float | None = None) -> Browser:
        """Wait until the background actions end and the browser has refreshed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for watcher in list(self._watchers):
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            watcher.join(left)
        return self

    # ---- display ----
    def text(self) -> str:
        """The tree and the selection as text (the text/plain fallback)."""
        lines = [f"mmnb history browser: {self.store.path}"]
        lines += [self.catalog.label(n, d) for d, n in self.catalog.tree()] or ["(no runs)"]
        lines += [f"skipped: {text}" for text in self.catalog.problems]
        lines.append("selected: " + self.meta_text())
        return "\n".join(lines)

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = self.view._repr_mimebundle_(**kwargs) or {}
        bundle["text/plain"] = self.text()
        return bundle

    def __repr__(self) -> str:
        return f"<mmnb Browser of {self.store.path}: {len(self.catalog.entries)} runs>"

    def close(self) -> None:
        """Close every widget and drop cached models (background training keeps running)."""
        for dash in self._dashboards:
            dash.close()
        self.queue.close()
        close_tree(self.view)
        self.sampler.models.clear()
        self.plot.figure.clear()


def _values(entry: RunEntry, info: StepInfo) -> tuple[float | None, float | None]:
    """(loss, lr) to show for a checkpoint. Step 0 has trained nothing: its loss is that of
    the first batch on the initial weights and its lr the first step's, both logged with
    step 1."""
    step = info.step if info.step > 0 else 1
    loss = info.loss if info.loss is not None else entry.value_at("loss", step)
    lr = info.lr if info.lr is not None else entry.value_at("lr", step)
    return loss, lr


def recovery_steps(run: Run) -> list[int]:
    """Steps where a recovery continued the run (a rollback's target, a restart's checkpoint),
    from its recorded history."""
    try:
        history = run.info().get("history", [])
    except Exception:  # a damaged run file: no markers rather than no plot
        return []
    return sorted(
        {
            e["step"]
            for e in history
            if isinstance(e, dict)
            and e.get("kind") in ("rollback", "restart")
            and isinstance(e.get("step"), int)
        }
    )


def _nearest(entry: RunEntry, step: int) -> int:
    """The committed step closest to `step` (a deleted checkpoint's neighbour)."""
    return min(entry.by_step, key=lambda s: (abs(s - step), s))


def browse(store: Store | str | None = None) -> Browser:
    """The history browser of `store` (default: ./mmnb-runs or $MMNB_STORE)."""
    return Browser(store)
