"""`python -m mmnb` for torchrun in the distributed tests, with a fault or a probe added.

torchrun runs this file in every rank: `torchrun ... tests/dist_worker.py train RUN ...`. It
runs the real CLI; `MMNB_TEST` (JSON) adds, in this process only:
- `{"kill_at_step": S, "rank": R}`: rank R SIGKILLs itself after optimizer step S of its first
  attempt (torchrun's TORCHELASTIC_RESTART_COUNT 0) — a rank dying mid-run;
- `{"kill_in_shard_write": S, "rank": R}`: rank R SIGKILLs itself right after its shard of
  step S is on disk, before rank 0 commits the checkpoint;
- `{"step_delay": SECONDS}`: sleep that long after every step (numbers are unchanged), so a
  test can signal the job while it trains;
- `{"full_state": FOLDER}`: at every checkpoint, every rank also takes
  `get_state_dict(..., full_state_dict=True)` and rank 0 saves it as FOLDER/<step>.npz.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np

from mmnb import api
from mmnb.cli import main
from mmnb.store import sharded
from mmnb.train import Trainer

SPEC = json.loads(os.environ.get("MMNB_TEST", "{}"))
RANK = int(os.environ.get("RANK", 0))
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def _kill_self() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if "kill_at_step" in SPEC or "step_delay" in SPEC:
    real_step = Trainer._train_step

    def train_step(self: Trainer) -> None:
        real_step(self)
        if SPEC.get("step_delay"):
            time.sleep(SPEC["step_delay"])
        if self.step == SPEC.get("kill_at_step") and RANK == SPEC["rank"] and ATTEMPT == 0:
            _kill_self()

    Trainer._train_step = train_step

if "kill_in_shard_write" in SPEC:
    real_write = sharded.write_shard

    def write_shard(folder, step, rank, world_size, tensors):  # type: ignore[no-untyped-def]
        out = real_write(folder, step, rank, world_size, tensors)
        if step == SPEC["kill_in_shard_write"] and rank == SPEC["rank"]:
            _kill_self()
        return out

    sharded.write_shard = write_shard

if "full_state" in SPEC:
    real_attach = api._attach

    def attach(handle, trainer, listeners):  # type: ignore[no-untyped-def]
        stream = real_attach(handle, trainer, listeners)
        save = trainer.saver

        def saver(t, reasons, tags):  # type: ignore[no-untyped-def]
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            info = save(t, reasons, tags)
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(t.model, options=options)  # a collective
            if RANK == 0:
                folder = SPEC["full_state"]
                os.makedirs(folder, exist_ok=True)
                arrays = {k: v.float().numpy() for k, v in full.items()}
                np.savez(os.path.join(folder, f"{t.step}.npz"), **arrays)
            return info

        trainer.saver = saver
        return stream

    api._attach = attach

sys.exit(main(sys.argv[1:]))
