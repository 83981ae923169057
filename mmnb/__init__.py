"""mmnb: train MiniMind-family LLMs in a notebook, with checkpoints that resume exactly.

The engine API (no IPython below this line): `train`, `resume`, `branch`, `Store`,
`load_model`, `generate`. `%load_ext mmnb` adds the notebook magics; `browse(store)` and
`mmnb.widgets.Dashboard` are the widget front-ends (imported on first use).

`import mmnb` is cheap: torch, h5py and the API are imported on first use of a name that needs
them, so `mmnb --help` and a mistyped flag answer without loading torch (PEP 562).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from .config import ModelConfig, TrainConfig, resolve

if TYPE_CHECKING:
    from .api import branch, generate, load_model, resume, train
    from .store import Run, Store, StoreError
    from .widgets import Browser

__version__ = "0.1.0"

# Public names imported on first use: name -> module that defines it.
_LAZY = {
    "train": ".api",
    "resume": ".api",
    "branch": ".api",
    "generate": ".api",
    "load_model": ".api",
    "Run": ".store",
    "Store": ".store",
    "StoreError": ".store",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mmnb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


class _Package(types.ModuleType):
    """`mmnb.train` is the API function; importing the submodule `mmnb/train.py` must not
    replace it (the import system sets a package attribute per submodule it loads)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def browse(store: Store | str | None = None) -> Browser:
    """The history browser of `store` as widgets (see `mmnb.widgets.Browser`).

    Imported on first use: `import mmnb` stays free of ipywidgets and matplotlib.
    """
    from .widgets import browse as _browse

    return _browse(store)


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext mmnb`: add %train, %resume, %checkpoint and %runs (see `mmnb.magics`)."""
    from .magics import load_ipython_extension as load  # IPython only when a notebook asks

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """`%unload_ext mmnb`: remove the magics and hooks again."""
    from .magics import unload_ipython_extension as unload

    unload(ipython)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "ModelConfig",
    "Run",
    "Store",
    "StoreError",
    "TrainConfig",
    "branch",
    "browse",
    "generate",
    "load_model",
    "resolve",
    "resume",
    "train",
]
