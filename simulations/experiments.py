"""Run-configuration keys, their defaults and the experiment presets.

A run configuration is a flat mapping of kebab-case keys to TOML scalars, as in
Flower's ``[tool.flwr.app.config]``. An experiment is a named preset of such
values; ``--set key=value`` overrides any of them. ``resolve_run_config`` is the
single place that merges defaults, a preset and overrides and validates the result.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from typing import Any

Scalar = bool | int | float | str


class ConfigError(ValueError):
    """Raised for an unknown key, a value of the wrong type or an invalid value."""


@dataclass(frozen=True)
class ConfigKey:
    """One run-configuration key: its default value and what it sets."""

    name: str
    default: Scalar
    help: str


CONFIG_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey("experiment", "custom", "Name recorded in the run directory and summary."),
    ConfigKey("strategy", "fedavg", "Server strategy, by name (see `corolla list`)."),
    ConfigKey("num-server-rounds", 3, "Number of federated rounds."),
    ConfigKey("num-clients", 10, "Number of clients (simulation nodes or partitions)."),
    ConfigKey("fraction-train", 1.0, "Fraction of connected nodes sampled for training each round."),
    ConfigKey("fraction-evaluate", 1.0, "Fraction of connected nodes sampled for federated evaluation."),
    ConfigKey("seed", 0, "Seed for the model initialisation, partitioning, sampling and local data order."),
    ConfigKey("dataset", "mnist", "Dataset, by name (see `corolla list`)."),
    ConfigKey("data-dir", "", "Directory with the dataset's files; empty uses the packaged copy."),
    ConfigKey("partition", "dirichlet", "Partitioner: iid, dirichlet, shards or natural."),
    ConfigKey("alpha", 0.5, "Dirichlet concentration over labels (partition = dirichlet); must be > 0."),
    ConfigKey("classes-per-client", 2, "Classes per client (partition = shards)."),
    ConfigKey("model", "mlp", "Model, by name: mlp, lenet5 or cnn."),
    ConfigKey("optimizer", "sgd", "Client optimizer: sgd or adam."),
    ConfigKey("lr", 0.05, "Client learning rate."),
    ConfigKey("momentum", 0.0, "SGD momentum (optimizer = sgd)."),
    ConfigKey("weight-decay", 0.0, "L2 weight decay of the client optimizer."),
    ConfigKey("local-epochs", 1, "Local epochs per round (used when local-steps = 0)."),
    ConfigKey("local-steps", 0, "Local minibatch steps per round; 0 means use local-epochs."),
    ConfigKey("batch-size", 32, "Client minibatch size; 0 means full-batch gradient descent."),
    ConfigKey("eval-batch-size", 1000, "Batch size for evaluation."),
    ConfigKey("proximal-mu", 0.0, "FedProx proximal coefficient mu (strategy = fedprox)."),
    ConfigKey("q", 0.1, "q-FFL fairness exponent q (strategy = qfedavg)."),
    ConfigKey("extensions", "", "Comma-separated run extensions (extra evaluations), such as fairness."),
    ConfigKey("client-threads", 0, "torch threads per client process; 0 keeps torch's default."),
    ConfigKey("out-dir", "", "Run directory (absolute); empty writes runs/<time>-<experiment> under the working directory."),
)

DEFAULTS: dict[str, Scalar] = {key.name: key.default for key in CONFIG_KEYS}


@dataclass(frozen=True)
class Experiment:
    """A named preset of run-configuration values."""

    name: str
    description: str
    values: dict[str, Scalar]


EXPERIMENTS: dict[str, Experiment] = {
    experiment.name: experiment
    for experiment in (
        Experiment(
            "mnist-fedavg",
            "FedAvg on MNIST, 10 clients with a Dirichlet(0.5) label split, 784-200-10 MLP.",
            {
                "strategy": "fedavg",
                "dataset": "mnist",
                "partition": "dirichlet",
                "alpha": 0.5,
                "num-clients": 10,
                "num-server-rounds": 10,
                "model": "mlp",
                "optimizer": "sgd",
                "lr": 0.05,
                "momentum": 0.9,
                "local-epochs": 1,
                "batch-size": 32,
            },
        ),
        Experiment(
            "digits-fedavg",
            "FedAvg on scikit-learn's 8x8 digits, 10 IID clients; finishes in seconds.",
            {
                "strategy": "fedavg",
                "dataset": "digits",
                "partition": "iid",
                "num-clients": 10,
                "num-server-rounds": 3,
                "model": "mlp",
                "optimizer": "sgd",
                "lr": 0.1,
                "local-epochs": 1,
                "batch-size": 16,
            },
        ),
    )
}


def parse_override(text: str) -> tuple[str, Scalar]:
    """Parse one ``key=value`` override; the value is read as a TOML scalar.

    A value that is not valid TOML (``dataset=mnist``) is taken as a string.
    """
    if "=" not in text:
        raise ConfigError(f"Invalid override {text!r}: expected key=value, for example num-server-rounds=5.")
    key, raw = (part.strip() for part in text.split("=", 1))
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    if not isinstance(value, (bool, int, float, str)):
        raise ConfigError(f"Invalid value for {key!r}: {raw!r} is not a scalar (bool, int, float or string).")
    return key, value


def _coerce(key: str, value: Any) -> Scalar:
    """Convert ``value`` to the type of the key's default, or raise ConfigError."""
    default = DEFAULTS[key]
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, str):
        return value
    raise ConfigError(
        f"Invalid value for {key!r}: {value!r} ({type(value).__name__}); "
        f"expected a {type(default).__name__} such as {default!r}."
    )


def resolve_run_config(
    experiment: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Scalar]:
    """Merge defaults, an experiment preset and overrides into a validated run config."""
    config: dict[str, Scalar] = dict(DEFAULTS)
    if experiment is not None:
        if experiment not in EXPERIMENTS:
            known = ", ".join(sorted(EXPERIMENTS))
            raise ConfigError(f"Unknown experiment {experiment!r}; choose one of: {known}.")
        config.update(EXPERIMENTS[experiment].values)
        config["experiment"] = experiment
    for key, value in (overrides or {}).items():
        if key not in DEFAULTS:
            raise ConfigError(f"Unknown run-config key {key!r}; `corolla list` shows the valid keys.")
        config[key] = _coerce(key, value)
    validate_run_config(config)
    return config


def validate_run_config(config: dict[str, Any]) -> None:
    """Check value ranges that do not depend on the data; raise ConfigError with the fix."""
    checks = (
        ("num-server-rounds", config["num-server-rounds"] >= 1, "must be at least 1"),
        ("num-clients", config["num-clients"] >= 1, "must be at least 1"),
        ("fraction-train", 0.0 < config["fraction-train"] <= 1.0, "must be in (0, 1]"),
        ("fraction-evaluate", 0.0 <= config["fraction-evaluate"] <= 1.0, "must be in [0, 1]"),
        ("lr", config["lr"] > 0.0, "must be positive"),
        ("local-epochs", config["local-epochs"] >= 1 or config["local-steps"] >= 1, "must be at least 1 when local-steps = 0"),
        ("local-steps", config["local-steps"] >= 0, "must be 0 (use epochs) or positive"),
        ("batch-size", config["batch-size"] >= 0, "must be 0 (full batch) or positive"),
        ("eval-batch-size", config["eval-batch-size"] >= 1, "must be at least 1"),
        ("proximal-mu", config["proximal-mu"] >= 0.0, "must be non-negative"),
        ("client-threads", config["client-threads"] >= 0, "must be 0 (torch default) or positive"),
    )
    for key, valid, requirement in checks:
        if not valid:
            raise ConfigError(f"Invalid {key} = {config[key]!r}: it {requirement}.")

    sampled = int(config["fraction-train"] * config["num-clients"])
    if sampled < 1:
        raise ConfigError(
            f"fraction-train = {config['fraction-train']!r} of num-clients = {config['num-clients']} "
            f"samples no client; set fraction-train to at least {1 / config['num-clients']:.4g}."
        )
