"""The widget front-ends, headless: build them, set values, click buttons, check the store.

No browser and no kernel: ipywidgets without a kernel keeps every trait in Python, which is
all these tests look at. Background actions are awaited through `Browser.wait()` (it joins
the threads that follow them), never with sleeps.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import threading
import types

import ipywidgets as widgets
import numpy as np
import pytest
from PIL import Image

import mmnb
from mmnb.store import StepInfo
from mmnb.train import Event, Trainer
from mmnb.widgets import Browser, Dashboard, interactive
from mmnb.widgets.actions import parse_number

PNG = b"\x89PNG\r\n\x1a\n"


def _events(total: int = 10) -> list[Event]:
    saved0 = StepInfo(step=0, file="ckpt/00000000.h5", run="demo", reasons=["start"])
    events = [
        Event("checkpoint", 0, {"reasons": ["start"], "tags": [], "saved": saved0}),
        Event("start", 0, {"total": total, "steps_per_epoch": 5, "epoch": 0, "epoch_step": 0}),
    ]
    for step in range(1, total + 1):
        loss = 6.0 - 0.3 * step
        events.append(Event("step", step, {"loss": loss, "lr": 1e-3, "tokens": 128 * step}))
        if step == 5:
            events.append(Event("epoch", 5, {"epoch": 1}))
            saved = StepInfo(step=5, file="ckpt/00000005.h5", run="demo", reasons=["epoch"])
            saved.loss = loss
            events.append(
                Event("checkpoint", 5, {"reasons": ["epoch"], "tags": [], "saved": saved})
            )
    events.append(Event("stop", total, {"reason": "done"}))
    return events


def _log_text(widget) -> str:
    return widget.log.text()


# ---- dashboard ----
def test_dashboard_shows_events_and_a_png():
    dash = Dashboard()
    for event in _events()[:-1]:
        dash(event)
        text = dash._repr_mimebundle_()["text/plain"]
        assert text == dash.text()  # the fallback is computed from the latest event
    assert dash.step == 10 and dash.loss == pytest.approx(3.0)
    assert "step 10/10" in dash.text() and "loss 3.0000" in dash.text()
    assert "run demo" in dash.text()  # learnt from the checkpoint event
    assert dash.checkpoints[-1] == (5, pytest.approx(4.5))
    dash(_events()[-1])  # stop forces a final draw, however recent the last one was
    assert dash.wait(timeout=60)  # drawn by the render thread: wait() waits for it
    assert dash.bar.value == dash.bar.max == 10
    assert "step 10/10" in dash.label.value and "finished at step 10" in dash.label.value
    assert "#2e7d32" in dash.label.value  # green: finished
    assert bytes(dash.plot.widget.value).startswith(PNG)
    bundle = dash._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"].endswith("finished at step 10")
    assert "data:image/png;base64," in bundle["text/html"]  # the static fallback: the plot
    assert dash.stop_button.disabled  # nothing to stop any more
    dash.close()


def test_dashboard_axes_follow_the_data_and_the_plan_end_is_a_marker():
    dash = Dashboard(plot_interval=0, budget=1.0)  # draw on every event
    dash(Event("start", 0, {"total": 4080, "steps_per_epoch": 408}))
    for step in range(1, 21):
        dash(Event("step", step, {"loss": 7 - step / 10, "lr": 1e-3, "tokens": 64 * step,
                                  "grad_norm": 1.0}))  # fmt: skip
    assert dash.wait(timeout=60)
    ax = dash.plot.axes["loss"]
    x0, x1 = ax.get_xlim()
    assert (20 - 1) / (x1 - x0) >= 0.5  # the curve spans most of the width, not 20/4080
    assert "plan ends at 4,080" in dash.plot.axes["tokens/s"].get_xlabel()
    assert set(dash.plot.axes) == {"loss", "lr", "grad norm", "tokens/s"}
    x, y = dash.plot._artists["grad_norm"][1].get_data()
    assert len(x) == 20 and y[-1] == 1.0
    # crisp: the PNG has twice the pixels of the size it is shown at
    width, height = dash.plot.css_size
    png = bytes(dash.plot.widget.value)
    assert int.from_bytes(png[16:20], "big") == 2 * width
    assert dash.plot.widget.layout.width == f"{width}px"
    # log scale and smoothing redraw at once
    dash.scale.value = True
    assert dash.wait(timeout=60)
    assert ax.get_yscale() == "log"
    raw = dash.plot._artists["loss_raw"][1].get_data()[1]
    dash.smoothing.value = 0.9
    assert dash.wait(timeout=60)
    smooth = dash.plot._artists["loss"][1].get_data()[1]
    assert smooth[-1] > raw[-1]  # a falling curve, smoothed, lags behind
    dash.smoothing.value = 0.0
    assert dash.wait(timeout=60)
    assert not dash.plot._artists["loss_raw"][1].get_visible()


def test_dashboard_final_line_is_the_saved_state():
    """Step events are throttled (log_every); the checkpoint an interrupt commits is the truth."""
    dash = Dashboard()
    dash(Event("start", 0, {"total": 4080}))
    for step in (10, 20):
        dash(Event("step", step, {"loss": 5.0, "lr": 2e-3, "tokens": 64 * step}))
    saved = StepInfo(step=24, file="ckpt/00000024.h5", run="long", reasons=["interrupt"],
                     loss=4.933, lr=1.9e-3)  # fmt: skip
    dash(Event("checkpoint", 24, {"reasons": ["interrupt"], "tags": [], "saved": saved}))
    dash(Event("stop", 24, {"reason": "interrupt"}))
    text = dash.text()
    assert "step 24/4080" in text and "loss 4.9330" in text and "lr 1.90e-03" in text
    assert text.endswith("saved step 24 · interrupted: step 24 is saved")
    assert dash.wait(timeout=60)
    assert dash.bar.bar_style == "warning" and "#ef6c00" in dash.label.value  # orange
    stopped = Dashboard()
    stopped(Event("start", 30, {"total": 100}))
    stopped(Event("stop", 39, {"reason": "stop_at"}))
    assert "stopped at step 30 as asked" in stopped.text()
    failed = Dashboard()
    failed(Event("start", 0, {"total": 100}))
    failed(Event("stop", 3, {"reason": "failed", "error": "RuntimeError: boom"}))
    assert failed.text().endswith("failed after step 0: RuntimeError: boom")
    assert failed.wait(timeout=60)
    assert failed.bar.bar_style == "danger"
    never = Dashboard()
    never.fail(ValueError("--lr must be positive"))
    assert never.state == "failed" and "--lr must be positive" in never.text()


def test_dashboard_redraws_are_throttled():
    dash = Dashboard(plot_interval=60, text_interval=60)
    events = _events(total=500)[:-1]
    for event in events[:2]:  # the step-0 checkpoint, then start (which always draws)
        dash(event)
    assert dash.wait(timeout=60)
    drawn = dict(dash.draws)
    assert drawn["text"] >= 1
    for event in events[2:]:
        dash(event)
    assert dash.draws == drawn  # 500 steps within the intervals draw nothing more
    assert dash.text().startswith("run demo · step 500/500")  # the state is always current
    dash(Event("stop", 500, {"reason": "done"}))
    assert dash.wait(timeout=60)
    assert dash.draws["plot"] == drawn["plot"] + 1 and "step 500/500" in dash.label.value
    assert not dash._renderer.running  # the run has ended and is drawn: its thread is gone


def test_dashboard_listener_errors_are_shown_and_training_goes_on():
    dash = Dashboard()
    dash(Event("start", 0, {"total": 3}))
    dash(Event("step", 1, {"lr": 1e-3, "tokens": 1}))  # no loss: the handler raises KeyError
    assert "KeyError" in _log_text(dash) and "dashboard (step event)" in _log_text(dash)
    dash(Event("step", 2, {"loss": 2.0, "lr": 1e-3, "tokens": 2}))
    assert dash.step == 2


def test_dashboard_buttons_without_a_run_say_so():
    dash = Dashboard()
    dash.stop_button.click()  # disabled in a front-end; a click from code still reports
    assert "attach(run)" in _log_text(dash)


def test_dashboard_stop_and_checkpoint_buttons_on_background_run(store, micro):
    dash = Dashboard()
    run = mmnb.train(
        "bg", store=store, listeners=[dash], background=True, max_steps=100_000, **micro
    )
    dash.attach(run)
    assert not dash.checkpoint_button.disabled
    dash.checkpoint_button.click()
    dash.wait(timeout=60)
    assert "(checkpoint you requested)" in dash.controls_note.value  # next to the button
    dash.stop_button.click()
    run.wait(timeout=60)
    steps = run.steps()
    assert any("requested" in s.reasons for s in steps)  # Checkpoint now
    assert "stop" in steps[-1].reasons  # Stop
    assert steps[-1].step < 100_000 and run.status() == "stopped"
    assert dash.state == "stop" and dash.stop_button.disabled
    assert f"stopped at step {steps[-1].step}, saved" in dash.controls_note.value


def test_dashboard_attach_shows_history_before_the_session(store, micro):
    mmnb.train("hist", store=store, max_steps=40, stop_at=20, save_every=10, **micro)
    dash = Dashboard()
    run = mmnb.resume("hist", store=store, listeners=[dash])
    dash.attach(run)
    assert dash.history["step"] == list(range(1, 41))  # 1..20 from the store, 21..40 live
    assert [s for s, _ in dash.checkpoints][:3] == [0, 10, 20]
    assert dash.wait(timeout=60)
    assert list(dash.plot._artists["loss"][1].get_xdata()) == list(range(1, 41))
    assert bytes(dash.plot.widget.value).startswith(PNG)


def test_dashboard_draws_off_the_training_thread_and_wait_shows_the_final_step(store, micro):
    """The listener only folds events; the render thread draws. After the run and `wait()`,
    the PNG's blue loss curve reaches the saved step's x, and the line names that step."""
    dash = Dashboard(plot_interval=0, text_interval=0)  # as often as the budget allows
    drawers: set[int] = set()
    encode = dash.plot.png

    def png() -> bytes:
        drawers.add(threading.get_ident())
        return encode()

    dash.plot.png = png
    run = mmnb.train("drawn", store=store, listeners=[dash], max_steps=30, **micro)
    training = threading.get_ident()  # a blocking run calls its listeners in this thread
    assert dash.wait(timeout=60)
    assert drawers and training not in drawers  # every picture was made elsewhere
    assert dash._renderer.thread_ids and training not in dash._renderer.thread_ids
    saved = run.latest().step
    assert saved == 30 and f"saved step {saved}" in dash.label.value
    assert "finished at step 30" in dash.label.value
    # What a person sees: the PNG shown has the loss curve up to the saved step.
    ax = dash.plot.axes["loss"]
    assert dash.plot._artists["loss"][1].get_xdata()[-1] == saved
    assert ax.get_xlim()[0] <= saved <= ax.get_xlim()[1]
    rgb = np.asarray(Image.open(io.BytesIO(bytes(dash.plot.widget.value))).convert("RGB"))
    height = rgb.shape[0]
    (x0, _), (x1, _) = ax.transData.transform([(1, 0), (saved, 0)])
    box = ax.get_window_extent()  # the loss panel, in the PNG's pixels (y from the bottom)
    panel = rgb[int(height - box.y1) : int(height - box.y0), int(box.x0) : int(box.x1)]
    r, g, b = (panel[..., i].astype(int) for i in range(3))
    blue = np.flatnonzero(((r < 110) & (g > 80) & (g < 160) & (b > 150)).any(axis=0))
    assert abs(box.x0 + blue[-1] - x1) <= 4 and abs(box.x0 + blue[0] - x0) <= 4
    assert not dash._renderer.running  # drawn and ended: the render thread is gone
    dash.close()


# ---- interactive plots (ipympl) and their static fallback ----
def _feed(dash: Dashboard, steps: range) -> None:
    for step in steps:
        dash(Event("step", step, {"loss": 7 - step / 10, "lr": 1e-3, "tokens": 64 * step,
                                  "grad_norm": 1.0}))  # fmt: skip


def _frame(canvas) -> bytes:
    """The last frame ipympl's canvas sent (kept as a data URL until a front-end connects)."""
    assert canvas._data_url.startswith("data:image/png;base64,")
    return base64.b64decode(canvas._data_url.removeprefix("data:image/png;base64,"))


def test_interactive_frames_are_whole_pictures(monkeypatch):
    """ipympl's front-end drops a frame that has not loaded when the next arrives: mmnb pushes
    frames unasked, so each must be a whole picture, never a diff against a frame that may
    have been dropped (a short run then ended showing its empty first frame in Notebook 7)."""
    pytest.importorskip("ipympl", reason="ipympl is not installed (pip install mmnb[interactive])")
    dash = Dashboard(interactive=True, plot_interval=0, budget=1.0)
    canvas = dash.plot.widget
    canvas.syncing_data_url = False  # a front-end is there: frames go out as messages
    modes = []
    monkeypatch.setattr(canvas, "send", lambda *a, **k: modes.append(canvas._image_mode))
    dash(Event("start", 0, {"total": 40, "steps_per_epoch": 40}))
    for upto in (10, 20, 30):
        _feed(dash, range(upto - 9, upto + 1))
        assert dash.wait(timeout=60)
    canvas.draw()  # what a front-end's own request draws
    assert len(modes) >= 4 and set(modes) == {"full"}
    dash.close()


def test_interactive_dashboard_zooms_pans_and_reads_out_values():
    pytest.importorskip("ipympl", reason="ipympl is not installed (pip install mmnb[interactive])")
    from ipympl.backend_nbagg import Canvas

    dash = Dashboard(interactive=True, plot_interval=0, budget=1.0)
    canvas = dash.plot.widget
    assert isinstance(canvas, Canvas) and "mmnb-plot" in canvas._dom_classes
    assert canvas.toolbar is not None and not canvas.header_visible
    dash(Event("start", 0, {"total": 4080, "steps_per_epoch": 408}))
    _feed(dash, range(1, 30))
    assert dash.wait(timeout=60)
    frame = _frame(canvas)
    assert frame.startswith(PNG)  # the curves reached the canvas
    # ipympl scales by the device pixel ratio itself: the figure is at CSS resolution
    assert int.from_bytes(frame[16:20], "big") == dash.plot.css_size[0]
    ax = dash.plot.axes["loss"]
    x0, x1 = ax.get_xlim()
    assert (29 - 1) / (x1 - x0) >= 0.5  # axes follow the data here too
    # The user zooms the loss panel (a toolbar action sets limits and redraws): new data
    # keep that view; the other panels go on following the data.
    ax.set_xlim(5, 10)
    canvas.draw()
    _feed(dash, range(30, 80))
    assert dash.wait(timeout=60)
    assert ax.get_xlim() == (5, 10)
    assert dash.plot.axes["lr"].get_xlim()[1] >= 79
    # Hover: the footer reads out the step and the value under the pointer.
    middle = ax.transData.transform((7, 5.0))
    height = canvas.get_renderer().height
    canvas._handle_message(
        canvas,
        {"type": "motion_notify", "x": middle[0], "y": height - middle[1], "button": 0,
         "buttons": 0, "modifiers": [], "guiEvent": {}},
        [],
    )  # fmt: skip
    assert canvas._message.startswith("step 7 · loss 5")
    # Home: the panel follows the data again.
    canvas._handle_message(canvas, {"type": "toolbar_button", "name": "home"}, [])
    assert ax.get_xlim()[1] >= 79 and not dash.plot.user_view("loss")
    # The static fallback of a saved notebook is a 2x PNG with the curves.
    dash(Event("stop", 79, {"reason": "done"}))
    html = dash._repr_mimebundle_()["text/html"]
    png = base64.b64decode(html.split("base64,")[1].split("'")[0])
    assert int.from_bytes(png[16:20], "big") == 2 * dash.plot.css_size[0]
    dash.close()


def test_interactive_compare_and_the_forced_static_fallback(tree, monkeypatch):
    pytest.importorskip("ipympl", reason="ipympl is not installed (pip install mmnb[interactive])")
    from ipympl.backend_nbagg import Canvas

    b = Browser(tree, interactive=True)
    b.compare.select(["base", "base-b"])
    assert isinstance(b.compare.plot.widget, Canvas)
    assert _frame(b.compare.plot.widget).startswith(PNG)
    assert isinstance(b.plot.widget, widgets.Image)  # the slider's plot stays an image
    b.close()
    # Where ipympl cannot be shown (MMNB_PLOTS=static, no kernel, Colab, VS Code) or is not
    # installed, every plot is the crisp PNG.
    monkeypatch.setenv("MMNB_PLOTS", "static")
    assert isinstance(Dashboard().plot.widget, widgets.Image)
    monkeypatch.setenv("MMNB_PLOTS", "auto")
    assert not interactive.enabled()  # no kernel here: nothing could show a widget
    monkeypatch.setattr(interactive, "_kernel", lambda: True)
    assert interactive.enabled()  # a kernel and ipympl: JupyterLab, Notebook 7
    monkeypatch.setenv("VSCODE_PID", "1")
    assert not interactive.enabled()
    monkeypatch.delenv("VSCODE_PID")
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert not interactive.enabled()
    monkeypatch.delitem(sys.modules, "google.colab")
    monkeypatch.setattr(interactive, "available", lambda: False)  # ipympl not installed
    assert not interactive.enabled() and not interactive.enabled(True)
    dash = Dashboard()
    assert isinstance(dash.plot.widget, widgets.Image)
    for event in _events():
        dash(event)
    assert dash.wait(timeout=60)
    assert bytes(dash.plot.widget.value).startswith(PNG)
    monkeypatch.setenv("MMNB_PLOTS", "zoomy")
    with pytest.raises(ValueError, match="MMNB_PLOTS must be one of"):
        interactive.enabled()


# ---- browser ----
@pytest.fixture
def tree(store, micro):
    """base (WSD, 60 steps, a checkpoint every 20) with a branch at step 20."""
    mmnb.train("base", store=store, max_steps=60, save_every=20, **micro)
    mmnb.branch("base", 20, "base-b", store=store, lr=1e-3, max_steps=30, **{})
    return store


def test_browser_tree_slider_and_metadata(tree):
    b = mmnb.browse(tree)
    labels = [label for label, _ in b.runs.options]
    assert labels[0].startswith("base ·")
    assert labels[1].startswith("\u2514\u00a0base-b · from base@20")  # under its parent
    b.select("base")
    steps = [s.step for s in tree.run("base").steps()]
    assert b.checkpoint_steps == steps == [0, 20, 40, 48, 60]
    assert b.slider.value == steps[-1] and b.slider.continuous_update is False
    # the slider's value is the step: positions show step distance; End is the last checkpoint
    assert (b.slider.min, b.slider.max) == (0, 60)
    b.slider.value = 20
    b.slider.value = 21  # one step right of 20 (an arrow key): the next checkpoint
    assert b.slider.value == 40 and b.meta_text().startswith("base step 40 ")
    b.slider.value = 39  # one step left: the previous one
    assert b.slider.value == 20
    # Two quick arrow keys: the second (21 -> 22) leaves the browser before the first one's
    # snap to 40 reaches it; it means the checkpoint after 40, not a jump back to 20.
    b.slider.value = 21
    assert b.slider.value == 40
    b.slider.value = 22
    assert b.slider.value == 48 and b.meta_text().startswith("base step 48 ")
    b.slider.value = 47  # a later single key press left: the previous checkpoint
    assert b.slider.value == 40
    b.slider.value = 0  # Home: step 0 has a marker and values (the first batch's loss)
    assert "(first batch, initial weights)" in b.meta.value and "—" not in b.meta.value
    x, _ = b.plot._artists["ckpts"][1].get_data()
    assert x[0] == 0
    assert "start of the run" in b.meta.value  # reasons in words
    before = bytes(b.plot.widget.value)
    b.slider.value = 20
    assert "<th style='text-align:right;padding-right:.6em'>step</th><td>20</td>" in b.meta.value
    assert "base-b" in b.meta.value  # the branches from this step
    assert b.meta_text().startswith("base step 20 · epoch 0")
    assert bytes(b.plot.widget.value).startswith(PNG) and bytes(b.plot.widget.value) != before
    assert b.last_update_s is not None and b.last_update_s < 1.0
    assert b.actions.branch_button.description == "Branch from step 20"
    assert "base step 20" in b._repr_mimebundle_()["text/plain"]
    # Another run, another range: a new slider (the browser's keeps its first range for
    # Home and End), with the same behaviour.
    first = b.slider
    b.select("base-b")
    assert b.slider is not first and (b.slider.min, b.slider.max) == (0, 30)
    assert b.slider_box.children == (b.slider,) and b.slider.value == 30
    before = b.checkpoint_steps[-2]
    b.slider.value = 29  # one step left of 30: the previous checkpoint
    assert b.slider.value == before and b.meta_text().startswith(f"base-b step {before} ")
    b.close()


def test_browser_branch_from_here_with_overrides(tree):
    b = Browser(tree)
    b.select("base", 40)
    a = b.actions
    a.name.value = "sft"
    a.numbers["lr"].value = "2e-4"
    a.numbers["max_steps"].value = "50"
    a.data.value = "chat"
    a.branch_button.click()
    b.wait(timeout=120)
    assert "Traceback" not in _log_text(b), _log_text(b)
    sft = tree.run("sft")
    assert sft.parent == ("base", 40)
    cfg = sft.config_dict()["train"]
    assert cfg["lr"] == 2e-4 and cfg["data"] == "chat" and cfg["max_steps"] == 50
    assert sft.latest().step == 40 + 50 and sft.status() == "finished"  # new data: a new stage
    assert "sft" in b.catalog and b._selected == ("sft", 90)  # refreshed, showing the job
    assert "sft finished at step 90" in _log_text(b)
    # submitted: the form is blank again, showing what a branch inherits
    a = b.actions
    assert a.name.value == "" and a.numbers["lr"].value == "" and a.data.value == ""
    assert a.numbers["lr"].placeholder == "0.0002 (same)"  # sft's own lr (now selected)
    assert "training sft in the background" in a.notes["branch"].value


def test_browser_extend_wsd_run_past_decay_makes_new_run(store, micro):
    base = mmnb.train("w", store=store, **micro)
    per_epoch = base.latest().step
    b = Browser(store)
    b.select("w")
    b.actions.more_epochs.value = 1
    b.actions.extend_button.click()
    b.wait(timeout=120)
    assert "Traceback" not in _log_text(b), _log_text(b)
    ext = store.run("w-2ep")
    decay_start = max(s.step for s in base.steps() if "decay_start" in s.reasons)
    assert ext.parent == ("w", decay_start)
    assert ext.latest().step == 2 * per_epoch  # trained exactly the second epoch's steps
    assert len(ext.metrics()["loss"]) == 2 * per_epoch
    assert ext.status() == "finished"


def test_browser_resume_from_selected_step(store, micro):
    mmnb.train("r", store=store, max_steps=30, stop_at=10, **micro)
    b = Browser(store)
    b.select("r", 10)
    b.actions.resume_button.click()
    b.wait(timeout=120)
    assert store.run("r").latest().step == 30
    assert b._selected == ("r", 30)


def test_browser_delete_asks_and_refuses_branch_points(tree):
    b = Browser(tree)
    b.select("base", 20)
    b.actions.delete_button.click()
    # the refusal is said next to the Delete button, not in a log far below
    assert "branch point of base-b; not deleted" in b.actions.notes["delete"].value
    assert _log_text(b) == ""
    assert b.actions.confirm_button.layout.display == "none"  # nothing to confirm
    b.select("base", 40)
    b.actions.delete_button.click()
    assert b.actions.confirm_button.layout.display == ""  # a second click is needed
    assert 40 in [s.step for s in tree.run("base").steps()]
    b.actions.confirm_button.click()
    assert 40 not in [s.step for s in tree.run("base").steps()]
    assert 40 not in b.checkpoint_steps
    assert "deleted step 40 of base" in b.actions.notes["delete"].value
    b.select("base-b", 20)  # inherited: it belongs to base
    b.actions.delete_button.click()
    assert "belongs to base" in b.actions.notes["delete"].value


def test_browser_sample_and_model_cache(tree):
    b = Browser(tree)
    b.select("base", 20)
    b.sampler.tokens.value = 8
    b.sampler.button.click()
    assert b.sampler.sampled == ("base", 20) and b.sampler.sample is not None
    assert "base step 20" in b.sampler.output.value
    b.select("base-b", 20)  # the same checkpoint file, through the branch
    b.sampler.button.click()
    assert b.sampler.models.loads == 1
    b.sampler.auto.value = True
    b.slider.value = b.checkpoint_steps[-1]  # generates when the slider settles
    assert b.sampler.sampled == ("base-b", b.slider.value) and b.sampler.models.loads == 2


def test_browser_compare_aligns_branches(tree):
    b = Browser(tree)
    b.compare.select(["base", "base-b"])
    assert bytes(b.compare.plot.widget.value).startswith(PNG)
    keys = b.compare.plot.keys()
    assert {"base", "base-b", "base-b/branch"} <= set(keys)
    x, _ = b.compare.plot._artists["base-b"][1].get_data()
    assert x[0] == 20 and x[-1] == 30  # only the branch's own part, from its branch point


def test_callback_errors_land_in_the_output(tree, monkeypatch):
    b = Browser(tree)
    b.actions.numbers["lr"].value = "fast"
    b.actions.branch_button.click()
    assert "branch: lr: &#x27;fast&#x27; is not a number" in b.actions.notes["branch"].value

    def broken(*args, **kwargs):
        raise RuntimeError("weights on fire")

    monkeypatch.setattr("mmnb.widgets.sampler.generate", broken)
    b.sampler.button.click()
    text = _log_text(b)
    assert "Traceback" in text and "RuntimeError: weights on fire" in text


def test_background_failure_of_an_action_is_shown(tree, monkeypatch):
    def explode(self):
        raise RuntimeError("step exploded")

    monkeypatch.setattr(Trainer, "_train_step", explode)
    b = Browser(tree)
    b.select("base", 20)
    b.actions.branch_button.click()
    b.wait(timeout=60)
    assert "RuntimeError: step exploded" in _log_text(b)


def test_labels_are_never_cut_off_and_the_form_shows_inherited_values(tree):
    b = Browser(tree)
    b.select("base", 20)
    a = b.actions
    for button in (a.branch_button, a.extend_button, a.resume_button, a.delete_button,
                   a.confirm_button, b.sampler.button, b.refresh_button):  # fmt: skip
        assert button.layout.width == "auto", button.description
    assert b.sampler.temperature.style.description_width == "initial"
    assert a.numbers["lr"].placeholder == "0.002 (same)"  # the parent's lr
    assert a.schedule.options[0][0] == "wsd (same)"
    assert a.data.placeholder.endswith("(same)")
    a.delete_button.click()  # a branch point: refused
    b.select("base", 40)
    a.delete_button.click()
    assert a.confirm_button.description == "Confirm delete step 40"
    b.log.error(ValueError("x"))
    assert b.log.view.layout.display == ""
    b.log.clear_button.click()  # the log can be cleared (and hides when empty)
    assert _log_text(b) == "" and b.log.view.layout.display == "none"


def test_compare_has_log_scale_and_a_step_range(tree):
    b = Browser(tree)
    b.compare.select(["base", "base-b"])
    ax = b.compare.plot.axes["loss"]
    assert ax.get_yscale() == "log"  # default: where runs differ, curves stay apart
    assert b.compare.steps.max == 60  # the longest chosen run (base) ends at step 60
    b.compare.steps.value = (20, 50)
    assert ax.get_xlim()[0] == 20
    b.compare.log_scale.value = False
    assert ax.get_yscale() == "linear"
    assert ax.get_legend() is not None


def test_parse_number_names_the_field():
    assert parse_number("lr", " 1e-3 ", float) == 1e-3
    assert parse_number("max_steps", "2_000", int) == 2000
    assert parse_number("epochs", "", int) is None
    with pytest.raises(ValueError, match="epochs: '1.5' is not an integer"):
        parse_number("epochs", "1.5", int)


def test_browser_of_empty_store_and_fresh_process(store, micro):
    b = Browser(store)
    assert "no runs" in b.meta.value and b.slider.disabled
    mmnb.train("fresh", store=store, max_steps=10, save_every=5, **micro)
    b.refresh()
    assert b._selected == ("fresh", 10)
    # A fresh process (a restarted kernel) needs nothing but the store.
    code = (
        "import mmnb, sys; b = mmnb.browse(sys.argv[1]); b.slider.value = 5; print(b.meta_text())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(store.path)], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("fresh step 5 · epoch 0")


def test_import_mmnb_stays_free_of_notebook_packages():
    code = (
        "import sys, mmnb; bad = [m for m in ('ipywidgets', 'IPython', 'matplotlib') "
        "if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
