"""Distributed training through torchrun (CPU, gloo): DDP, FSDP2, sharded checkpoints, resume at
another world size, interrupts, a killed rank, two agents as two nodes.

Every job is a real `torch.distributed.run` launch of `tests/dist_worker.py` (the CLI, with a
fault injected where a test needs one). Launches are few and shared: module fixtures train the
reference runs once, and each test adds the one or two launches its claim needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import MICRO, assert_same_state, cli_args, mmnb
from mmnb.api import load_model
from mmnb.store import Store

WORKER = str(Path(__file__).with_name("dist_worker.py"))
STEPS = 40  # optimizer steps of every run here: 1 epoch of the small corpus at 8 samples a step
# Weights of the same run trained at another world size (or DDP vs FSDP2) differ only by the
# order of float additions; measured max |difference| after 40 steps: 0 (DDP 2 ranks vs 1 rank
# with accum 2: halving is exact) up to 1.2e-7 (FSDP2 vs DDP). The assertion allows 1e-5.
ATOL = 1e-5


def torchrun(*args: str, nproc: int = 2, agent: tuple[str, ...] = (), test: dict | None = None,
             timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:  # fmt: skip
    """`torchrun --standalone --nproc-per-node N [agent flags] dist_worker.py ARGS`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={nproc}", *agent, WORKER, *args]
    env = dict(os.environ, MMNB_TEST=json.dumps(test or {}))
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stderr[-4000:]}")  # fmt: skip
    return proc


def options(small_corpus: Path, **extra) -> list[str]:
    return cli_args({**MICRO, "data": str(small_corpus), "max_steps": STEPS, **extra})


def samples(folder: Path) -> list[tuple[int, int, list[int]]]:
    """The recorded sample sequence: (step, global micro-batch, sample indices), all ranks."""
    rows = []
    for path in sorted(folder.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            rows.append((r["step"], r["micro"], r["samples"]))
    return sorted(rows)


def assert_close(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        x, y = a["model"][name], b["model"][name]
        assert torch.allclose(x, y, rtol=0, atol=ATOL), (name, (x - y).abs().max().item())
    assert a["trainer"]["step"] == b["trainer"]["step"]
    assert a["trainer"]["tokens"] == b["trainer"]["tokens"]


# ---- in this process: devices, precision, the split of a global batch ----


def test_device_auto_picks_cpu_here(store, micro):
    from mmnb import api
    from mmnb.dist import resolve_device

    assert not torch.cuda.is_available()  # this test machine; gpu_check.py covers CUDA
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("cuda")
    run = api.train("auto", store=store, max_steps=2, **micro)  # device="auto", the default
    session = run.info()["history"][0]["session"]
    assert session["device"] == "cpu" and session["world_size"] == 1 and session["tf32"] is False
    assert run.trainer.device == torch.device("cpu")


def test_global_batch_split_over_processes():
    from mmnb.dist import session_accum

    assert session_accum(2, 4, 3, 2) == 3  # same world size
    assert session_accum(2, 4, 3, 1) == 6  # 2 ranks x accum 3 -> 1 process x accum 6
    assert session_accum(1, 4, 4, 4) == 1
    with pytest.raises(ValueError, match=r"world_size 2 x batch_size 4 x accum 3\) cannot be "
                       r"split evenly over 4 processes"):  # fmt: skip
        session_accum(2, 4, 3, 4)


def test_fp16_grad_scaler_state_resumes_exactly(store, micro):
    """fp16 autocast with a GradScaler (on CPU here: both exist there): the scale, its growth
    tracker and the skipped-step count are checkpointed, so a split run equals a straight one."""
    from mmnb import api

    api.train("straight", store=store, max_steps=12, dtype="fp16", **micro)
    api.train("split", store=store, max_steps=12, dtype="fp16", stop_at=5, **micro)
    assert set(store.run("split").load()["scaler"]) >= {"scale", "_growth_tracker", "skipped"}
    api.resume("split", store=store)
    a, b = store.run("straight").load(), store.run("split").load()
    assert_same_state(a, b)
    assert a["scaler"] == b["scaler"]


def test_fp16_skipped_steps_resume_exactly(micro):
    """Steps the scaler skips (an overflow at too high a scale) are skipped again, and counted
    the same, by a run resumed in the middle of them."""
    from mmnb.config import resolve
    from mmnb.data import build_dataset, tokenizer_for
    from mmnb.train import Trainer

    options = {k: v for k, v in micro.items() if k != "preset"}
    model_cfg, train_cfg = resolve("tiny", **options, max_steps=14, dtype="fp16")
    tokenizer = tokenizer_for(train_cfg.data, model_cfg.vocab_size)
    dataset = build_dataset(train_cfg.data, tokenizer, train_cfg.max_seq_len)

    def trainer(**changes):
        t = Trainer(model_cfg, dataclasses.replace(train_cfg, **changes), dataset)
        t.scaler.scale(torch.ones(()))  # (creates the scale tensor)
        t.scaler.update(2.0**24)  # too high: the first steps overflow
        return t

    straight = trainer()
    straight.fit()
    first = trainer(stop_at=4)
    first.fit()
    resumed = trainer()
    resumed.load_state_dict(first.state_dict())
    resumed.fit()
    a, b = straight.state_dict(), resumed.state_dict()
    assert_same_state(a, b, metrics=False)
    for key in ("loss", "lr", "grad_norm", "tokens"):  # an overflowed step's norm is nan
        assert np.array_equal(a["metrics"][key], b["metrics"][key], equal_nan=True), key
    assert a["scaler"] == b["scaler"]
    assert 4 < a["scaler"]["skipped"] < 14, a["scaler"]  # skips on both sides of the split
    assert a["scaler"]["scale"] < 2.0**24
    assert (~np.isfinite(a["metrics"]["grad_norm"])).sum() == a["scaler"]["skipped"]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, small_corpus):
    """The reference: a 2-rank DDP run, and a 1-rank run with accum doubled, with sample logs."""
    root = tmp_path_factory.mktemp("ddp")
    store = str(root / "store")
    os.environ["MMNB_SAMPLE_LOG"] = str(root / "log2")
    try:
        torchrun("train", "two", "--store", store, "--no-sample", "--save-every", "10",
                 *options(small_corpus))  # fmt: skip
        os.environ["MMNB_SAMPLE_LOG"] = str(root / "log1")
        mmnb("train", "one", "--store", store, "--no-sample", "--save-every", "10",
             *options(small_corpus, accum=2))  # fmt: skip
    finally:
        del os.environ["MMNB_SAMPLE_LOG"]
    return Store(store), root


def test_ddp_matches_one_rank_with_double_accum(ddp):
    store, root = ddp
    two, one = store.run("two"), store.run("one")
    # The global sample sequence of epoch_order(seed, epoch), whatever the world size.
    log2, log1 = samples(root / "log2"), samples(root / "log1")
    assert len(log2) == STEPS * 2 and log2 == log1
    assert {json.loads(p.read_text().splitlines()[0])["micro"] for p in (root / "log2").glob("*")} \
        == {0, 1}  # fmt: skip
    assert_close(two.load(), one.load())
    history = two.info()["history"][0]["session"]
    assert (history["world_size"], history["backend"], history["mode"]) == (2, "gloo", "ddp")
    assert (history["batch_size"], history["accum"]) == (MICRO["batch_size"], 1)
    assert one.info()["history"][0]["session"]["accum"] == 2
    state = two.load()
    assert state["trainer"]["world_size"] == 2 and state["trainer"]["mode"] == "ddp"
    # Replicated state is written once, by rank 0: no shard files.
    assert not list((two.path / "ckpt").glob("*.rank*.h5"))


def test_ddp_sigint_resume_is_bitwise(ddp, tmp_path, small_corpus):
    """SIGINT to torchrun mid-run, then the rest: == the uninterrupted run."""
    ref = ddp[0].run("two").load()
    store = str(tmp_path / "store")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", WORKER, "train", "split", "--store", store, "--no-sample",
               "--save-every", "10", *options(small_corpus)]  # fmt: skip
    env = dict(os.environ, MMNB_TEST=json.dumps({"step_delay": 0.05}))
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    committed = Path(store) / "split" / "ckpt" / "00000020.h5"
    deadline = time.monotonic() + 120
    while not committed.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=120)
    run = Store(store).run("split")
    last = run.latest()
    assert "interrupt" in last.reasons, err.decode()[-3000:]
    assert 20 <= last.step < STEPS and run.status() == "interrupted"
    assert b"interrupted; the last completed step is checkpointed" in err
    torchrun("resume", "split", "--store", store, "--no-sample")
    assert_same_state(run.load(), ref)
    sessions = [h["session"] for h in run.info()["history"] if "session" in h]
    assert [s["world_size"] for s in sessions] == [2, 2]


def test_three_ranks_resume_bitwise(tmp_path, small_corpus):
    """With 3+ ranks the order ring all-reduce adds in depends on DDP's bucket layout, which DDP
    changes after a module's first backward: the trainer primes it, so a session that starts
    mid-run reduces exactly like the straight run. (--stop-at, then resume.)"""
    store = str(tmp_path / "store")
    args = ("--store", store, "--no-sample", *options(small_corpus, max_steps=8))
    torchrun("train", "straight", *args, nproc=3)
    torchrun("train", "split", "--stop-at", "3", *args, nproc=3)
    torchrun("resume", "split", "--store", store, "--no-sample", nproc=3)
    s = Store(store)
    assert_same_state(s.run("split").load(), s.run("straight").load())


def test_resume_at_another_world_size(ddp, tmp_path, small_corpus):
    """A 2-rank checkpoint continued by 1 process, a 1-process one by 2 ranks: same samples,
    allclose weights; a global batch that cannot be split is refused naming the fields."""
    store, root = ddp
    mmnb("branch", "two", "--step", "10", "--name", "two-on-1", "--store", str(store.path),
         "--no-sample")  # fmt: skip
    assert_close(store.run("two-on-1").load(), store.run("two").load())
    log = root / "log-1to2"
    os.environ["MMNB_SAMPLE_LOG"] = str(log)
    try:
        torchrun("branch", "one", "--step", "10", "--name", "one-on-2", "--store",
                 str(store.path), "--no-sample")  # fmt: skip
    finally:
        del os.environ["MMNB_SAMPLE_LOG"]
    moved = store.run("one-on-2")
    assert_close(moved.load(), store.run("one").load())
    assert samples(log) == [r for r in samples(root / "log1") if r[0] >= 10]
    session = moved.info()["history"][-1]["session"]
    assert (session["world_size"], session["accum"]) == (2, 1)
    # 1 process x accum 2 is 2 micro-batches a step: 3 processes cannot share them evenly.
    before = [s.step for s in store.run("one").steps()]
    proc = torchrun("resume", "one", "--store", str(store.path), "--no-sample", nproc=3,
                    check=False)  # fmt: skip
    assert proc.returncode != 0
    line = [x for x in proc.stderr.splitlines() if x.startswith("mmnb: error:")]
    assert len(line) == 1, proc.stderr[-2000:]  # rank 0 says it once
    assert "world_size 1 x batch_size 4 x accum 2" in line[0] and "3 processes" in line[0]
    assert [s.step for s in store.run("one").steps()] == before  # the store is unchanged


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory, small_corpus):
    """A 2-rank FSDP2 run whose rank 1 is killed while it writes its shard of step 20, and the
    same run uninterrupted with the full state dict of every checkpoint recorded."""
    root = tmp_path_factory.mktemp("fsdp")
    store = str(root / "store")
    args = ("--store", store, "--no-sample", "--save-every", "10", "--shard",
            *options(small_corpus, layers=2))  # fmt: skip
    torchrun("train", "full", *args, test={"full_state": str(root / "full")})
    crashed = torchrun("train", "crash", *args, test={"kill_in_shard_write": 20, "rank": 1},
                       check=False)  # fmt: skip
    return Store(store), root, crashed


def test_fsdp_checkpoint_is_whole_tensors_for_plain_h5py(fsdp):
    store, root, _ = fsdp
    run = store.run("full")
    ckpt = run.path / "ckpt"
    assert {p.name for p in ckpt.glob("00000040*")} == {
        "00000040.h5", "00000040.rank0.h5", "00000040.rank1.h5"}  # fmt: skip
    full = np.load(root / "full" / "40.npz")
    _check_plain_h5py(run.run_file, full)
    # mmnb's own loader checks every shard's checksum and gives the same whole tensors.
    state = run.load()
    for name in full.files:
        assert np.array_equal(state["model"][name].numpy(), full[name])
    assert run.latest().bytes == sum(p.stat().st_size for p in ckpt.glob("00000040*"))


def _check_plain_h5py(run_file: Path, full: np.lib.npyio.NpzFile) -> None:
    """Read the newest checkpoint with plain h5py (every object is closed on return)."""
    with h5py.File(run_file, "r") as f:  # through the run file's external links
        model = f["steps/00000040/model"]
        assert set(model) == set(full.files)
        for name in full.files:
            assert model[name].is_virtual
            assert np.array_equal(model[name][()], full[name]), name  # fp32: bit-equal
        moments = f["steps/00000040/optim/state/model.norm.weight/exp_avg"]
        assert moments.is_virtual and moments.shape == full["model.norm.weight"].shape
        sources = {vs.file_name for vs in model["model.norm.weight"].virtual_sources()}
        assert sources == {"00000040.rank0.h5", "00000040.rank1.h5"}


def test_kill_during_sharded_write_commits_nothing_and_resumes_bitwise(fsdp):
    store, _, crashed = fsdp
    assert crashed.returncode != 0
    run = store.run("crash")
    assert [s.step for s in run.steps()] == [0, 10]  # step 20 never became a checkpoint
    ckpt = run.path / "ckpt"
    assert not (ckpt / "00000020.h5").exists()
    assert (ckpt / "00000020.rank1.h5").exists()  # rank 1's shard was on disk when it died
    mmnb("runs", "--store", str(store.path))  # listing ignores the orphan shard
    torchrun("resume", "crash", "--store", str(store.path), "--no-sample", "--shard")
    assert not (ckpt / "00000020.rank1.h5").exists() or (ckpt / "00000020.h5").exists()
    assert_same_state(run.load(), store.run("full").load())  # FSDP2 at 2 ranks: bitwise


def test_fsdp_checkpoint_loads_into_one_process_and_ddp(fsdp):
    store, root, _ = fsdp
    model, _ = load_model(store.run("crash"), 10)
    full = np.load(root / "full" / "10.npz")
    for name, tensor in model.state_dict().items():
        assert np.array_equal(tensor.numpy(), full[name]), name
    path = str(store.path)
    mmnb("branch", "crash", "--step", "10", "--name", "on-1", "--store", path, "--no-sample")
    torchrun("branch", "crash", "--step", "10", "--name", "on-ddp", "--store", path,
             "--no-sample")  # fmt: skip
    ref = store.run("full").load()
    for name in ("on-1", "on-ddp"):
        state = store.run(name).load()
        assert_close(state, ref)
        assert state["trainer"]["mode"] == ("single" if name == "on-1" else "ddp")


def test_killed_rank_restarts_and_ends_bitwise(ddp, tmp_path, small_corpus):
    """SIGKILL of rank 1 at step 17 with --max-restarts 2: the agent restarts both ranks, which
    resume from the newest checkpoint (10) by themselves; the result equals the straight run."""
    store = str(tmp_path / "store")
    torchrun("train", "elastic", "--store", store, "--no-sample", "--save-every", "10",
             *options(small_corpus), agent=("--max-restarts=2",),
             test={"kill_at_step": 17, "rank": 1})  # fmt: skip
    run = Store(store).run("elastic")
    assert_same_state(run.load(), ddp[0].run("two").load())
    restarts = [h["session"]["restarts"] for h in run.info()["history"] if "session" in h]
    assert restarts == [0, 1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_agents_as_two_nodes(ddp, tmp_path, small_corpus):
    """torchrun's multi-node path on one machine: two agents, one rank each, c10d rendezvous."""
    store = str(tmp_path / "store")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
               "--rdzv-id=two-nodes", WORKER, "train", "nodes", "--store", store, "--no-sample",
               "--save-every", "10", *options(small_corpus)]  # fmt: skip
    agents = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for _ in range(2)]  # fmt: skip
    try:
        outputs = [a.communicate(timeout=180) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    assert [a.returncode for a in agents] == [0, 0], outputs[0][1].decode()[-2000:]
    printed = [out.decode() for out, _ in outputs]
    assert sum("run nodes: step 40" in text for text in printed) == 1  # rank 0's agent only
    run = Store(store).run("nodes")
    assert run.info()["history"][0]["session"]["world_size"] == 2
    assert_same_state(run.load(), ddp[0].run("two").load())


def test_train_nproc_in_a_real_kernel(tmp_path, micro):
    """`%train --nproc 2` in a kernel: the dashboard shows rank 0's progress from the event
    stream; Kernel → Interrupt checkpoints the group; `%resume --nproc 2` completes it."""
    from test_kernel import TIMEOUT, _collect, _stdout, execute, kernel

    store = Store(tmp_path / "store")
    opts = " ".join(cli_args({**micro, "max_steps": 400}))
    with kernel(tmp_path) as (km, kc):
        msg_id = kc.execute(f"%train g --nproc 2 --save-every 2 --no-sample {opts}")
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            latest = store.run("g").latest() if (store.path / "g" / "run.h5").exists() else None
            if latest is not None and latest.step >= 4:
                break
            time.sleep(0.02)
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=TIMEOUT)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = kc.get_shell_msg(timeout=TIMEOUT)
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        messages = _collect(kc, msg_id)
        latest = store.run("g").latest()
        assert "interrupt" in latest.reasons and 4 <= latest.step < 400
        assert _stdout(messages).splitlines() == [
            f"interrupted: step {latest.step} of run g is checkpointed in "
            f"{store.path / 'g' / 'run.h5'} (%resume g --nproc N continues it)"
        ]
        # Rank 0's progress reached the dashboard (fed from the run's event stream by a
        # thread): its final state, the static fallback a saved notebook shows.
        displays = [m for m in messages if "display" in m["msg_type"]]
        assert "application/vnd.jupyter.widget-view+json" in displays[0]["content"]["data"]
        final = displays[-1]["content"]["data"]["text/plain"]
        assert f"step {latest.step}/400" in final and f"saved step {latest.step}" in final, final
        until = latest.step + 2  # a short second session: the launch is what is tested
        reply, out, _ = execute(
            kc, f"%resume g --nproc 2 --no-sample --stop-at {until}", name="run.name"
        )
        assert value_of(reply, "name") == "'g'"
        assert out.startswith(f"run g: step {until}, loss "), out
    sessions = [h["session"] for h in store.run("g").info()["history"] if "session" in h]
    assert [(s["world_size"], s["mode"]) for s in sessions] == [(2, "ddp"), (2, "ddp")]


def value_of(reply: dict, name: str) -> str:
    return reply["user_expressions"][name]["data"]["text/plain"]
