"""mmnb: train MiniMind-family LLMs in a notebook, with checkpoints that resume exactly.

The engine API (no IPython below this line): `train`, `resume`, `branch`, `Store`,
`load_model`, `generate`. `%load_ext mmnb` adds the notebook magics; `browse(store)` and
`mmnb.widgets.Dashboard` are the widget front-ends (imported on first use).
"""

from typing import TYPE_CHECKING, Any

from .api import branch, generate, load_model, resume, train
from .config import ModelConfig, TrainConfig, resolve
from .store import Run, Store, StoreError

if TYPE_CHECKING:
    from .widgets import Browser

__version__ = "0.1.0"


def browse(store: Store | str | None = None) -> "Browser":
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
