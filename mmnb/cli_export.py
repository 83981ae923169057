"""`mmnb export RUN[@STEP] --format minimind|hf|safetensors --out PATH`: parse, call, report."""

from __future__ import annotations

import argparse
import re

from .store import Store

_TARGET = re.compile(r"^(.+?)(?:@(\d+))?$")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from .export import DTYPES, FORMATS

    p = sub.add_parser("export", help="write a checkpoint as MiniMind .pth, HF folder, safetensors")
    p.add_argument("target", metavar="RUN[@STEP]", help="run and checkpoint (default: newest)")
    p.add_argument("--step", type=int, help="checkpoint (same as RUN@STEP)")
    p.add_argument("--format", choices=FORMATS, default="hf", help="output format (default hf)")
    p.add_argument("--out", help="output file (.pth, .safetensors) or folder (hf)")
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="weights dtype (default: fp16 for minimind, as MiniMind saves; fp32 otherwise)",
    )
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="fold a LoRA run's adapters into its base weights",
    )
    p.add_argument("--store", help="store folder (default $MMNB_STORE or ./mmnb-runs)")


def main(args: argparse.Namespace) -> int:
    from .export import export

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
