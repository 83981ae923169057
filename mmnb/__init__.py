"""mmnb: train MiniMind-family LLMs in a notebook, with checkpoints that resume exactly.

The engine API (no IPython below this line): `train`, `resume`, `branch`, `Store`,
`load_model`, `generate`. `%load_ext mmnb` adds the notebook magics.
"""

from .api import branch, generate, load_model, resume, train
from .config import ModelConfig, TrainConfig, resolve
from .store import Run, Store, StoreError

__version__ = "0.1.0"

__all__ = [
    "ModelConfig",
    "Run",
    "Store",
    "StoreError",
    "TrainConfig",
    "branch",
    "generate",
    "load_model",
    "resolve",
    "resume",
    "train",
]
