import pytest

from mmnb.config import (
    PRESETS,
    ModelConfig,
    config_from_dict,
    config_to_dict,
    parse_duration,
    resolve,
)


def test_every_preset_resolves_and_validates():
    for name in PRESETS:
        model, train = resolve(name)
        assert train.preset == name
        assert model.hidden_size % model.num_attention_heads == 0


def test_default_intermediate_size_is_pi_rounded_to_64():
    assert ModelConfig(hidden_size=768).intermediate_size == 2432
    assert ModelConfig(hidden_size=512).intermediate_size == 1664


def test_overrides_and_aliases():
    model, train = resolve("tiny", layers=3, heads=8, kv_heads=4, lr=1e-3, hidden_size=256)
    assert (model.num_hidden_layers, model.num_attention_heads, model.num_key_value_heads) == (
        3,
        8,
        4,
    )
    assert model.head_dim == 32  # derived from the overridden width
    assert train.lr == 1e-3


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"lr": 0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"accum": -2}, "accum"),
        ({"kv_heads": 3}, "num_key_value_heads"),
        ({"schedule": "linear"}, "schedule"),
        ({"dtype": "fp8"}, "dtype"),
        ({"dropout": 1.5}, "dropout"),
        ({"epochs": 0}, "epochs"),
        ({"lr": float("inf")}, "lr must be a finite number"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"beta2": float("nan")}, "beta2 must be a finite number"),
        ({"grad_clip": float("inf")}, "grad_clip must be a finite number"),
        ({"dropout": float("nan")}, "dropout must be a finite number"),
        ({"min_lr_ratio": float("-inf")}, "min_lr_ratio must be a finite number"),
        ({"log_every": 0}, "log_every must be positive"),
        ({"stop_at": 0}, "stop_at must be positive"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        resolve("tiny", **kwargs)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        resolve("huge")
    with pytest.raises(ValueError, match="unknown config field 'colour'"):
        resolve("tiny", colour="red")


def test_config_json_round_trip():
    pair = resolve("minimind3-moe", lr=1e-4, epochs=3)
    assert config_from_dict(config_to_dict(*pair)) == pair
    with pytest.raises(ValueError, match="format version"):
        config_from_dict({**config_to_dict(*pair), "format_version": 99})


def test_parse_duration():
    assert parse_duration("90") == 90.0
    assert parse_duration("30m") == 1800.0
    assert parse_duration("1.5h") == 5400.0
    with pytest.raises(ValueError, match="duration"):
        parse_duration("soon")
