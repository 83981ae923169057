"""The one validator of user input, shared by every entry point (Python API, CLI, magics, widgets).

`mmnb.train`, `resume`, `branch` and `generate` call these checks before anything is created
or trained, so a mistake is refused the same way wherever it was typed, and the store is left
unchanged. A refusal is an `InvalidInput` (a `ValueError`) that knows which names it is about:
`str(err)` names the config field or API keyword (`num_attention_heads`), and a front-end
re-words it with its own names — the CLI and the magics with the flag the user typed
(`err.render(flag_name)` → `--heads`).

No torch at import time: the CLI imports this module to answer `--help` and argument errors fast.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


class InvalidInput(ValueError):
    """A refused value. `template` holds `{0}`, `{1}`, … for the names in `fields`."""

    def __init__(self, template: str, *fields: str) -> None:
        self.template, self.fields = template, fields
        super().__init__(self.render())

    def render(self, name: Callable[[str], str] = str) -> str:
        """The message with each field named by `name(field)` (a flag, a form label, …)."""
        return self.template.format(*(name(f) for f in self.fields))


# ---- numbers ----
def positive(name: str, value: Any) -> None:
    finite(name, value)
    if not value > 0:
        raise InvalidInput(f"{{0}} must be positive, got {value}", name)


def non_negative(name: str, value: Any) -> None:
    finite(name, value)
    if value < 0:
        raise InvalidInput(f"{{0}} must not be negative, got {value}", name)


def finite(name: str, value: Any) -> None:
    """Rejects None, NaN and ±inf (argparse's float() accepts 'nan' and 'inf')."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"{{0}} must be a number, got {value!r}", name)
    if not math.isfinite(value):
        raise InvalidInput(f"{{0}} must be a finite number, got {value}", name)


def in_range(name: str, value: Any, low: float, high: float, *, high_open: bool = False) -> None:
    finite(name, value)
    if not (low <= value < high if high_open else low <= value <= high):
        bracket = ")" if high_open else "]"
        raise InvalidInput(f"{{0}} must be in [{low:g}, {high:g}{bracket}, got {value}", name)


def one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidInput(f"{{0}} must be one of {', '.join(choices)}, got {value!r}", name)


# ---- configs ----
def check_config(model: Any, train: Any) -> None:
    """Every field of a resolved (ModelConfig, TrainConfig) pair; what `train`, `resume` and
    `branch` all call before a trainer is built."""
    model.validate()
    train.validate()


def check_stop_at(stop_at: int | None, step: int) -> None:
    """`stop_at` must lie after the step a session starts from, or it would stop at once
    without training or saving anything."""
    if stop_at is not None and stop_at <= step:
        raise InvalidInput(
            f"{{0}} {stop_at} is not after step {step}, where this session starts", "stop_at"
        )


def check_sampling(max_new_tokens: Any, temperature: Any, top_p: Any) -> None:
    """Options of `generate` (and of the sample printed after training)."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
        raise InvalidInput(f"{{0}} must be an integer, got {max_new_tokens!r}", "max_new_tokens")
    positive("max_new_tokens", max_new_tokens)
    non_negative("temperature", temperature)
    finite("top_p", top_p)
    if not 0 < top_p <= 1:
        raise InvalidInput(f"{{0}} must be in (0, 1], got {top_p}", "top_p")


# ---- where training runs and writes ----
def check_device(device: Any) -> str:
    """A torch device that exists on this machine, as a string ('cpu', 'cuda:0', …)."""
    import torch  # only the API calls this, and it has torch already

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidInput(
            f"{{0}} {device!r} is not a torch device (cpu, cuda, cuda:N, mps)", "device"
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + (
                "" if torch.version.cuda else ", a build without CUDA"
            )
            raise InvalidInput(f"{{0}} {device}: no CUDA GPU is available ({build})", "device")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise InvalidInput(f"{{0}} {device}: this machine has {count} CUDA device(s)", "device")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInput(f"{{0}} {device}: MPS is not available here", "device")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise InvalidInput(f"{{0}} {device!r}: mmnb trains on cpu, cuda or mps", "device")
    return str(parsed)


def check_store(path: str | os.PathLike[str], *, write: bool) -> None:
    """The store folder is a folder (or can be created), and writable when `write`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InvalidInput(f"{{0}} {path} is a file, not a folder", "store")
    if not write:
        return
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidInput(f"{{0}} {path}: {existing} is a file, not a folder", "store")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" ({existing} cannot be written)"
        raise InvalidInput(f"{{0}} {path} is read-only{where}", "store")


def check_run_writable(folder: Path) -> None:
    """A run folder (and its ckpt/ folder) that a resume will write into."""
    for target in (folder, folder / "ckpt"):
        if target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
            raise InvalidInput(f"{{0}} {folder.parent} is read-only ({target})", "store")
