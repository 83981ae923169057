"""What the history browser can do from the selected checkpoint: branch, extend, resume, delete.

Training actions call the engine API with `background=True`, so the kernel stays free; each
gets its own `Dashboard` (Stop / Checkpoint-now work on it) and the browser refreshes when it
ends. Delete asks for a second click and is refused for a branch point (the engine refuses it
too; asking first saves a confusing confirm).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets as w

from .. import api
from ..config import SCHEDULES
from ..store import Run, StepInfo, StoreError
from .catalog import Catalog, RunEntry
from .dashboard import Dashboard
from .log import Log

Selection = Callable[[], tuple[RunEntry, StepInfo] | None]
OnJob = Callable[[str, Run, Dashboard], None]  # a training action started
SAME = "(same)"

# Branch overrides typed as text: empty keeps the parent's value.
NUMBER_FIELDS: dict[str, type] = {
    "lr": float,
    "epochs": int,
    "max_steps": int,
    "batch_size": int,
    "save_every": int,
}


def parse_number(field: str, text: str, kind: type) -> int | float | None:
    """A form field's number (`1e-3`, `2_000`); None when empty; ValueError naming the field."""
    text = text.strip().replace("_", "")
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{field}: {text!r} is not a number") from None
    if kind is int:
        if not value.is_integer():
            raise ValueError(f"{field}: {text!r} is not an integer")
        return int(value)
    return value


class Actions:
    """The Branch, Extend / resume and Delete tabs."""

    def __init__(
        self,
        catalog: Catalog,
        log: Log,
        selection: Selection,
        on_job: OnJob,
        on_change: Callable[[], None],
    ) -> None:
        self.catalog, self.log, self.selection = catalog, log, selection
        self.on_job, self.on_change = on_job, on_change  # on_change: the store changed
        guard = log.guard
        # ---- branch ----
        self.name = w.Text(description="name", placeholder="auto: <run>-b-001")
        self.numbers = {
            field: w.Text(description=field.replace("_", " "), placeholder=SAME)
            for field in NUMBER_FIELDS
        }
        self.schedule = w.Dropdown(options=[SAME, *SCHEDULES], value=SAME, description="schedule")
        self.data = w.Combobox(
            description="data",
            placeholder="(same data)",
            options=["chat"],
            ensure_option=False,
        )
        self.branch_button = w.Button(description="Branch from here", icon="code-branch")
        self.branch_button.on_click(guard(lambda _: self.branch(), "branch"))
        # ---- extend / resume ----
        self.more_epochs = w.BoundedIntText(value=1, min=1, max=1000, description="+ epochs")
        self.extend_button = w.Button(description="Extend", icon="forward")
        self.resume_button = w.Button(description="Resume", icon="play")
        self.extend_button.on_click(guard(lambda _: self.extend(), "extend"))
        self.resume_button.on_click(guard(lambda _: self.resume(), "resume"))
        # ---- delete ----
        self.delete_button = w.Button(description="Delete", icon="trash")
        self.confirm_button = w.Button(
            description="Confirm delete", button_style="danger", layout=w.Layout(display="none")
        )
        self.cancel_button = w.Button(description="Cancel", layout=w.Layout(display="none"))
        self.delete_button.on_click(guard(lambda _: self.ask_delete(), "delete"))
        self.confirm_button.on_click(guard(lambda _: self.delete(), "delete"))
        self.cancel_button.on_click(guard(lambda _: self._confirming(None), "delete"))
        self._pending: tuple[str, int] | None = None  # (run, step) awaiting confirmation

        fields = list(self.numbers.values())
        self.branch_view = w.VBox(
            [
                w.HBox([self.name, self.data]),
                w.HBox(fields[:2]),
                w.HBox(fields[2:4]),
                w.HBox([fields[4], self.schedule]),
                self.branch_button,
            ]
        )
        self.extend_view = w.VBox(
            [
                w.HBox([self.more_epochs, self.extend_button]),
                w.HTML(
                    "<small>Extend plans more epochs for the run (a WSD run past its decay "
                    "start continues from there as a new run <code>&lt;run&gt;-&lt;E&gt;ep"
                    "</code>). Resume continues the run from the selected checkpoint.</small>"
                ),
                self.resume_button,
            ]
        )
        self.delete_view = w.HBox([self.delete_button, self.confirm_button, self.cancel_button])
        self.views = [self.branch_view, self.extend_view, self.delete_view]

    def selected(self, entry: RunEntry, info: StepInfo) -> None:
        """The slider settled: name the step on the buttons, drop a pending confirmation."""
        self.branch_button.description = f"Branch from step {info.step}"
        self.extend_button.description = f"Extend {entry.name}"
        self.resume_button.description = f"Resume from step {info.step}"
        self.delete_button.description = f"Delete step {info.step}"
        if self._pending != (entry.name, info.step):
            self._confirming(None)

    def _chosen(self) -> tuple[RunEntry, StepInfo]:
        chosen = self.selection()
        if chosen is None:
            raise ValueError("choose a run and a checkpoint first")
        return chosen

    def _start(self, label: str, start: Callable[[Dashboard], Run]) -> Run:
        dash = Dashboard()
        try:
            run = start(dash)  # what fails on user input fails here, before training starts
        except Exception:
            dash.close()
            raise
        dash.attach(run)
        self.log.message(f"{label}: training {run.name} in the background")
        self.on_job(label, run, dash)
        return run

    # ---- training actions ----
    def overrides(self) -> dict[str, Any]:
        """The branch options the form holds (empty fields keep the parent's values)."""
        options: dict[str, Any] = {}
        for field, kind in NUMBER_FIELDS.items():
            value = parse_number(field, self.numbers[field].value, kind)
            if value is not None:
                options[field] = value
        if self.schedule.value != SAME:
            options["schedule"] = self.schedule.value
        if self.data.value.strip():
            options["data"] = self.data.value.strip()
        return options

    def branch(self) -> Run:
        entry, info = self._chosen()
        options = self.overrides()
        name = self.name.value.strip() or None
        store = self.catalog.store
        return self._start(
            f"branch from {entry.name}@{info.step}",
            lambda dash: api.branch(
                entry.name,
                info.step,
                name,
                store=store,
                listeners=[dash],
                background=True,
                **options,
            ),
        )

    def extend(self) -> Run:
        entry, _ = self._chosen()
        more = int(self.more_epochs.value)
        store = self.catalog.store
        return self._start(
            f"extend {entry.name} by {more} epoch{'s' * (more != 1)}",
            lambda dash: api.resume(
                entry.name, store=store, more_epochs=more, listeners=[dash], background=True
            ),
        )

    def resume(self) -> Run:
        entry, info = self._chosen()
        if entry.status == "finished" and info.step == entry.steps[-1].step:
            raise ValueError(
                f"{entry.name} finished its plan at step {info.step}; Extend it, or branch"
            )
        store = self.catalog.store
        return self._start(
            f"resume {entry.name} from step {info.step}",
            lambda dash: api.resume(
                entry.name, store=store, step=info.step, listeners=[dash], background=True
            ),
        )

    # ---- delete, in two clicks ----
    def ask_delete(self) -> None:
        entry, info = self._chosen()
        self._check_deletable(entry, info)
        self._confirming((entry.name, info.step))
        self.log.message(f"delete step {info.step} of {entry.name}? Click Confirm delete.")

    def delete(self) -> None:
        if self._pending is None:
            raise ValueError("nothing to delete: click Delete first")
        name, step = self._pending
        self._confirming(None)
        entry = self.catalog[name]
        self._check_deletable(entry, entry.by_step[step])
        run = entry.run
        run.open_writer()  # refused while the run trains
        try:
            run.delete(step)
        finally:
            run.close_writer()
        self.log.message(f"deleted step {step} of {name}")
        self.on_change()

    def _check_deletable(self, entry: RunEntry, info: StepInfo) -> None:
        kids = [c.name for c in self.catalog.children(entry.name) if c.parent[1] == info.step]  # type: ignore[index]
        if kids:
            raise StoreError(
                f"step {info.step} of {entry.name} is a branch point of {', '.join(kids)}; "
                "not deleted"
            )
        if info.inherited:
            raise StoreError(
                f"step {info.step} belongs to {info.run}, not to {entry.name}; delete it there"
            )

    def _confirming(self, pending: tuple[str, int] | None) -> None:
        self._pending = pending
        shown = "" if pending else "none"
        self.confirm_button.layout.display = self.cancel_button.layout.display = shown
        if pending:
            self.confirm_button.description = f"Confirm delete step {pending[1]}"
