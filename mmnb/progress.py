"""Console rendering of trainer events: a tqdm bar with loss and tokens/s.

The trainer only emits events; this listener turns them into a bar on a terminal. It keeps no
reference to the trainer, so it cannot change what is trained.
"""

from __future__ import annotations

import sys
import time
from typing import IO, TYPE_CHECKING, Any

from tqdm import tqdm

if TYPE_CHECKING:
    from .train import Event


def metric_parts(loss: float | None, lr: float | None, tokens_per_s: float | None) -> list[str]:
    """The metrics of a progress line, formatted the same by every renderer."""
    parts = []
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if lr is not None:
        parts.append(f"lr {lr:.2e}")
    if tokens_per_s is not None:
        parts.append(f"{tokens_per_s:,.0f} tok/s")
    return parts


def prepare_text(info: dict[str, Any]) -> str:
    """One line on data preparation (a `prepare` event), the same for every renderer."""
    parts = ["training a tokenizer" if info["stage"] == "tokenizer" else "preparing data"]
    total, done, seconds = info["total"], info["bytes"], info["seconds"]
    if total:
        parts.append(f"{100 * done / total:.0f}% of {total / 2**20:,.0f} MiB")
    if seconds > 0:
        parts.append(f"{done / 2**20 / seconds:,.1f} MiB/s")
        if info["tokens"]:
            parts.append(f"{info['tokens'] / seconds:,.0f} tok/s")
        if total and done:
            parts.append(f"ETA {max(total - done, 0) * seconds / done:,.0f}s")
    return " · ".join(parts)


class ConsoleProgress:
    """A listener: `mmnb.train(..., listeners=[ConsoleProgress()])`."""

    def __init__(
        self, file: IO[str] | None = None, mininterval: float = 0.2, prepare_delay: float = 0.5
    ) -> None:
        self.file = file or sys.stderr
        self.mininterval = mininterval
        # Data preparation is shown only once it lasts this long: small data sets print nothing,
        # so a mistake in the data still gives one line.
        self.prepare_delay = prepare_delay
        self.bar: Any = None
        self._mark: tuple[float, int] | None = None  # (time, tokens) at the last update
        self.messages: list[str] = []

    def __call__(self, event: Event) -> None:
        info = event.info
        if event.kind == "prepare":
            desc = "training a tokenizer" if info["stage"] == "tokenizer" else "preparing data"
            if self.bar is not None and self.bar.desc != desc:
                self.close()
            if self.bar is None:
                self.bar = tqdm(
                    total=info["total"],
                    file=self.file,
                    mininterval=self.mininterval,
                    delay=self.prepare_delay,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=desc,
                    dynamic_ncols=True,
                )
            if info["tokens"] and info["seconds"] > 0:
                rate = info["tokens"] / info["seconds"]
                self.bar.set_postfix({"tok/s": f"{rate:,.0f}"}, refresh=False)
            self.bar.update(info["bytes"] - self.bar.n)
        elif event.kind == "start":
            self.close()
            self.bar = tqdm(
                total=info["total"],
                initial=event.step,
                file=self.file,
                mininterval=self.mininterval,
                unit="step",
                dynamic_ncols=True,
            )
            self._mark = None
        elif event.kind == "step" and self.bar is not None:
            now = time.perf_counter()
            postfix = {"loss": f"{info['loss']:.4f}", "lr": f"{info['lr']:.2e}"}
            if self._mark is not None and now > self._mark[0]:
                postfix["tok/s"] = (
                    f"{(info['tokens'] - self._mark[1]) / (now - self._mark[0]):,.0f}"
                )
            self._mark = (now, info["tokens"])
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(event.step - self.bar.n)
        elif event.kind == "notice":
            self.write(f"note: {info['text']}")
        elif event.kind == "checkpoint" and info.get("saved") is not None:
            reasons = set(info["reasons"])
            if reasons & {"interrupt", "time_budget", "stop_at", "requested", "stop", "end"}:
                saved = info["saved"]
                self.write(f"checkpoint: step {saved.step} ({', '.join(saved.reasons)})")
        elif event.kind == "stop":
            self.close()

    def write(self, text: str) -> None:
        self.messages.append(text)
        if self.bar is not None:
            self.bar.write(text, file=self.file)
        else:
            self.file.write(text + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
