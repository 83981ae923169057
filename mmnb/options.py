"""The user-facing options, declared once for the CLI and the magics (both are argparse).

Each option's `dest` is the config field or API keyword it sets; help text comes from here.
"""

from __future__ import annotations

import argparse
from typing import Any

from .config import MODEL_ALIASES, PRESETS, SCHEDULES

Option = tuple[tuple[str, ...], dict[str, Any]]


def _opt(*flags: str, **kwargs: Any) -> Option:
    kwargs.setdefault("default", None)
    return flags, kwargs


# Options of `mmnb train` / `%train` that describe the run (config fields).
RUN_OPTIONS: list[Option] = [
    _opt("--preset", choices=list(PRESETS), help="model preset (default tiny)"),
    _opt(
        "--data",
        help="pretrain/SFT .jsonl, .txt file or folder (default: bundled corpus; 'chat' = bundled chat set)",
    ),
    _opt("--tokenizer", help="tokenizer.json to use (default: train one on the data)"),
    _opt("--epochs", type=int, help="planned epochs (default 1)"),
    _opt("--max-steps", type=int, help="planned optimizer steps (overrides --epochs)"),
    _opt("--batch-size", type=int, help="samples per micro-batch"),
    _opt("--accum", type=int, help="gradient-accumulation steps per optimizer step"),
    _opt("--lr", type=float, help="peak learning rate"),
    _opt("--schedule", choices=list(SCHEDULES), help="lr schedule (default wsd: extendable)"),
    _opt("--warmup", type=int, help="linear warmup steps"),
    _opt("--decay-fraction", type=float, help="wsd: fraction of steps spent decaying (0.2)"),
    _opt("--decay-shape", choices=["linear", "1-sqrt"], help="wsd decay shape"),
    _opt("--min-lr-ratio", type=float, help="final lr / peak lr for cosine and wsd (0.1)"),
    _opt("--weight-decay", type=float, help="AdamW weight decay"),
    _opt("--beta1", type=float, help="AdamW beta1"),
    _opt("--beta2", type=float, help="AdamW beta2"),
    _opt("--grad-clip", type=float, help="max grad norm (0 = no clipping)"),
    _opt("--seed", type=int, help="seed of init, data order and dropout (default 1337)"),
    _opt(
        "--dtype", choices=["fp32", "bf16"], help="fp32, or bf16 autocast with fp32 master weights"
    ),
    _opt(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the training step (the first step compiles; same checkpoints)",
    ),
    _opt("--dropout", type=float, help="dropout probability"),
    _opt("--max-seq-len", type=int, help="tokens per sample"),
    _opt("--vocab-size", type=int, help="vocabulary size of a trained tokenizer"),
    _opt("--hidden-size", type=int, help="model width"),
    _opt("--layers", type=int, help="decoder blocks"),
    _opt("--heads", type=int, help="attention heads"),
    _opt("--kv-heads", type=int, help="key/value heads (GQA)"),
    _opt("--intermediate-size", type=int, help="SwiGLU width"),
    _opt("--qk-norm", action=argparse.BooleanOptionalAction, help="RMSNorm on q/k per head"),
    _opt("--moe", action=argparse.BooleanOptionalAction, help="mixture-of-experts MLPs"),
    _opt("--experts", type=int, help="experts per MoE layer"),
    _opt("--top-k", type=int, help="experts per token"),
    _opt("--lora-rank", type=int, help="train LoRA adapters of this rank, base frozen (0 = off)"),
    _opt("--lora-alpha", type=float, help="adapter scale alpha/rank (default: rank, as MiniMind)"),
    _opt(
        "--lora-targets", help="linear layers to adapt, e.g. q_proj,v_proj (default q_proj,o_proj)"
    ),
    _opt("--objective", choices=["lm", "dpo"], help="lm, or dpo on preference pairs (--data dpo)"),
    _opt("--dpo-beta", "--beta", type=float, help="DPO beta (default 0.1)"),
]

# Where a new run's weights come from (train only: a branch starts from its parent).
INIT_OPTIONS: list[Option] = [
    _opt(
        "--init-from",
        metavar="WEIGHTS",
        help="start from weights: a MiniMind .pth, a .safetensors file, a Hugging Face model "
        "folder, or RUN@STEP (config inferred from the shapes)",
    ),
]

# Options that only shape this session (allowed on a plain resume too).
SESSION_OPTIONS: list[Option] = [
    _opt("--save-every", type=int, help="checkpoint every K optimizer steps"),
    _opt("--stop-at", type=int, help="stop with a checkpoint after this step (the plan is kept)"),
    _opt("--time-budget", help="stop with a checkpoint after this long, e.g. 90s, 30m, 2h"),
    _opt("--keep-last", type=int, help="retention: keep the newest N checkpoints"),
    _opt("--keep-every", type=int, help="retention: also keep every M-th step"),
    _opt("--log-every", type=int, help="steps between progress updates"),
    _opt(
        "--async-save",
        action=argparse.BooleanOptionalAction,
        help="write checkpoints in the background while training goes on "
        "(default: when the state is over 64 MiB)",
    ),
    _opt(
        "--on-anomaly",
        choices=["stop", "rollback"],
        help="on a non-finite loss/grad norm or a spike: stop (default) or roll back to the "
        "newest good checkpoint, skipping the data since",
    ),
    _opt("--spike-factor", type=float, help="a loss over F x its running mean is an anomaly"),
    _opt("--max-rollbacks", type=int, help="rollback: stop after this many (default 3)"),
    _opt("--rollback-lr-scale", type=float, help="rollback: multiply the lr by this each time"),
]

COMMON_OPTIONS: list[Option] = [
    _opt("--store", help="store folder (default $MMNB_STORE or ./mmnb-runs)"),
    _opt("--device", help="torch device (default cpu)"),
]

# The run name as a flag, for scripts that build argument lists (same as the positional RUN).
NAME_OPTIONS: list[Option] = [
    _opt("--run", dest="run_flag", metavar="RUN", help="run name (same as the positional RUN)"),
]

# A sample from the final checkpoint, printed when training ends.
SAMPLE_OPTIONS: list[Option] = [
    _opt("--no-sample", action="store_true", default=False, help="skip the final sample"),
    _opt("--max-new-tokens", type=int, default=80, help="tokens to sample"),
    _opt("--temperature", type=float, default=0.8, help="0 = greedy"),
    _opt("--top-p", type=float, default=0.9, help="nucleus sampling mass"),
    _opt("--sample-seed", type=int, default=0, help="seed of the sample"),
]

# Every option of `mmnb train`; `%train` has these and NOTEBOOK_OPTIONS (tests check both).
# Train in a process of its own that outlives this kernel or terminal (mmnb.jobs.detach).
JOB_OPTIONS: list[Option] = [
    _opt(
        "--detach",
        action="store_true",
        default=False,
        help="train in a detached process that outlives this kernel/terminal "
        "(follow it with %%attach RUN or mmnb watch RUN)",
    ),
]

TRAIN_OPTIONS: list[Option] = (
    NAME_OPTIONS
    + RUN_OPTIONS
    + INIT_OPTIONS
    + SESSION_OPTIONS
    + COMMON_OPTIONS
    + SAMPLE_OPTIONS
    + JOB_OPTIONS
)

# `%train` only: a terminal process has no notebook to keep usable while it trains.
NOTEBOOK_OPTIONS: list[Option] = [
    _opt(
        "--background",
        action="store_true",
        default=False,
        help="train in a thread; the notebook stays usable (progress: %%train --status)",
    ),
    _opt(
        "--status",
        action="store_true",
        default=False,
        help="show the progress of RUN (default: every run trained in this kernel)",
    ),
    _opt(
        "--stop",
        action="store_true",
        default=False,
        help="stop RUN's background training at the next step, with a checkpoint",
    ),
]


def add_options(parser: argparse.ArgumentParser, options: list[Option]) -> None:
    for flags, kwargs in options:
        parser.add_argument(*flags, **kwargs)


def dests(options: list[Option]) -> list[str]:
    return [flags[0].lstrip("-").replace("-", "_") for flags, _ in options]


def collect(args: argparse.Namespace, options: list[Option]) -> dict[str, Any]:
    """The given (non-None) option values of `options`, keyed by their dest."""
    values = {}
    for dest in dests(options):
        value = getattr(args, dest, None)
        if value is not None:
            values[dest] = value
    return values


# Flags of options declared elsewhere (resume/branch/generate) that errors may name.
_EXTRA_FLAGS = {
    "more_epochs": "--more-epochs",
    "new_name": "--name",
    "step": "--step",
    "prompt": "--prompt",
}


def flag_name(field: str) -> str:
    """The flag a user typed for a config field or API keyword: `num_attention_heads` →
    `--heads`, `max_new_tokens` → `--max-new-tokens`; the field itself when no flag sets it.
    Front-ends render `mmnb.validate.InvalidInput` with it."""
    return _FLAGS.get(field, field)


def _flags() -> dict[str, str]:
    flags = dict(_EXTRA_FLAGS)
    tables = RUN_OPTIONS + INIT_OPTIONS + SESSION_OPTIONS + COMMON_OPTIONS + SAMPLE_OPTIONS
    tables += NAME_OPTIONS
    for opt_flags, kwargs in tables:
        flag = opt_flags[0]
        dest = kwargs.get("dest") or flag.lstrip("-").replace("-", "_")
        flags[dest] = flag
    for alias, field in MODEL_ALIASES.items():  # --heads sets num_attention_heads
        if alias in flags:
            flags[field] = flags[alias]
    return flags


_FLAGS = _flags()
