"""Notebook rendering of trainer events: one display, updated in place, throttled.

`NotebookProgress` is a listener like `progress.ConsoleProgress`. It keeps a `Snapshot` of the
training (step, loss, tokens/s, state) and, when `show` is true, draws it into ONE output of
the cell (`display(..., display_id=True)`, then `handle.update(...)` at most every
`min_interval` seconds), as HTML with a text/plain fallback for text-only front-ends.

With `show=False` (background training) it only replaces its snapshot: output sent from a
thread lands in whichever cell runs at that moment (and is routed differently by ipykernel 6
and 7), so the training thread never draws; `%train --status` and `%runs` read the snapshot
from the main thread. The listener keeps no reference to the trainer and cannot change what
is trained.
"""

from __future__ import annotations

import dataclasses
import html
import time
from dataclasses import dataclass
from typing import Any

from IPython.display import display

from .describe import state_text
from .progress import metric_parts, prepare_text
from .store import StepInfo
from .train import Event


@dataclass(frozen=True)
class Snapshot:
    """The state of one training session as the last event left it (replaced, never mutated,
    so a reader in another thread sees one consistent snapshot)."""

    run: str | None = None
    state: str = "starting"  # starting | training | a stop reason (done, requested, interrupt…)
    step: int = 0
    total: int = 0
    epoch: int = 0
    loss: float | None = None
    lr: float | None = None
    tokens: int = 0
    tokens_per_s: float | None = None
    saved: StepInfo | None = None  # the newest checkpoint of this session

    def text(self) -> str:
        parts = [f"run {self.run}" if self.run else "run"]
        if self.total:
            parts.append(f"step {self.step}/{self.total} ({100 * self.step / self.total:.0f}%)")
        else:
            parts.append(f"step {self.step}")
        parts.append(f"epoch {self.epoch}")
        parts += metric_parts(self.loss, self.lr, self.tokens_per_s)
        if self.saved is not None:
            parts.append(f"saved step {self.saved.step}")
        parts.append(state_text(self.state, self.step))  # "stopped at step 39 as asked"
        return " · ".join(parts)


class NotebookProgress:
    """A listener: `mmnb.train(..., listeners=[NotebookProgress()])` in a notebook cell."""

    def __init__(
        self, show: bool = True, min_interval: float = 0.25, run: str | None = None
    ) -> None:
        self.show = show
        self.min_interval = min_interval
        self.snapshot = Snapshot(run=run)  # a checkpoint event names the run if `run` is None
        self.notices: list[str] = []
        self.interrupted: StepInfo | None = None  # the checkpoint an interrupt committed
        self.handle: Any = None  # the DisplayHandle of the one output
        self._pending = False  # the snapshot changed since the last draw
        self._last_draw = float("-inf")
        self._rate_mark: tuple[float, int] | None = None  # (time, tokens) at the first step

    def __call__(self, event: Event) -> None:
        snap, info = self.snapshot, event.info
        if event.kind == "prepare":
            snap = dataclasses.replace(snap, state=prepare_text(info))
        elif event.kind == "start":
            snap = dataclasses.replace(
                snap,
                state="training",
                step=event.step,
                total=info["total"],
                epoch=info.get("epoch", snap.epoch),  # where a resumed session starts
            )
            self._rate_mark = None
        elif event.kind == "step":
            now = time.perf_counter()
            rate = snap.tokens_per_s
            if self._rate_mark is None:
                self._rate_mark = (now, info["tokens"])
            elif now > self._rate_mark[0]:
                rate = (info["tokens"] - self._rate_mark[1]) / (now - self._rate_mark[0])
            snap = dataclasses.replace(
                snap,
                step=event.step,
                loss=info["loss"],
                lr=info["lr"],
                tokens=info["tokens"],
                tokens_per_s=rate,
            )
        elif event.kind == "epoch":
            snap = dataclasses.replace(snap, epoch=info["epoch"])
        elif event.kind == "checkpoint" and info.get("saved") is not None:
            saved = info["saved"]
            snap = dataclasses.replace(snap, run=saved.run, saved=saved, step=saved.step)
            if "interrupt" in info["reasons"]:
                self.interrupted = saved
        elif event.kind == "notice":
            self.notices.append(info["text"])
        elif event.kind == "stop":
            snap = dataclasses.replace(snap, state=info["reason"])
        self.snapshot = snap
        self._pending = True
        if self.show:
            self._draw(force=event.kind in ("start", "stop", "notice"))

    def _draw(self, force: bool) -> None:
        now = time.perf_counter()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._last_draw, self._pending = now, False
        if self.handle is None:
            self.handle = display(self, display_id=True)
        else:
            self.handle.update(self)

    def close(self) -> None:
        """Draw the final state if a throttled update is pending (a no-op in the background)."""
        if self.show and self.handle is not None and self._pending:
            self._draw(force=True)

    # ---- rendering ----
    def text(self) -> str:
        lines = [self.snapshot.text()]
        lines += [f"note: {n}" for n in self.notices]
        return "\n".join(lines)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        snap = self.snapshot
        bar = f'<progress value="{snap.step}" max="{max(snap.total, 1)}" style="width:14em">'
        notes = "".join(f"<div>note: {html.escape(n)}</div>" for n in self.notices)
        body = f"<div>{bar}</progress> <code>{html.escape(snap.text())}</code>{notes}</div>"
        return {"text/plain": self.text(), "text/html": body}
