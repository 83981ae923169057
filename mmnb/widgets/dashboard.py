"""The live training dashboard: a listener that shows trainer events as widgets.

    dash = Dashboard()
    display(dash)
    run = mmnb.train("base", listeners=[dash], background=True)
    dash.attach(run)          # gives the Stop / Checkpoint-now buttons a run to act on

It is a plain listener of `mmnb.train.Event`s, so it can be fed in process or from a run's
event stream. Events arrive in the training thread (the kernel's main thread for a blocking
run). The listener only folds the event into the dashboard's state under its lock; drawing —
the line, the figure and its PNG or ipympl frame — happens on the dashboard's own render thread
(`render.Renderer`), from a copy of the state taken under the lock. Widget traits are set from
that thread (ipykernel sends comm messages from any thread); nothing ever prints. Drawing is
throttled (text every `text_interval`, the plot every `plot_interval` seconds) and, after each
draw, waits until that draw is at most `budget` of the time since, however slow drawing is on
this machine. `wait()` and `freeze()` draw everything received so far before they return, so a
finished run's line and plot show its saved step.

What it shows is the truth of the store at the end: a checkpoint event carries the step, loss
and lr of what was saved, and the final line is that state ("stopped at step 39 as asked ·
loss … · saved step 39"), whatever the last throttled step event said.
"""

from __future__ import annotations

import base64
import html
import threading
import time
from typing import Any

import ipywidgets as w
import numpy as np

from ..describe import BAR_STYLES, colour, reasons_text, state_text
from ..progress import metric_parts
from ..store import Run
from ..train import Event
from .comms import serve
from .fallback import StaticTwin
from .layout import close_tree
from .log import Log
from .plots import Plot
from .render import Renderer

PANELS = ("loss", "lr", "grad norm", "tokens/s")
RATE_WINDOW = 20  # steps over which tokens/s is averaged
FLUSH_TIMEOUT = 30.0  # seconds a freeze waits for the render thread's last picture


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start."""
    values = np.asarray(values, dtype=float)
    if weight <= 0 or not len(values):
        return values
    out = np.empty_like(values)
    acc, norm = 0.0, 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[i] = acc / norm
    return out


def rates(steps: np.ndarray, tokens: np.ndarray, seconds: np.ndarray) -> tuple[Any, Any]:
    """Tokens per second over a window of `RATE_WINDOW` steps, per step."""
    if len(steps) < 2:
        return [], []
    k = np.maximum(np.arange(len(steps)) - RATE_WINDOW, 0)
    dt = seconds - seconds[k]
    ok = (dt > 0) & (np.arange(len(steps)) > 0)
    return steps[ok], (tokens[ok] - tokens[k][ok]) / dt[ok]


class Dashboard:
    """State line, loss / lr / grad-norm / tokens-per-second panels, Stop and Checkpoint now."""

    def __init__(
        self,
        run_name: str | None = None,
        *,
        plot_interval: float = 0.75,
        text_interval: float = 0.2,
        budget: float = 0.01,
        interactive: bool | None = None,
    ) -> None:
        self.run_name = run_name  # learnt from the first checkpoint event when None
        self.run: Run | None = None
        self.plot_interval, self.text_interval, self.budget = plot_interval, text_interval, budget
        # Training state as the last event left it.
        self.state = "waiting"  # waiting | training | the stop reason | failed
        self.error: str | None = None
        self.step = self.total = self.epoch = self.steps_per_epoch = self.tokens = 0
        self.loss: float | None = None
        self.lr: float | None = None
        self.tokens_per_s: float | None = None
        self.eta: float | None = None  # seconds
        self.notices: list[str] = []
        # Per logged step: the curves. `clock` is training seconds (live: wall time).
        self.history: dict[str, list[float]] = {
            k: [] for k in ("step", "loss", "lr", "grad_norm", "tokens", "clock")
        }
        self.checkpoints: list[tuple[int, float | None]] = []  # (step, loss) of committed ones
        self.saved: Any = None  # StepInfo of the newest checkpoint
        self._epoch_start = 0  # the step at which the current epoch began
        self._session: tuple[float, int, int] | None = None  # (time, step, tokens) at start
        self._clock0: float | None = None  # wall time of this session's first step event
        self._clock_base = 0.0  # training seconds before this session
        # Events (training thread) vs the render thread, attach and buttons (kernel).
        self._lock = threading.RLock()
        self._renderer = Renderer(
            self._lock,
            self._prepare,
            {"text": text_interval, "plot": plot_interval},
            budget=budget,
            ended=lambda: self.state != "training",
            horizon=self._horizon,
            on_error=lambda err: self.log.error(err, "dashboard (drawing)"),
        )
        self._workers: list[threading.Thread] = []
        self.blocking = False  # trains in the cell's thread (set by the magics)
        self._plotted = False  # the plot has shown data
        self._stopping = False  # Stop was clicked; the stop event has not come yet
        self.handle: Any = None  # the DisplayHandle when shown through `show()`

        self.log = Log()
        # Generous y headroom: a falling loss then crosses the axes' edge (a full redraw)
        # only a few times per run.
        # `interactive`: ipympl's zoomable canvas (None: where it can be shown, see
        # `interactive.enabled`), else a PNG.
        self.plot = Plot(
            PANELS,
            columns=2,
            width=9.6,
            height=4.6,
            pad=0.25,
            live=True,
            zero=("lr", "tokens/s"),
            interactive=interactive,
        )
        self.plot.line("loss_raw", "loss", color="#1f77b4", alpha=0.25, linewidth=1.0)
        self.plot.line("loss", "loss", color="#1f77b4")
        self.plot.line("ckpt", "loss", linestyle="none", marker="o", markersize=5, color="#d62728")
        self.plot.line("lr", "lr", color="#2ca02c")
        self.plot.line("grad_norm", "grad norm", color="#9467bd")
        self.plot.line("tokens/s", "tokens/s", color="#ff7f0e")
        self.bar = w.IntProgress(value=0, min=0, max=1, layout=w.Layout(width="12em"))
        self.label = w.HTML("waiting for training to start")
        self.label.add_class("mmnb-state")
        self.stop_button = w.Button(
            description="Stop", icon="stop", disabled=True, tooltip="stop after this step, saved"
        )
        self.checkpoint_button = w.Button(
            description="Checkpoint now", icon="save", disabled=True, layout=w.Layout(width="auto")
        )
        self.controls_note = w.HTML()  # what the last click did, next to the buttons
        self.controls_note.add_class("mmnb-controls-note")
        self.scale = w.ToggleButtons(
            options=[("linear", False), ("log", True)],
            value=False,
            description="loss y",
            style={"button_width": "4.5em", "description_width": "auto"},
        )
        self.smoothing = w.FloatSlider(
            value=0.6,
            min=0.0,
            max=0.99,
            step=0.01,
            description="smoothing",
            continuous_update=False,
            readout_format=".2f",
            style={"description_width": "auto"},
            layout=w.Layout(width="18em"),
        )
        self.stop_button.on_click(self.log.guard(self._on_stop, "stop"))
        self.checkpoint_button.on_click(self.log.guard(self._on_checkpoint, "checkpoint"))
        replot = self.log.guard(lambda _change: self._view_changed(), "plot")
        self.scale.observe(replot, names="value")
        self.smoothing.observe(replot, names="value")
        self.buttons = w.HBox(
            [self.stop_button, self.checkpoint_button, self.controls_note],
            layout=w.Layout(align_items="center"),
        )
        self.view = w.VBox(
            [
                w.HBox([self.bar, self.label], layout=w.Layout(align_items="center")),
                self.plot.widget,
                w.HBox(
                    [self.buttons, self.scale, self.smoothing],
                    layout=w.Layout(
                        align_items="center", flex_flow="row wrap", justify_content="space-between"
                    ),
                ),
                self.log.view,
            ]
        )
        self.view.add_class("mmnb-dashboard")
        self.twin = StaticTwin(self.view)  # what nbconvert and saved notebooks show
        # Clicks handled at once and in order, also while a cell blocks (see `comms`).
        self._served = serve(self.view)
        # The empty panels at once, before training: the figure's layout is made here, in the
        # cell, and what a full draw costs on this machine is known to the render budget.
        started = time.perf_counter()
        self.plot.show()
        self._renderer.cost["plot"] = time.perf_counter() - started

    @property
    def draws(self) -> dict[str, int]:
        """How often the line and the plot were drawn."""
        return self._renderer.draws

    # ---- the listener ----
    def __call__(self, event: Event) -> None:
        # A failing display must never end the training that calls it: report and carry on.
        try:
            with self._lock:
                self._renderer.changed(force=self._update(event))
        except Exception as err:
            self.log.error(err, f"dashboard ({event.kind} event)")

    def _update(self, event: Event) -> tuple[str, ...]:
        """Fold `event` into the state; what must be drawn at once ("text", "plot")."""
        info, now = event.info, time.perf_counter()
        if event.kind == "start":
            self.state, self.error = "training", None
            self.step, self.total = event.step, int(info["total"])
            self.steps_per_epoch = int(info.get("steps_per_epoch") or 0)
            self.epoch = int(info.get("epoch", self.epoch))
            self._epoch_start = event.step - int(info.get("epoch_step", 0))
            self._session = None
            self._clock0 = None
            clock = self.history["clock"]
            self._clock_base = clock[-1] if clock else 0.0
            self.tokens_per_s = self.eta = None
            self._renderer.start()
            self._enable(True)
            return ("text",)  # the curves when the render budget allows (see `render`)
        if event.kind == "step":
            self.step, self.loss, self.lr = event.step, info["loss"], info["lr"]
            self.tokens = int(info["tokens"])
            if self._session is None:
                self._session = (now, event.step, self.tokens)
                self._clock0 = now
            else:
                t0, step0, tokens0 = self._session
                if now > t0 and event.step > step0:
                    self.tokens_per_s = (self.tokens - tokens0) / (now - t0)
                    per_step = (now - t0) / (event.step - step0)
                    self.eta = max(self.total - event.step, 0) * per_step
            self._append(
                event.step,
                info["loss"],
                info["lr"],
                info.get("grad_norm", float("nan")),
                self.tokens,
                self._clock_base + (now - (self._clock0 or now)),
            )
            return ()
        if event.kind == "epoch":
            self.epoch, self._epoch_start = int(info["epoch"]), event.step
            return ()
        if event.kind == "checkpoint":
            saved = info.get("saved")
            if saved is not None:
                self.run_name = self.run_name or saved.run
                self.saved = saved
                if not any(s == saved.step for s, _ in self.checkpoints):
                    self.checkpoints.append((saved.step, saved.loss))
                # The saved state is the truth: an interrupt or a stop saves a step that the
                # (throttled) step events may not have shown.
                self.step = max(self.step, saved.step)
                if saved.step == self.step:
                    self.loss = saved.loss if saved.loss is not None else self.loss
                    self.lr = saved.lr if saved.lr is not None else self.lr
            reasons = set(info.get("reasons", ()))
            if "requested" in reasons and saved is not None:
                self._note(f"saved step {saved.step} ({reasons_text(['requested'], saved.tags)})")
            # A requested checkpoint shows at once (training goes on); the last one of a run
            # (end, stop, interrupt) is followed by the stop event, whose redraw shows it.
            return self._renderer.kinds if "requested" in reasons else ()
        if event.kind == "notice":
            self.notices.append(str(info["text"]))
            self.log.message(f"note: {info['text']}")
            return ("text",)
        if event.kind == "stop":
            self.state = str(info["reason"])
            self.error = info.get("error") or info.get("text")
            self.eta = None
            self._enable(False)
            if self._stopping:  # "stopping … after this step" has happened: say so
                self._note(f"stopped at step {self.step}, saved")
                self._stopping = False
            return self._renderer.kinds  # the final picture fits the data (`_draw_plot`)
        return ()

    def _append(self, step, loss, lr, grad_norm, tokens, clock) -> None:  # noqa: ANN001
        h = self.history
        if h["step"] and step <= h["step"][-1]:
            # A resume from an older step recomputes these steps: drop the old tail.
            keep = next(i for i, s in enumerate(h["step"]) if s >= step)
            for values in h.values():
                del values[keep:]
        # One append per column (this runs at every step, in the training thread).
        h["step"].append(float(step))
        h["loss"].append(float(loss))
        h["lr"].append(float(lr))
        h["grad_norm"].append(float(grad_norm))
        h["tokens"].append(float(tokens))
        h["clock"].append(float(clock))

    # ---- rendering (prepared under the lock, drawn on the render thread) ----
    def _horizon(self) -> float | None:
        """The session's expected length in seconds: elapsed plus the ETA (render budget)."""
        if self._clock0 is None or self.eta is None:
            return None
        return time.perf_counter() - self._clock0 + self.eta

    def _prepare(self, kinds: set[str]) -> dict[str, Any]:
        """Copies of what `kinds` show, taken under the lock; the draws run outside it."""
        draws: dict[str, Any] = {}
        if "text" in kinds:
            total = max(self.total, 1)
            tone = colour(self.state)
            label = (
                f"<span style='color:{tone};font-weight:600'>"
                f"{html.escape(state_text(self.state, self.step, {'error': self.error}))}</span>"
                f" <code>{html.escape(self.text(with_state=False))}</code>"
            )
            bar = (total, min(self.step, total), BAR_STYLES.get(self.state, ""))
            draws["text"] = lambda: self._draw_text(bar, label)
        if "plot" in kinds and self.history["step"]:
            data = {k: np.array(v, dtype=float) for k, v in self.history.items()}
            marked = [(s, loss) for s, loss in self.checkpoints if loss is not None]
            view = (self.total, self.state != "training", bool(self.scale.value))
            smooth = float(self.smoothing.value)
            draws["plot"] = lambda: self._draw_plot(data, marked, view, smooth)
        return draws

    def _draw_text(self, bar: tuple[int, int, str], label: str) -> None:
        with self.bar.hold_sync():  # one comm message for the bar's three traits
            # The bar's max first: a value above the old max would be clipped.
            self.bar.max, self.bar.value, self.bar.bar_style = bar
        self.label.value = label

    def _view_changed(self) -> None:
        with self._lock:
            self._renderer.changed(force=("plot",))

    def _draw_plot(
        self, h: dict[str, np.ndarray], marked: list, view: tuple, smooth: float
    ) -> None:
        total, settled, log = view
        steps = h["step"]
        with self.plot.lock:  # one picture at a time (a snapshot, the user's navigation)
            self.plot.set_horizon(total)
            self.plot.settle(settled)  # the final picture fits the data, no headroom
            self.plot.set_log("loss", log)
            self.plot.set("loss_raw", steps, h["loss"])
            self.plot.set_visible("loss_raw", smooth > 0)
            self.plot.set("loss", steps, ema(h["loss"], smooth))
            self.plot.set("lr", steps, h["lr"])
            self.plot.set("grad_norm", steps, h["grad_norm"])
            self.plot.set("tokens/s", *rates(steps, h["tokens"], h["clock"]))
            self.plot.set("ckpt", [s for s, _ in marked], [loss for _, loss in marked])
            self.plot.show()
        self._plotted = True

    def text(self, with_state: bool = True) -> str:
        """The one-line state (the text/plain fallback)."""
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
            # The planned end as a whole number when it is one (2 epochs), else like `done`.
            whole = abs(end - round(end)) < 5e-3
            parts.append(f"epoch {done:.2f}/{round(end) if whole else f'{end:.2f}'}")
        parts += metric_parts(self.loss, self.lr, self.tokens_per_s)
        if self.eta is not None and self.state == "training":
            parts.append(f"ETA {_clock(self.eta)}")
        if self.saved is not None:
            parts.append(f"saved step {self.saved.step}")
        elif self.checkpoints:
            parts.append(f"saved step {self.checkpoints[-1][0]}")
        if with_state:
            parts.append(state_text(self.state, self.step, {"error": self.error}))
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
            self._renderer.changed(force=self._renderer.kinds)
        return self

    def _prepend(self, run: Run, before: int | None) -> None:
        metrics = run.metrics()
        steps = metrics.get("step")
        if steps is None or not len(steps):
            return
        keep = [i for i, s in enumerate(steps) if before is None or s < before]
        for key, source in (
            ("step", "step"),
            ("loss", "loss"),
            ("lr", "lr"),
            ("grad_norm", "grad_norm"),
            ("tokens", "tokens"),
            ("clock", "time"),
        ):
            column = metrics.get(source)
            values = [float(column[i]) if column is not None else float("nan") for i in keep]
            self.history[key][:0] = values
        seen = {s for s, _ in self.checkpoints}
        old = [(s.step, s.loss) for s in run.steps() if before is None or s.step < before]
        self.checkpoints[:0] = [c for c in old if c[0] not in seen]
        if before is None and keep:
            self.step = int(steps[keep[-1]])
            self.loss, self.lr = float(metrics["loss"][keep[-1]]), float(metrics["lr"][keep[-1]])
            self.saved = run.latest()

    def _enable(self, on: bool) -> None:
        on = on and self.run is not None
        self.stop_button.disabled = self.checkpoint_button.disabled = not on

    def serve_clicks(self) -> bool:
        """While a cell blocks on training, handle the controls' clicks at once (see
        `comms`); when the kernel cannot, hide Stop / Checkpoint now and say how to stop."""
        self.blocking = True
        if self._served:
            return True
        self.stop_button.layout.display = self.checkpoint_button.layout.display = "none"
        self.controls_note.value = (
            "<small>Kernel → Interrupt stops this run with a checkpoint; "
            "<code>--background</code> gives Stop and Checkpoint-now buttons.</small>"
        )
        return False

    def _note(self, text: str, error: bool = False) -> None:
        tone = colour("failed") if error else "inherit"
        self.controls_note.value = f"<span style='color:{tone}'>{html.escape(text)}</span>"

    def _on_stop(self, _button: Any = None) -> None:
        if self.run is None:
            raise ValueError("no run attached: call dashboard.attach(run) first")
        if self.run.trainer is None:
            raise ValueError(f"run {self.run.name} is not training in this kernel")
        self.run.trainer.stop()  # thread-safe: the trainer stops at its next step boundary
        self._note(f"stopping {self.run.name} after this step, with a checkpoint…")
        self._stopping = True
        self.stop_button.disabled = True

    def _on_checkpoint(self, _button: Any = None) -> None:
        if self.run is None:
            raise ValueError("no run attached: call dashboard.attach(run) first")
        run = self.run
        self._note("saving at the next step boundary…")

        def save() -> None:
            trainer = run.trainer
            future = trainer.request_checkpoint() if trainer is not None else None
            saved = future.result() if future is not None else run.checkpoint()
            if saved is not None:
                self._note(f"saved step {saved.step} (checkpoint you requested)")

        # Training commits at its next step boundary; waiting for that in a worker keeps the
        # kernel (or the helper subshell) free.
        def guarded() -> None:
            try:
                save()
            except Exception as err:
                self._note(f"checkpoint failed: {err}", error=True)
                self.log.error(err, "checkpoint")

        worker = threading.Thread(target=guarded, daemon=True)
        self._workers.append(worker)
        worker.start()

    def fail(self, err: BaseException) -> None:
        """Training could not start or ended with `err`: say so (never 'waiting' forever)."""
        with self._lock:
            if self.state in ("waiting", "training"):
                self.state, self.error = "failed", str(err).splitlines()[0] if str(err) else ""
                if not self.error:
                    self.error = type(err).__name__
            self._enable(False)
            self._renderer.changed(force=self._renderer.kinds)

    def discard(self) -> None:
        """Nothing was trained (the call failed on its input): remove the dashboard."""
        self.close()
        if self.handle is not None:
            self.handle.update({"text/plain": ""}, raw=True)
        if self.twin.handle is not None:
            self.twin.handle.update({"text/plain": ""}, raw=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for Checkpoint-now requests in flight, then draw everything received so far
        (the line and the plot show the latest event); False if `timeout` passed first."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        for worker in list(self._workers):
            worker.join(timeout)
        left = None if deadline is None else max(deadline - time.perf_counter(), 0.0)
        return self._renderer.flush(left) and not any(w.is_alive() for w in self._workers)

    # ---- display ----
    def show(self) -> Dashboard:
        """Display now, with a static twin (`fallback.StaticTwin`) that `freeze()` fills."""
        from IPython.display import display

        self.handle = display(self, display_id=True)
        self.twin.show()
        return self

    def freeze(self) -> None:
        """Training has ended: the outputs shown with `show()` get the final state, so a saved
        notebook, nbconvert's HTML or a viewer without widgets shows how training ended, not
        its first frame: the twin's line and plot (hidden wherever the widget itself renders),
        or its text in a text viewer."""
        self._renderer.flush(FLUSH_TIMEOUT)  # the final line and picture, drawn
        self._renderer.stop()
        if self.handle is None:
            return
        # The line once: in the twin (its text for text viewers); the widget output says
        # nothing where it does not render (JupyterLab saves it without its widget).
        self.handle.update({**self.view._repr_mimebundle_(), "text/plain": ""}, raw=True)
        self.twin.update(self.static_html(), self.text())

    def static_html(self) -> str:
        """The state as plain HTML: the line (its state in colour) and the plot image."""
        self._renderer.flush(FLUSH_TIMEOUT)  # the picture of the latest event
        state = state_text(self.state, self.step, {"error": self.error})
        with self.plot.lock:
            image = self.plot.snapshot() if self._plotted else b""
        css_w, _ = self.plot.css_size
        img = (
            f"<img alt='training curves' style='width:{css_w}px;max-width:100%' "
            f"src='data:image/png;base64,{base64.b64encode(image).decode()}'/>"
            if image
            else ""
        )
        return (
            f"<div class='mmnb-dashboard-static'><span style='color:{colour(self.state)};"
            f"font-weight:600'>{html.escape(state)}</span> "
            f"<code>{html.escape(self.text(with_state=False))}</code><br>{img}</div>"
        )

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = self.view._repr_mimebundle_(**kwargs) or {}
        # Front-ends without widgets (terminal IPython, nbconvert, a saved notebook) show
        # these, computed now, from the state of the latest event.
        bundle["text/plain"] = self.text()
        if self.state not in ("waiting", "training"):
            bundle["text/html"] = self.static_html()
        return bundle

    def close(self) -> None:
        """Close every widget (the front-end drops the view) and release the figure."""
        self._renderer.stop()
        close_tree(self.view)
        self.plot.figure.clear()

    def __repr__(self) -> str:
        return f"<mmnb Dashboard: {self.text()}>"
