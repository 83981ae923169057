"""Text samples from a checkpoint: an editable prompt, weights loaded lazily, an LRU of models.

Generation runs when Generate is clicked, or when the step slider settles if "on slider" is
checked (off by default: a sample of a larger model takes seconds, and a slider that waits for
one feels broken). Greedy decoding by default, so a sample is a property of the checkpoint.
"""

from __future__ import annotations

import html
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipywidgets as w

from ..api import generate, load_model
from ..store import StepInfo
from .catalog import RunEntry
from .log import Log

Selection = Callable[[], tuple[RunEntry, StepInfo] | None]


class ModelCache:
    """The last `size` models loaded, keyed by checkpoint file, so a branch and its parent
    share the models of their common steps."""

    def __init__(self, size: int = 3) -> None:
        self.size = size
        self._models: OrderedDict[Path, tuple[Any, Any]] = OrderedDict()
        self.loads = 0

    def get(self, entry: RunEntry, info: StepInfo) -> tuple[Any, Any]:
        key = (entry.run.path / info.file).resolve()
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        model = load_model(entry.run, info.step)  # reads the weights only
        self.loads += 1
        self._models[key] = model
        while len(self._models) > self.size:
            self._models.popitem(last=False)
        return model

    def clear(self) -> None:
        self._models.clear()


class Sampler:
    """The Sample tab of the browser."""

    def __init__(self, log: Log, selection: Selection, cache_size: int = 3) -> None:
        self.log, self.selection = log, selection
        self.models = ModelCache(cache_size)
        label = {"description_width": "initial"}  # labels are never cut off
        self.prompt = w.Text(
            value="Once upon a time",
            description="prompt",
            continuous_update=False,
            style=label,
            layout=w.Layout(width="30em"),
        )
        self.tokens = w.BoundedIntText(value=48, min=1, max=2048, description="tokens", style=label)
        self.temperature = w.BoundedFloatText(
            value=0.0, min=0.0, max=2.0, step=0.1, description="temperature", style=label
        )
        self.chat = w.Checkbox(value=False, description="chat template", indent=False)
        self.auto = w.Checkbox(value=False, description="on slider", indent=False)
        self.button = w.Button(description="Generate", icon="play", layout=w.Layout(width="auto"))
        self.output = w.HTML()
        self.output.add_class("mmnb-sample")
        self.button.on_click(log.guard(lambda _: self.generate(), "generate"))
        self.view = w.VBox(
            [
                w.HBox([self.prompt, self.button]),
                w.HBox([self.tokens, self.temperature]),
                w.HBox([self.chat, self.auto]),
                self.output,
            ]
        )
        self.sample: str | None = None  # the text of the last sample
        self.sampled: tuple[str, int] | None = None  # (run, step) it came from
        self._run: str | None = None  # the run the chat default was set for
        self._lock = threading.Lock()

    def selected(self, entry: RunEntry, info: StepInfo) -> None:
        """The slider settled on (entry, info)."""
        if entry.name != self._run:
            # An SFT run's samples read best as answers to the prompt; the user's choice holds
            # while they stay on the run.
            self._run = entry.name
            self.chat.value = entry.train_config.get("data") == "chat"
        if self.auto.value:
            self.generate()
        elif self.sampled != (entry.name, info.step):
            self.output.value = (
                f"<i>Generate samples from {html.escape(entry.name)} step {info.step}</i>"
            )

    def generate(self) -> str:
        """A sample of the selected checkpoint for the prompt; shown and returned."""
        # A click (kernel thread) and a refresh after an action (its thread, with "on slider")
        # may both generate; the model cache is not thread-safe.
        with self._lock:
            return self._generate()

    def _generate(self) -> str:
        chosen = self.selection()
        if chosen is None:
            raise ValueError("choose a run and a checkpoint first")
        entry, info = chosen
        model, tokenizer = self.models.get(entry, info)
        text = generate(
            model,
            tokenizer,
            self.prompt.value,
            max_new_tokens=self.tokens.value,
            temperature=self.temperature.value,
            seed=0,
            chat=self.chat.value,
        )
        self.sample, self.sampled = text, (entry.name, info.step)
        shown = "" if self.chat.value else f"<b>{html.escape(self.prompt.value)}</b>"
        self.output.value = (
            f"<div style='white-space:pre-wrap;font-family:monospace'>{shown}"
            f"{html.escape(text)}</div><small>{html.escape(entry.name)} step {info.step}</small>"
        )
        return text
