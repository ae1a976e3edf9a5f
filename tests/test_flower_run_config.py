"""Run-config arguments for ``flwr run``: every value must come back unchanged from Flower's own parser."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from server.launch import run_command
from simulations.experiments import resolve_run_config
from simulations.flower_run_config import format_run_config, format_toml_value


def parse_with_flower(arguments: list[str]) -> dict:
    """Parse ``--run-config`` arguments with Flower's own parser, as ``flwr run`` does."""
    return parse_config_args(arguments)


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        0,
        -3,
        10**12,
        0.1,
        1.0,
        -2.5,
        1e-05,
        1e20,
        "",
        "mnist",
        "two words",
        'say "hi"',
        "it's",
        "both ' and \"",
        "back\\slash",
        "a=b c=d",
        "line\nbreak\ttab",
        "ünïcödé",
        "/tmp/run dir/out",
    ],
)
def test_value_round_trips_through_flower(value):
    parsed = parse_with_flower(format_run_config({"key": value}))

    assert parsed == {"key": value}
    assert type(parsed["key"]) is type(value)


def test_floats_keep_decimal_point():
    arguments = format_run_config({"lr": 0.1, "alpha": 1.0, "momentum": 0.0})

    assert arguments == ["lr=0.1", "alpha=1.0", "momentum=0.0"]
    assert all(isinstance(value, float) for value in parse_with_flower(arguments).values())


def test_non_finite_floats_round_trip():
    parsed = parse_with_flower(format_run_config({"low": float("-inf"), "high": float("inf"), "missing": float("nan")}))

    assert parsed["low"] == float("-inf")
    assert parsed["high"] == float("inf")
    assert math.isnan(parsed["missing"])


def test_strings_are_quoted():
    assert format_toml_value("mnist") == '"mnist"'
    assert format_toml_value("two words") == '"two words"'
    assert format_toml_value('say "hi"') == '"say \\u0022hi\\u0022"'


def test_booleans_are_toml_booleans():
    assert format_toml_value(True) == "true"
    assert format_toml_value(False) == "false"


def test_resolved_experiment_round_trips(tmp_path):
    run_config = resolve_run_config("digits-fedavg", {"out-dir": str(tmp_path / "a run dir")})

    parsed = parse_with_flower(format_run_config(run_config))

    assert parsed == run_config
    for key, value in run_config.items():
        assert type(parsed[key]) is type(value), key


def test_one_argument_per_key():
    arguments = format_run_config({"num-server-rounds": 3, "dataset": "digits", "lr": 0.1})

    assert arguments == ["num-server-rounds=3", 'dataset="digits"', "lr=0.1"]


@pytest.mark.parametrize("value", [None, [1, 2], {"a": 1}, b"bytes"])
def test_non_scalar_value_rejected(value):
    with pytest.raises(TypeError, match="'key'"):
        format_run_config({"key": value})


@pytest.mark.parametrize("key", ["", "has space", "quote\"", "a=b", "trailing."])
def test_invalid_key_rejected(key):
    with pytest.raises(ValueError, match="Invalid run-config key"):
        format_run_config({key: 1})


def test_run_command_passes_any_string_to_flower(tmp_path: Path) -> None:
    """Check that a deployment run config with both ``'`` and ``"`` in a value reaches Flower unchanged."""
    overrides = {"out-dir": "it's \"odd\"", "lr": 0.05, "dataset": "digits"}

    command = run_command(tmp_path, "corolla", overrides)

    arguments = [command[index + 1] for index, word in enumerate(command) if word == "--run-config"]
    assert parse_with_flower(arguments) == overrides
    assert command[-2:] == ["--format", "json"]


def test_run_command_without_overrides_has_no_run_config(tmp_path: Path) -> None:
    assert "--run-config" not in run_command(tmp_path, "corolla", {})
