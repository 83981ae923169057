"""The browser's Export tab: write the selected checkpoint as a HF folder, MiniMind .pth or
safetensors (`mmnb.export.export`), synchronously: it takes about a second at 100M params."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ipywidgets as w

from ..export import DEFAULT_DTYPE, DTYPES, FORMATS, SUFFIX, Exported, export
from ..store import StepInfo
from .catalog import RunEntry
from .log import Log

Selection = Callable[[], tuple[RunEntry, StepInfo] | None]


class ExportTab:
    def __init__(self, log: Log, selection: Selection) -> None:
        self.log, self.selection = log, selection
        self.format = w.Dropdown(options=list(FORMATS), value="hf", description="format")
        self.dtype = w.Dropdown(options=["default", *DTYPES], value="default", description="dtype")
        self.out = w.Text(description="to", placeholder="auto: <run>-<step>-hf")
        # A LoRA run's adapters folded into its base (transformers' classes have no adapters).
        self.merge = w.Checkbox(value=True, description="merge LoRA adapters", indent=False)
        self.button = w.Button(description="Export", icon="download")
        self.button.on_click(log.guard(lambda _: self.export(), "export"))
        self.view = w.VBox([w.HBox([self.format, self.dtype]), self.out, self.merge, self.button])

    def selected(self, entry: RunEntry, info: StepInfo) -> None:
        self.button.description = f"Export step {info.step}"

    def export(self) -> Exported:
        chosen = self.selection()
        if chosen is None:
            raise ValueError("choose a run and a checkpoint first")
        entry, info = chosen
        fmt = self.format.value
        out = self.out.value.strip() or f"{entry.name}-{info.step}{SUFFIX[fmt]}"
        dtype = None if self.dtype.value == "default" else self.dtype.value
        lora = bool(entry.run.config_dict()["train"].get("lora_rank"))
        merge = lora and self.merge.value
        done = export(
            entry.run, info.step, format=fmt, out=Path(out), dtype=dtype, merge_lora=merge
        )
        what = f" ({done.architecture})" if done.architecture else ""
        self.log.message(
            f"exported {entry.name}@{info.step} as {fmt}{what}, {dtype or DEFAULT_DTYPE[fmt]}, "
            f"to {done.path}"
        )
        return done
