"""`mmnb export RUN[@STEP] --format minimind|hf|safetensors --out PATH`: parse, call, report.

Registered with `mmnb.cli` through `@command`; torch and the store are imported only when the
command runs, so `mmnb --help` stays fast.
"""

from __future__ import annotations

import argparse
import re

from .cli import command

FORMATS = ("minimind", "hf", "safetensors")  # = mmnb.export.FORMATS (a test checks)
DTYPES = ("fp16", "bf16", "fp32")  # = mmnb.export.DTYPES
_TARGET = re.compile(r"^(.+?)(?:@(\d+))?$")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="RUN[@STEP]", help="run and checkpoint (default: newest)")
    p.add_argument("--step", type=int, help="checkpoint (same as RUN@STEP)")
    p.add_argument("--format", choices=FORMATS, default="hf", help="output format (default hf)")
    p.add_argument("--out", help="output file (.pth, .safetensors) or folder (hf)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        help="weights dtype (default: fp16 for minimind, as MiniMind saves; fp32 otherwise)",
    )
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="fold a LoRA run's adapters into its base weights",
    )
    p.add_argument("--store", help="store folder (default $MMNB_STORE or ./mmnb-runs)")


@command("export", "write a checkpoint as a MiniMind .pth, HF folder or safetensors", _export_args)
def export_command(args: argparse.Namespace) -> int:
    from .export import export
    from .store import Store

    name, step = _TARGET.match(args.target).groups()
    if step is not None and args.step is not None and int(step) != args.step:
        raise ValueError(f"two steps given: {args.target} and --step {args.step}")
    step = int(step) if step is not None else args.step
    run = Store(args.store).run(name)
    done = export(
        run,
        step,
        format=args.format,
        out=args.out,
        dtype=args.dtype,
        merge_lora=args.merge_lora,
    )
    what = f" ({done.architecture})" if done.architecture else ""
    mib = done.bytes / 2**20
    print(f"exported {run.name}@{done.step} as {done.format}{what}, {done.dtype}, {mib:.1f} MiB")
    print(f"to: {done.path}")
    return 0
