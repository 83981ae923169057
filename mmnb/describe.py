"""Human words for what the engine records with short codes: why a checkpoint was taken, why a
session stopped, and a colour that means something. Every front-end (dashboard, browser,
magics, CLI) says it the same way; the store keeps the codes.
"""

from __future__ import annotations

from typing import Any

# Why a checkpoint exists (StepInfo.reasons, the `reasons` of a checkpoint event).
_REASONS = {
    "start": "start of the run",
    "epoch": "end of an epoch",
    "decay_start": "start of decay",
    "every": "regular save (--save-every)",
    "end": "end of the plan",
    "stop_at": "the stop you asked for (--stop-at)",
    "time_budget": "end of the time budget",
    "requested": "checkpoint you requested",
    "stop": "you pressed Stop",
    "interrupt": "interrupted (Ctrl-C / Kernel → Interrupt)",
}

# States of a training session: the last stop reason, or one of these.
COLOURS = {
    "waiting": "#6c757d",  # grey
    "training": "#1f77b4",  # blue
    "done": "#2e7d32",  # green: finished its plan
    "stop_at": "#1565c0",  # blue: stopped as asked
    "time_budget": "#1565c0",
    "stop": "#1565c0",
    "interrupt": "#ef6c00",  # orange: interrupted
    "failed": "#c62828",  # red
    "anomaly": "#c62828",
}
# ipywidgets' bar styles for the same meaning.
BAR_STYLES = {"done": "success", "interrupt": "warning", "failed": "danger", "anomaly": "danger"}


def reason_text(reason: str) -> str:
    return _REASONS.get(reason, reason.replace("_", " "))


def reasons_text(reasons: list[str], tags: list[str] = ()) -> str:
    words = [reason_text(r) for r in reasons] + [f"#{t}" for t in tags]
    return ", ".join(words)


def state_text(state: str, step: int, info: dict[str, Any] | None = None) -> str:
    """`stop_at` at step 39 → 'stopped at step 39 as asked'."""
    info = info or {}
    return {
        "waiting": "waiting for training to start",
        "starting": "starting",
        "training": "training",
        "done": f"finished at step {step}",
        "stop_at": f"stopped at step {step} as asked",
        "time_budget": f"stopped at step {step}: time budget used",
        "stop": f"stopped at step {step} (Stop)",
        "requested": f"stopped at step {step} (Stop)",
        "interrupt": f"interrupted: step {step} is saved",
        "failed": f"failed after step {step}" + (f": {info['error']}" if info.get("error") else ""),
        "anomaly": f"stopped after step {step}"
        + (f": {info['error']}" if info.get("error") else ": a non-finite loss or gradient"),
    }.get(state, state.replace("_", " "))


def colour(state: str) -> str:
    return COLOURS.get(state, COLOURS["stop"])


def run_line(run: Any) -> str:
    """One line about a run handle: name, step (of the plan when it is loaded), status, loss,
    folder — what a notebook shows for `run` instead of `<mmnb.Run …>`."""
    try:
        latest = run.latest()
        status = run.status()
    except Exception as err:  # a repr must not raise: say what is wrong instead
        return f"mmnb run {run.name!r} at {run.path} (unreadable: {err})"
    parts = [f"mmnb run {run.name!r}"]
    trainer = getattr(run, "trainer", None)
    total = getattr(getattr(trainer, "plan", None), "end", None)
    if latest is None:
        parts.append("no checkpoint")
    else:
        parts.append(f"step {latest.step}" + (f"/{total}" if total else ""))
    parts.append(status)
    if latest is not None and latest.loss is not None:
        parts.append(f"loss {latest.loss:.4f}")
    parts.append(str(run.path))
    return " · ".join(parts)
