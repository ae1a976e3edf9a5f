"""Run-configuration resolution: presets, overrides and up-front validation."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from simulations.experiments import DEFAULTS, EXPERIMENTS, ConfigError, parse_override, resolve_run_config

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_app_config_has_every_key():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    assert set(app_config) == set(DEFAULTS)


def test_pyproject_app_config_is_mnist_fedavg():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    assert app_config == resolve_run_config("mnist-fedavg")


def test_pyproject_components_name_the_apps():
    components = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "server.app:app", "clientapp": "client.app:app"}


def test_override_values_are_toml_scalars():
    assert parse_override("num-server-rounds=5") == ("num-server-rounds", 5)
    assert parse_override("lr=0.1") == ("lr", 0.1)
    assert parse_override("dataset=digits") == ("dataset", "digits")
    assert parse_override('dataset="mnist"') == ("dataset", "mnist")


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("num-server-rounds")


def test_preset_and_override_are_merged():
    config = resolve_run_config("mnist-fedavg", {"num-server-rounds": 2, "lr": 1})
    assert config["num-server-rounds"] == 2
    assert config["lr"] == 1.0
    assert isinstance(config["lr"], float)
    assert config["alpha"] == EXPERIMENTS["mnist-fedavg"].values["alpha"]
    assert config["experiment"] == "mnist-fedavg"


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match="'num-round'"):
        resolve_run_config("digits-fedavg", {"num-round": 2})


def test_unknown_experiment_lists_the_known_ones():
    with pytest.raises(ConfigError, match="digits-fedavg"):
        resolve_run_config("no-such-experiment")


def test_wrong_type_names_value_and_expected_type():
    with pytest.raises(ConfigError, match="expected a value of type int"):
        resolve_run_config("digits-fedavg", {"num-clients": "ten"})


def test_zero_clients_is_rejected():
    with pytest.raises(ConfigError, match="num-clients = 0"):
        resolve_run_config("digits-fedavg", {"num-clients": 0})


def test_fraction_that_samples_no_client_is_rejected():
    with pytest.raises(ConfigError, match="samples no client"):
        resolve_run_config("digits-fedavg", {"num-clients": 10, "fraction-train": 0.05})


def test_fraction_of_one_client_is_accepted():
    config = resolve_run_config("digits-fedavg", {"num-clients": 10, "fraction-train": 0.1})
    assert config["fraction-train"] == 0.1


@pytest.mark.parametrize("key", ["q", "eta-lambda", "fedmgda-lr", "stch-mu", "lr"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_float_is_rejected(key, value):
    with pytest.raises(ConfigError, match=f"Invalid {key} = .*finite number"):
        resolve_run_config("fair-cps1988", {key: value})


def test_integer_beyond_int64_is_rejected():
    with pytest.raises(ConfigError, match="integers in 64 bits"):
        resolve_run_config("digits-fedavg", {"num-server-rounds": 2**63})


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
def test_seed_outside_32_bits_is_rejected(seed):
    with pytest.raises(ConfigError, match="Invalid seed"):
        resolve_run_config("digits-fedavg", {"seed": seed})


def test_largest_32_bit_seed_is_accepted():
    assert resolve_run_config("digits-fedavg", {"seed": 2**32 - 1})["seed"] == 2**32 - 1


def test_strategy_keys_name_real_keys_and_strategies():
    from strategies import STRATEGIES, STRATEGY_KEYS

    for key, strategies in STRATEGY_KEYS.items():
        assert key in DEFAULTS, key
        assert set(strategies) <= set(STRATEGIES), key


def test_building_strategy_omits_skipped_evaluation_warning():
    import logging

    from strategies import build_strategy

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(level=logging.DEBUG)
    flower_logger = logging.getLogger("flwr")
    flower_logger.addHandler(handler)
    try:
        build_strategy(resolve_run_config("fair-cps1988", {"strategy": "fedavg"}))
    finally:
        flower_logger.removeHandler(handler)

    assert not [message for message in messages if "fraction_evaluate" in message]
