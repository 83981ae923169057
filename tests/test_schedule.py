import math

import pytest

from mmnb.schedule import Plan


def test_minimind_cosine_matches_minimind_formula():
    plan = Plan(kind="minimind", lr=5e-4, total=100)
    for step in (0, 25, 50, 99, 100):
        expected = 5e-4 * (0.1 + 0.45 * (1 + math.cos(math.pi * step / 100)))
        assert plan.lr_at(step) == pytest.approx(expected, rel=1e-12)
    assert plan.lr_at(0) == pytest.approx(5e-4)
    assert plan.lr_at(100) == pytest.approx(5e-5)


def test_cosine_with_warmup_and_floor():
    plan = Plan(kind="cosine", lr=1.0, total=110, warmup=10, min_ratio=0.1)
    assert plan.lr_at(0) == pytest.approx(0.1)
    assert plan.lr_at(9) == pytest.approx(1.0)
    assert plan.lr_at(10) == pytest.approx(1.0)
    assert plan.lr_at(60) == pytest.approx(0.55)  # half way: mean of peak and floor
    assert plan.lr_at(110) == pytest.approx(0.1)
    assert plan.lr_at(500) == pytest.approx(0.1)


def test_constant_with_warmup():
    plan = Plan(kind="constant", lr=2.0, total=50, warmup=4)
    assert [plan.lr_at(s) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def test_wsd_stable_phase_does_not_depend_on_horizon():
    short = Plan(kind="wsd", lr=1.0, total=100, warmup=5, decay_fraction=0.2)
    long = Plan(kind="wsd", lr=1.0, total=400, warmup=5, decay_fraction=0.2)
    assert short.decay_start == 80 and long.decay_start == 320
    assert [short.lr_at(s) for s in range(80)] == [long.lr_at(s) for s in range(80)]
    assert short.lr_at(79) == 1.0 and short.lr_at(80) < 1.0
    assert short.lr_at(99) == pytest.approx(0.1)  # the last planned update reaches the floor


def test_wsd_linear_and_sqrt_decay_values():
    lin = Plan(kind="wsd", lr=1.0, total=10, decay_fraction=0.5, min_ratio=0.0)
    assert [lin.lr_at(s) for s in range(5, 10)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])
    sq = Plan(kind="wsd", lr=1.0, total=10, decay_fraction=0.5, min_ratio=0.0, decay_shape="1-sqrt")
    assert sq.lr_at(5) == pytest.approx(1 - math.sqrt(0.2))


def test_plan_with_start_is_shifted():
    base = Plan(kind="wsd", lr=1.0, total=50, warmup=3)
    shifted = Plan(kind="wsd", lr=1.0, total=50, warmup=3, start=200)
    assert shifted.end == 250 and shifted.decay_start == 200 + base.decay_start
    assert [shifted.lr_at(200 + s) for s in range(50)] == [base.lr_at(s) for s in range(50)]


def test_plan_round_trips_as_data():
    plan = Plan(kind="cosine", lr=3e-4, total=77, warmup=7, min_ratio=0.05, start=3)
    assert Plan.from_dict(plan.to_dict()) == plan
