"""What the history browser can do from the selected checkpoint: branch, extend, resume, delete.

Training actions call the engine API with `background=True`, so the kernel stays free; each
gets its own `Dashboard` (Stop / Checkpoint-now work on it) and the browser refreshes when it
ends. Delete asks for a second click and is refused for a branch point (the engine refuses it
too; asking first saves a confusing confirm).
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import ipywidgets as w

from .. import api
from ..cli import user_message
from ..config import SCHEDULES
from ..store import Run, StepInfo, StoreError
from .catalog import Catalog, RunEntry
from .dashboard import Dashboard
from .log import Log

Selection = Callable[[], tuple[RunEntry, StepInfo] | None]
OnJob = Callable[[str, Run, Dashboard], None]  # a training action started
SAME = "(same)"
LABEL = {"description_width": "initial"}  # labels are never cut off


def _row() -> w.Layout:
    return w.Layout(align_items="center", flex_flow="row wrap")


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
        # What each tab's controls did (or why they refused) is said next to them.
        self.notes = {tab: w.HTML() for tab in ("branch", "extend", "delete")}
        for tab, note in self.notes.items():
            note.add_class(f"mmnb-note-{tab}")
        guard = self._guard
        # ---- branch ----
        self.name = w.Text(description="name", placeholder="auto: <run>-b-001", style=LABEL)
        self.numbers = {
            field: w.Text(description=field.replace("_", " "), placeholder=SAME, style=LABEL)
            for field in NUMBER_FIELDS
        }
        self.schedule = w.Dropdown(
            options=[(SAME, SAME), *((s, s) for s in SCHEDULES)],
            value=SAME,
            description="schedule",
            style=LABEL,
        )
        self.data = w.Combobox(
            description="data",
            placeholder="(same data)",
            options=["chat"],
            ensure_option=False,
            style=LABEL,
        )
        self.branch_button = w.Button(description="Branch from here", icon="code-branch")
        self.branch_button.on_click(guard(lambda _: self.branch(), "branch"))
        # ---- extend / resume ----
        self.more_epochs = w.BoundedIntText(
            value=1, min=1, max=1000, description="+ epochs", style=LABEL
        )
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
        for button in (self.branch_button, self.extend_button, self.resume_button,
                       self.delete_button, self.confirm_button, self.cancel_button):  # fmt: skip
            button.layout.width = "auto"  # the label decides the width: never cut off

        fields = list(self.numbers.values())
        self.branch_view = w.VBox(
            [
                w.HBox([self.name, self.data]),
                w.HBox(fields[:2]),
                w.HBox(fields[2:4]),
                w.HBox([fields[4], self.schedule]),
                w.HBox([self.branch_button, self.notes["branch"]], layout=_row()),
            ]
        )
        self.extend_view = w.VBox(
            [
                w.HBox([self.more_epochs, self.extend_button], layout=_row()),
                w.HTML(
                    "<small>Extend plans more epochs for the run (a WSD run past its decay "
                    "start continues from there as a new run <code>&lt;run&gt;-&lt;E&gt;ep"
                    "</code>). Resume continues the run from the selected checkpoint.</small>"
                ),
                w.HBox([self.resume_button, self.notes["extend"]], layout=_row()),
            ]
        )
        self.delete_view = w.HBox(
            [self.delete_button, self.confirm_button, self.cancel_button, self.notes["delete"]],
            layout=_row(),
        )
        self.views = [self.branch_view, self.extend_view, self.delete_view]

    def selected(self, entry: RunEntry, info: StepInfo) -> None:
        """The slider settled: name the step on the buttons, drop a pending confirmation."""
        self.branch_button.description = f"Branch from step {info.step}"
        self.extend_button.description = f"Extend {entry.name}"
        self.resume_button.description = f"Resume from step {info.step}"
        self.delete_button.description = f"Delete step {info.step}"
        if self._pending != (entry.name, info.step):
            self._confirming(None)
        # The form shows what a branch inherits: an empty field keeps the parent's value.
        cfg = entry.train_config
        self.name.placeholder = f"auto: {entry.name}-b-NNN"
        for field, box in self.numbers.items():
            value = cfg.get(field)
            box.placeholder = SAME if value is None else f"{value:g} (same)"
        schedule = cfg.get("schedule")
        self.schedule.options = [
            (f"{schedule} (same)" if schedule else SAME, SAME),
            *((s, s) for s in SCHEDULES if s != schedule),
        ]
        data = cfg.get("data")
        self.data.placeholder = f"{data or 'bundled corpus'} (same)"

    def say(self, tab: str, text: str, error: bool = False) -> None:
        """A message next to `tab`'s controls (replacing the previous one)."""
        style = "color:#c62828" if error else "color:inherit"
        self.notes[tab].value = f"<span style='{style}'>{html.escape(text)}</span>"

    def _guard(self, fn: Callable[[Any], Any], tab: str) -> Callable[[Any], Any]:
        """A click handler whose refusal is said next to its button; a bug's traceback goes
        to the log as well."""

        def guarded(arg: Any) -> Any:
            try:
                return fn(arg)
            except (ValueError, StoreError) as err:
                self.say(tab, f"{tab}: {user_message(err)}", error=True)
            except Exception as err:  # shown with its traceback; KeyboardInterrupt propagates
                self.say(tab, f"{tab} failed: {err} (details below)", error=True)
                self.log.error(err, tab)
            return None

        return guarded

    def _chosen(self) -> tuple[RunEntry, StepInfo]:
        chosen = self.selection()
        if chosen is None:
            raise ValueError("choose a run and a checkpoint first")
        return chosen

    def _start(self, tab: str, label: str, start: Callable[[Dashboard], Run]) -> Run:
        dash = Dashboard()
        try:
            run = start(dash)  # what fails on user input fails here, before training starts
        except Exception:
            dash.close()
            raise
        dash.attach(run)
        self.say(tab, f"{label}: training {run.name} in the background (its dashboard is below)")
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
        run = self._start(
            "branch",
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
        # Submitted: the form is blank again (each field shows the value a branch inherits).
        self.name.value = self.data.value = ""
        for box in self.numbers.values():
            box.value = ""
        self.schedule.value = SAME
        return run

    def extend(self) -> Run:
        entry, _ = self._chosen()
        more = int(self.more_epochs.value)
        store = self.catalog.store
        return self._start(
            "extend",
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
            "extend",
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
        self.say("delete", f"delete step {info.step} of {entry.name}? Click Confirm to delete it.")

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
        self.say("delete", f"deleted step {step} of {name}")
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
