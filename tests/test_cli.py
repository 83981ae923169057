"""The CLI: bad input gives one line naming the problem and a non-zero exit; no traceback."""

from __future__ import annotations

import json

import pytest

from conftest import cli_args, mmnb, write_jsonl
from mmnb.cli import build_parser, main
from mmnb.store import Store


def _fails(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_bad_inputs_give_one_line(capsys, tmp_path, micro):
    store = ["--store", str(tmp_path / "s"), "--no-sample"]
    opts = cli_args({k: v for k, v in micro.items() if k != "data"})
    assert "data file not found" in _fails(capsys, "train", *store, *opts, "--data", "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    assert "bad.jsonl:2" in _fails(capsys, "train", *store, *opts, "--data", str(bad))
    assert "lr must be positive" in _fails(capsys, "train", *store, *opts, "--lr", "0")
    assert "batch_size must be positive" in _fails(
        capsys, "train", *store, *opts, "--batch-size", "-1"
    )
    empty = write_jsonl(tmp_path / "short.jsonl", [{"text": "a b c"}])
    assert "no sample of max_seq_len 32" in _fails(
        capsys, "train", *store, *opts, "--data", str(empty)
    )
    few = write_jsonl(tmp_path / "few.jsonl", [{"text": " ".join(["word"] * 60)}])
    assert "fewer than one optimizer step" in _fails(
        capsys, "train", *store, *opts, "--data", str(few)
    )
    assert "no run named 'ghost'" in _fails(capsys, "resume", "ghost", *store)
    assert not (tmp_path / "s").exists() or Store(tmp_path / "s").runs() == []


def test_argparse_errors_are_one_line():
    proc = mmnb("train", "--preset", "huge", check=False)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        and "invalid choice: 'huge'" in proc.stderr
    )
    proc = mmnb("resume", "x", "--batch-size", "8", check=False)
    assert proc.returncode == 2 and "unrecognized arguments: --batch-size" in proc.stderr


def test_train_runs_list_generate(tmp_path, micro):
    store = str(tmp_path / "s")
    out = mmnb("train", "a", "--store", store, "--max-steps", "3", *cli_args(micro)).stdout
    assert "run a: step 3" in out and "sample:" in out
    mmnb(
        "branch", "a", "--step", "0", "--name", "b", "--store", store, "--no-sample", "--lr", "1e-3"
    )
    listing = json.loads(mmnb("runs", "--store", store, "--json").stdout)
    rows = {r["name"]: r for r in listing["runs"]}
    assert rows["a"]["steps"][-1] == 3 and rows["a"]["status"] == "finished"
    assert rows["b"]["parent"] == {"run": "a", "step": 0}
    text = mmnb("runs", "--store", store).stdout
    assert "b <- a@0" in text
    gen = mmnb("generate", "a", "--store", store, "--prompt", "Once", "--max-new-tokens", "5")
    assert gen.stdout.startswith("Once")


def test_train_flags_cover_the_config():
    """Every config field a user may set has a flag (the names are the interface)."""
    from mmnb.config import TRAIN_FIELDS

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions}
    for field in TRAIN_FIELDS:
        assert field in dests or field in {"preset", "eps"}, field
    for flag in ("hidden_size", "layers", "heads", "kv_heads", "max_seq_len", "dropout"):
        assert flag in dests


@pytest.mark.parametrize("flag", ["--stop-at", "--time-budget"])
def test_stop_flags_keep_the_plan(tmp_path, micro, flag):
    store = str(tmp_path / "s")
    value = "4" if flag == "--stop-at" else "0.01s"
    mmnb(
        "train",
        "a",
        "--store",
        store,
        "--no-sample",
        "--epochs",
        "2",
        flag,
        value,
        *cli_args(micro),
    )
    run = Store(store).run("a")
    latest = run.latest()
    assert latest.step < 100 and ("stop_at" in latest.reasons or "time_budget" in latest.reasons)
    assert run.load()["schedule"]["plan"]["total"] > latest.step
