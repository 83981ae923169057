"""The CLI: bad input gives one line naming the problem and a non-zero exit; no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

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
    assert "--lr must be positive" in _fails(capsys, "train", *store, *opts, "--lr", "0")
    assert "--batch-size must be positive" in _fails(
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
    # Only the model's text, as mmnb.generate returns it (the prompt is never repeated).
    model, tok = __import__("mmnb").load_model(Store(store).run("a"))
    expected = __import__("mmnb").generate(model, tok, "Once", max_new_tokens=5, temperature=0.8,
                                           top_p=0.9, seed=0)  # fmt: skip
    assert gen.stdout == expected + "\n"


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


def test_help_and_argument_errors_do_not_import_torch():
    """`--help` and a bad flag answer at once: the engine (torch, h5py) is imported lazily."""
    for argv in (["--help"], ["train", "--help"], ["resume", "--help"], ["train", "--bogus"]):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "mmnb", *argv],
            capture_output=True,
            text=True,
        )
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()}
        assert not {"torch", "h5py", "numpy", "IPython"} & imported, argv
        assert proc.returncode == (0 if "--help" in argv else 2)
    assert "unrecognized arguments: --bogus" in proc.stderr


def test_values_are_refused_naming_the_flag(capsys, tmp_path, micro):
    store = tmp_path / "s"
    opts = [*cli_args(micro), "--store", str(store), "--no-sample"]
    cases = {
        ("--heads", "4", "--kv-heads", "3"): "--kv-heads (3) must divide --heads (4)",
        ("--lr", "inf"): "--lr must be a finite number, got inf",
        ("--lr", "nan"): "--lr must be a finite number, got nan",
        ("--grad-clip=-inf",): "--grad-clip must be a finite number",
        ("--stop-at", "0"): "--stop-at must be positive, got 0",
        ("--log-every", "0"): "--log-every must be positive, got 0",
        ("--device", "nosuch"): "--device 'nosuch' is not a torch device",
        ("--time-budget", "soon"): "--time-budget 'soon' is not a duration",
    }
    if not torch.cuda.is_available():
        cases["--device", "cuda"] = "--device cuda: no CUDA GPU is available"
    for flags, message in cases.items():
        assert message in _fails(capsys, "train", "x", *opts, *flags)
    assert not store.exists()
    afile = tmp_path / "afile"
    afile.write_text("not a store")
    for command in (["train", "x", *opts], ["runs"], ["generate"]):
        err = _fails(capsys, *command, "--store", str(afile))
        assert f"--store {afile} is a file, not a folder" in err
    assert afile.read_text() == "not a store"


def test_resume_and_generate_validate_like_train(capsys, tmp_path, micro):
    store = str(tmp_path / "s")
    assert main(["train", "a", "--store", store, "--max-steps", "4", "--no-sample",
                 *cli_args(micro)]) == 0  # fmt: skip
    capsys.readouterr()
    before = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    cases = [
        (["resume", "a", "--log-every", "0"], "--log-every must be positive, got 0"),
        (["resume", "a", "--stop-at", "3"], "--stop-at 3 is not after step 4"),
        (["resume", "a", "--device", "nosuch"], "--device 'nosuch' is not a torch device"),
        (["resume", "a", "--more-epochs", "0"], "--more-epochs must be positive, got 0"),
        (["branch", "a", "--lr", "inf"], "--lr must be a finite number"),
        (["branch", "a", "--layers", "3"], "--layers changes the model's shape"),
        (["branch", "a", "--step", "0", "--stop-at", "0"], "--stop-at must be positive"),
        (["generate", "a", "--max-new-tokens", "-5"], "--max-new-tokens must be positive, got -5"),
        (["generate", "a", "--temperature", "-1"], "--temperature must not be negative"),
        (["generate", "a", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    ]
    for argv, message in cases:
        assert message in _fails(capsys, *argv, "--store", store), argv
    after = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    assert after == before


def test_stop_at_prints_the_saved_state_and_resume_of_a_finished_run_says_so(
    capsys, tmp_path, micro
):
    store = str(tmp_path / "s")
    argv = ["train", "a", "--store", store, "--max-steps", "9", "--stop-at", "5", "--no-sample"]
    assert main([*argv, *cli_args(micro)]) == 0
    latest = Store(store).run("a").latest()
    assert latest.step == 5 and "stop_at" in latest.reasons
    assert capsys.readouterr().out.splitlines()[0] == (
        f"run a: step 5, loss {latest.loss:.4f}, lr {latest.lr:.2e}, status stopped"
    )
    assert main(["resume", "a", "--store", store, "--no-sample"]) == 0
    capsys.readouterr()
    assert main(["resume", "a", "--store", store, "--no-sample"]) == 0
    out = capsys.readouterr()
    assert "note: run a already finished its plan at step 9; nothing to train" in out.err
    assert out.out.startswith("run a: step 9, loss ")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_read_only_store_is_one_line(tmp_path, micro):
    """A store on a read-only file system (a private mount namespace, when this machine
    allows one) is refused before anything is trained."""
    store = tmp_path / "ro"
    store.mkdir()
    script = (
        f"mount -t tmpfs -o ro tmpfs {store} && exec {sys.executable} -m mmnb train x "
        f"--store {store} --no-sample {' '.join(cli_args(micro))}"
    )
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True)
    if "mount" in proc.stderr and "mmnb" not in proc.stderr:
        pytest.skip(f"cannot mount here: {proc.stderr.strip()}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"mmnb: error: --store {store} is read-only"
