"""The live training dashboard: a listener that shows trainer events as widgets.

    dash = Dashboard()
    display(dash)
    run = mmnb.train("base", listeners=[dash], background=True)
    dash.attach(run)          # gives the Stop / Checkpoint-now buttons a run to act on

Events arrive in the training thread (the kernel's main thread for a blocking run). The
listener only updates widget traits — safe from any thread — and never prints. Its cost is
bounded twice over: redraws are throttled (text every `text_interval`, the plot every
`plot_interval` seconds), and after each redraw the next one waits long enough that drawing
takes at most `budget` of the wall time, however slow drawing is on this machine.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ipywidgets as w

from ..progress import metric_parts
from ..store import Run
from ..train import Event
from .layout import close_tree
from .log import Log
from .plots import Plot


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Dashboard:
    """Progress bar, loss and lr curves with checkpoint markers, Stop and Checkpoint-now."""

    def __init__(
        self,
        run_name: str | None = None,
        *,
        plot_interval: float = 0.75,
        text_interval: float = 0.2,
        budget: float = 0.01,
    ) -> None:
        self.run_name = run_name  # learnt from the first checkpoint event when None
        self.run: Run | None = None
        self.plot_interval, self.text_interval, self.budget = plot_interval, text_interval, budget
        # Training state as the last event left it.
        self.state = "waiting"  # waiting | training | the stop reason
        self.step = self.total = self.epoch = self.steps_per_epoch = self.tokens = 0
        self.loss: float | None = None
        self.lr: float | None = None
        self.tokens_per_s: float | None = None
        self.eta: float | None = None  # seconds
        self.notices: list[str] = []
        self.history: dict[str, list[float]] = {"step": [], "loss": [], "lr": []}
        self.checkpoints: list[tuple[int, float | None]] = []  # (step, loss) of committed ones
        self._epoch_start = 0  # the step at which the current epoch began
        self.draws = {"text": 0, "plot": 0}
        self._session: tuple[float, int, int] | None = None  # (time, step, tokens) at start
        self._next = {"text": 0.0, "plot": 0.0}  # earliest time of the next throttled redraw
        self._lock = threading.RLock()  # events (training thread) vs attach/buttons (kernel)

        self.log = Log()
        # Generous y headroom: a falling loss then crosses the axes' edge (a full redraw)
        # only a few times per run.
        self.plot = Plot(("loss", "lr"), width=9, height=2.6, pad=0.25, live=True, zero=("lr",))
        self.plot.line("loss", "loss", color="#1f77b4")
        self.plot.line("ckpt", "loss", linestyle="none", marker="o", markersize=4, color="#d62728")
        self.plot.line("lr", "lr", color="#2ca02c")
        self.bar = w.IntProgress(value=0, min=0, max=1, layout=w.Layout(width="14em"))
        self.label = w.HTML("waiting for training to start")
        # flex-start: a VBox stretches children to its width, which would blur the PNG.
        self.image = w.Image(
            format="png", layout=w.Layout(max_width="100%", align_self="flex-start")
        )
        self.stop_button = w.Button(description="Stop", icon="stop", disabled=True)
        self.checkpoint_button = w.Button(description="Checkpoint now", icon="save", disabled=True)
        self.stop_button.on_click(self.log.guard(self._on_stop, "stop"))
        self.checkpoint_button.on_click(self.log.guard(self._on_checkpoint, "checkpoint"))
        self.view = w.VBox(
            [
                w.HBox([self.bar, self.label]),
                self.image,
                w.HBox([self.stop_button, self.checkpoint_button]),
                self.log.output,
            ]
        )
        self.view.add_class("mmnb-dashboard")
        self._workers: list[threading.Thread] = []

    # ---- the listener ----
    def __call__(self, event: Event) -> None:
        # A failing display must never end the training that calls it: report and carry on.
        try:
            with self._lock:
                forced = self._update(event)
                self._redraw(force=forced)
        except Exception as err:
            self.log.error(err, f"dashboard ({event.kind} event)")

    def _update(self, event: Event) -> bool:
        """Fold `event` into the state; True when it must be shown at once."""
        info, now = event.info, time.perf_counter()
        if event.kind == "start":
            self.state = "training"
            self.step, self.total = event.step, int(info["total"])
            self.steps_per_epoch = int(info.get("steps_per_epoch") or 0)
            self.epoch = int(info.get("epoch", self.epoch))
            self._epoch_start = event.step - int(info.get("epoch_step", 0))
            self._session = None
            self.tokens_per_s = self.eta = None
            self.plot.set_xmax("loss", self.total)
            self.plot.set_xmax("lr", self.total)
            self._enable(True)
            return True
        if event.kind == "step":
            self.step, self.loss, self.lr = event.step, info["loss"], info["lr"]
            self.tokens = int(info["tokens"])
            if self._session is None:
                self._session = (now, event.step, self.tokens)
            else:
                t0, step0, tokens0 = self._session
                if now > t0 and event.step > step0:
                    self.tokens_per_s = (self.tokens - tokens0) / (now - t0)
                    per_step = (now - t0) / (event.step - step0)
                    self.eta = max(self.total - event.step, 0) * per_step
            h = self.history
            if h["step"] and event.step <= h["step"][-1]:
                # A resume from an older step recomputes these steps: drop the old tail.
                keep = next(i for i, s in enumerate(h["step"]) if s >= event.step)
                for values in h.values():
                    del values[keep:]
            h["step"].append(event.step)
            h["loss"].append(info["loss"])
            h["lr"].append(info["lr"])
            return False
        if event.kind == "epoch":
            self.epoch, self._epoch_start = int(info["epoch"]), event.step
            return False
        if event.kind == "checkpoint":
            saved = info.get("saved")
            if saved is not None:
                self.run_name = self.run_name or saved.run
                self.checkpoints.append((saved.step, saved.loss))
            return "requested" in info.get("reasons", ())
        if event.kind == "notice":
            self.notices.append(str(info["text"]))
            self.log.message(f"note: {info['text']}")
            return True
        if event.kind == "stop":
            self.state = str(info["reason"])
            self.eta = None
            self._enable(False)
            return True
        return False

    # ---- rendering ----
    def _redraw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now >= self._next["text"]:
            self._draw_text()
            self._next["text"] = self._after(now, "text", self.text_interval)
        now = time.perf_counter()
        if force or now >= self._next["plot"]:
            self._draw_plot()
            self._next["plot"] = self._after(now, "plot", self.plot_interval)

    def _after(self, started: float, kind: str, interval: float) -> float:
        # Wait `interval`, or long enough that this redraw's cost is `budget` of the time.
        cost = time.perf_counter() - started
        self.draws[kind] += 1
        return started + max(interval, cost / self.budget)

    def _draw_text(self) -> None:
        self.bar.max = max(self.total, 1)
        self.bar.value = min(self.step, self.bar.max)
        self.bar.bar_style = {"training": "", "done": "success", "waiting": ""}.get(
            self.state, "warning"
        )
        self.label.value = f"<code>{self.text()}</code>"

    def _draw_plot(self) -> None:
        h = self.history
        self.plot.set("loss", h["step"], h["loss"])
        self.plot.set("lr", h["step"], h["lr"])
        marked = [(s, loss) for s, loss in self.checkpoints if loss is not None]
        self.plot.set("ckpt", [s for s, _ in marked], [loss for _, loss in marked])
        if h["step"]:
            self.image.value = self.plot.png()

    def text(self) -> str:
        """The one-line progress text (the text/plain fallback)."""
        parts = [f"run {self.run_name}" if self.run_name else "run"]
        if self.total:
            parts.append(f"step {self.step}/{self.total} ({100 * self.step / self.total:.0f}%)")
        else:
            parts.append(f"step {self.step}")
        if self.steps_per_epoch and self.total:
            # Fractional epochs: the trainer counts completed epochs; steps since the current
            # one began (a branch's stage may start mid-way) give the fraction.
            spe = self.steps_per_epoch
            done = self.epoch + (self.step - self._epoch_start) / spe
            end = done + max(self.total - self.step, 0) / spe
            parts.append(f"epoch {done:.2f}/{end:.3g}")
        parts += metric_parts(self.loss, self.lr, self.tokens_per_s)
        if self.eta is not None and self.state == "training":
            parts.append(f"ETA {_clock(self.eta)}")
        if self.checkpoints:
            parts.append(f"saved step {self.checkpoints[-1][0]}")
        parts.append(self.state)
        return " · ".join(parts)

    # ---- the run the buttons act on ----
    def attach(self, run: Run) -> Dashboard:
        """Give the buttons `run` (the handle `mmnb.train/resume/branch` returned) and show
        its history from before this session."""
        with self._lock:
            self.run, self.run_name = run, run.name
            first = self.history["step"][0] if self.history["step"] else None
            if first is None or first > 1:
                self._prepend(run, first)
            self._enable(self.state in ("waiting", "training") and run.trainer is not None)
            self._redraw(force=True)
        return self

    def _prepend(self, run: Run, before: int | None) -> None:
        metrics = run.metrics()
        steps = metrics.get("step")
        if steps is None or not len(steps):
            return
        keep = [i for i, s in enumerate(steps) if before is None or s < before]
        for key in ("step", "loss", "lr"):
            self.history[key][:0] = [float(metrics[key][i]) for i in keep]
        seen = {s for s, _ in self.checkpoints}
        old = [(s.step, s.loss) for s in run.steps() if before is None or s.step < before]
        self.checkpoints[:0] = [c for c in old if c[0] not in seen]
        if before is None and keep:
            self.step = int(steps[keep[-1]])
            self.loss, self.lr = float(metrics["loss"][keep[-1]]), float(metrics["lr"][keep[-1]])

    def _enable(self, on: bool) -> None:
        on = on and self.run is not None
        self.stop_button.disabled = self.checkpoint_button.disabled = not on

    def _on_stop(self, _button: Any = None) -> None:
        if self.run is None:
            raise ValueError("no run attached: call dashboard.attach(run) first")
        self.run.stop(wait=False)
        self.log.message(
            f"stop requested: {self.run.name} stops after this step, with a checkpoint"
        )
        self.stop_button.disabled = True

    def _on_checkpoint(self, _button: Any = None) -> None:
        if self.run is None:
            raise ValueError("no run attached: call dashboard.attach(run) first")
        run = self.run

        def save() -> None:
            saved = run.checkpoint()
            if saved is not None:
                self.log.message(f"checkpoint committed: {run.name} step {saved.step}")

        # A background run commits at its next step boundary; waiting for that in a worker
        # keeps the kernel free.
        worker = threading.Thread(target=self.log.guard(save, "checkpoint"), daemon=True)
        self._workers.append(worker)
        worker.start()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for Checkpoint-now requests in flight (tests, scripts)."""
        for worker in list(self._workers):
            worker.join(timeout)

    # ---- display ----
    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = self.view._repr_mimebundle_(**kwargs) or {}
        # Front-ends without widgets (terminal IPython, nbconvert to text) show this line,
        # computed now, from the state of the latest event.
        bundle["text/plain"] = self.text()
        return bundle

    def close(self) -> None:
        """Close every widget (the front-end drops the view) and release the figure."""
        close_tree(self.view)
        self.plot.figure.clear()

    def __repr__(self) -> str:
        return f"<mmnb Dashboard: {self.text()}>"
