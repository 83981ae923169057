"""Speed levers keep the contracts: `--compile` changes neither checkpoint keys nor bitwise
split-resume; the optimizer is AdamW's fused kernel."""

from __future__ import annotations

import pytest
import torch

import mmnb
from conftest import assert_same_state
from conftest import mmnb as mmnb_cli
from mmnb.config import resolve
from mmnb.model import MiniMind
from mmnb.speed import compile_model, make_optimizer


def test_compiled_split_resume_equals_straight_run_bitwise(tmp_path, micro):
    # Straight run in this process; the split run resumes in a fresh process, which compiles
    # its own graphs: the trajectory must not depend on which process compiled what.
    options = {**micro, "max_steps": 10, "compile": True}
    events = []
    straight = mmnb.train("straight", store=tmp_path, listeners=[events.append], **options)
    mmnb.train("split", store=tmp_path, stop_at=4, **options)
    mmnb_cli("resume", "split", "--store", str(tmp_path), "--no-sample")
    split = mmnb.Store(tmp_path).run("split")
    assert split.latest().step == 10
    a, b = straight.load(), split.load()
    assert_same_state(a, b)
    # Same checkpoint keys as an eager model: no `_orig_mod.` prefix.
    assert set(a["model"]) == set(MiniMind(resolve(**micro)[0]).state_dict())
    notices = [e.info["text"] for e in events if e.kind == "notice"]
    assert any("compiling" in n for n in notices)
    assert [e.info["threads"] for e in events if e.kind == "start"] == [torch.get_num_threads()]


def test_compile_is_part_of_the_trajectory(tmp_path, micro):
    # Compiled kernels round differently: a plain resume keeps the run's setting.
    mmnb.train("eager", store=tmp_path, stop_at=2, **{**micro, "max_steps": 4})
    with pytest.raises(ValueError, match="compile defines the run's trajectory"):
        mmnb.resume("eager", store=tmp_path, compile=True)


def test_moe_routing_runs_eagerly_under_compile():
    model_cfg, _ = resolve(
        "tiny",
        hidden_size=32,
        layers=1,
        heads=2,
        kv_heads=1,
        intermediate_size=64,
        vocab_size=300,
        moe=True,
        experts=4,
    )
    model = MiniMind(model_cfg, seed=0)
    step = compile_model(model, seq_len=16)
    gen = torch.Generator().manual_seed(0)

    def step_once() -> None:
        x = torch.randint(0, 300, (2, 16), generator=gen)
        step(x, x).loss.backward()

    step_once()
    # Routing differs per batch (tokens per expert): compiled routing would recompile for each
    # pattern, and which graph ran would depend on history. Here nothing recompiles.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            step_once()
    eager = MiniMind(model_cfg, seed=0)
    assert set(eager.state_dict()) == set(model.state_dict())


def test_optimizer_is_fused_on_cpu():
    _, train_cfg = resolve("tiny")
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(3))], train_cfg, torch.device("cpu"))
    assert opt.param_groups[0]["fused"] is True
