"""Run-configuration keys, their defaults and the experiment presets.

A run configuration is a flat mapping of kebab-case keys to TOML scalars, as in
Flower's ``[tool.flwr.app.config]``. An experiment is a named preset of such
values; ``--set key=value`` overrides any of them. ``resolve_run_config`` is the
single place that merges defaults, a preset and overrides and validates the result.
"""

from __future__ import annotations

import logging
import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Scalar = bool | int | float | str

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_SEED = 2**32 - 1


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
    ConfigKey("q", 0.1, "q-FFL fairness exponent q (strategies qfedavg and qffl)."),
    ConfigKey("eta-lambda", 0.1, "Step size of the client-weight update λ (strategies omd-tch, adaomd-tch, afl); 0 keeps λ uniform."),
    ConfigKey("omd-step", "entropic", "Mirror-descent step on λ: entropic (exponentiated gradient) or euclidean (projected gradient)."),
    ConfigKey("normalize-losses", False, "Divide each client's loss by its first reported value before it enters λ (Tchebycheff strategies)."),
    ConfigKey("preference-weights", "", "Preference weight per client, comma-separated positive numbers; empty means all ones."),
    ConfigKey("lambda-loss", "initial", "Client loss that drives λ: initial (at the global model) or local-mean (mean over the local steps)."),
    ConfigKey("stch-mu", 1.0, "Temperature mu of smooth Tchebycheff (strategy = stch); small values approach tch."),
    ConfigKey("fedmgda-epsilon", 0.1, "FedMGDA+ bound on |λ_k - 1/m|; 0 fixes uniform weights, 1 allows any convex combination."),
    ConfigKey("fedmgda-lr", 1.0, "FedMGDA+ server step size; the step is at most this long in parameter space."),
    ConfigKey("fedgtst-xi", 0.01, "FedGTST penalty coefficient xi >= 0 (strategy = fedgtst); 0 trains as FedAvg."),
    ConfigKey("fedgtst-target", "max", "FedGTST target rule: max (largest reported gradient norm) or scaled-mean."),
    ConfigKey("fedgtst-target-scale", 1.5, "FedGTST scaled-mean rule: target = this factor times the mean gradient norm."),
    ConfigKey("fedgtst-protocol", "scalar", "FedGTST exchange: scalar (gradient norms) or vector (full gradients)."),
    ConfigKey("fedgtst-norm", "minibatch", "FedGTST client norm: minibatch (mean minibatch gradient norm) or full (full-data gradient norm)."),
    ConfigKey("fedgtst-warmup-rounds", 1, "FedGTST rounds trained without the penalty (at least 1: round 1 has no target yet)."),
    ConfigKey("fedsr-l2-coeff", 0.01, "FedSR weight of the L2 penalty on the sampled representation (strategy = fedsr)."),
    ConfigKey("fedsr-cmi-coeff", 0.0005, "FedSR weight of the conditional mutual-information bound (strategy = fedsr)."),
    ConfigKey("fediir-penalty", 0.001, "FedIIR weight of the classifier-gradient alignment penalty (strategy = fediir)."),
    ConfigKey("fediir-ema", 0.95, "FedIIR moving-average weight of the previous mean classifier gradient, in [0, 1)."),
    ConfigKey("client-statistic-examples", 0, "Local examples on which FedGTST and FedIIR clients measure their gradient each round; 0 uses all."),
    ConfigKey("transfer-target", "", "Target dataset of the transfer extension, such as mnistm-synthetic or optdigits-28."),
    ConfigKey("transfer-data-dir", "", "Directory with the transfer target's files; empty uses the packaged or built copy."),
    ConfigKey("transfer-train-examples", 0, "Target training examples for the linear probe and the target-only reference; 0 uses all."),
    ConfigKey("transfer-epochs", 20, "Adam epochs of the linear probe on the target."),
    ConfigKey("transfer-lr", 0.01, "Adam learning rate of the linear probe on the target."),
    ConfigKey("transfer-target-only-epochs", 3, "Adam epochs of the target-only reference (the network trained on the target alone)."),
    ConfigKey("transfer-patience", 0, "Early stopping: rounds without a lower global training loss before the kept model is final; 0 never stops."),
    ConfigKey("transfer-loss-examples", 10000, "Source training examples on which the global training loss is computed each round; 0 uses all."),
    ConfigKey("extensions", "", "Comma-separated run extensions (extra evaluations), such as fairness."),
    ConfigKey("client-threads", 1, "torch intra-op threads per client; 0 keeps torch's default. One thread avoids oversubscribed cores when several clients or runs share a machine."),
    ConfigKey("node-wait-timeout", 600.0, "Seconds the server waits for num-clients nodes to be connected before a round; the run fails after that. 0 waits forever."),
    ConfigKey("out-dir", "", "Run directory (absolute); empty writes runs/<time>-<experiment> under the working directory."),
)

DEFAULTS: dict[str, Scalar] = {key.name: key.default for key in CONFIG_KEYS}


@dataclass(frozen=True)
class Experiment:
    """A named preset of run-configuration values."""

    name: str
    description: str
    values: dict[str, Scalar]


# The rotated-MNIST protocol of Liu et al. (2024, arXiv 2410.21764). Clients evaluate nothing
# themselves (fraction-evaluate 0) because the fairness extension evaluates every client's
# test split on the server each round.
_FAIR_ROTATED_MNIST: dict[str, Scalar] = {
    "strategy": "adaomd-tch",
    "omd-step": "entropic",
    "eta-lambda": 0.1,
    "dataset": "rotated-mnist",
    "partition": "natural",
    "num-clients": 10,
    "fraction-train": 1.0,
    "fraction-evaluate": 0.0,
    "num-server-rounds": 300,
    "model": "mlp",
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.0,
    "batch-size": 0,
    "local-steps": 10,
    "extensions": "fairness",
}

# FedGTST's transfer protocol (Ma et al., NeurIPS 2024): LeNet, K = 10 clients with two label
# shards each, full participation, 10 local steps of plain SGD per round, early stopping on the
# global training loss, then an Adam-fitted linear probe on the target. The client statistic, the
# probe's target split and the global training loss use subsets, and clients evaluate nothing
# themselves (fraction-evaluate 0), so that a run takes about two minutes of one CPU core
# (benchmarks/transfer_table.py; docs/results/transfer.md has the measured times).
_TRANSFER_MNIST_MNISTM: dict[str, Scalar] = {
    "strategy": "fedavg",
    "dataset": "mnist-rgb",
    "partition": "shards",
    "classes-per-client": 2,
    "num-clients": 10,
    "fraction-train": 1.0,
    "fraction-evaluate": 0.0,
    "num-server-rounds": 25,
    "model": "lenet5",
    "optimizer": "sgd",
    "lr": 0.05,
    "momentum": 0.0,
    "local-steps": 10,
    "batch-size": 64,
    "client-threads": 1,
    "client-statistic-examples": 1024,
    # The norms of round 1 are measured at the random initialization and mislead round 2.
    "fedgtst-warmup-rounds": 2,
    "extensions": "transfer",
    "transfer-target": "mnistm-synthetic",
    "transfer-train-examples": 10000,
    "transfer-epochs": 20,
    "transfer-lr": 0.01,
    "transfer-target-only-epochs": 3,
    "transfer-patience": 5,
    "transfer-loss-examples": 5000,
}

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
        Experiment(
            "fair-rotated-mnist",
            "Fairness protocol of OMD-TCH (arXiv 2410.21764): rotated MNIST, 10 clients, 784-200-10 MLP, "
            "full-batch GD, 10 local steps, lr 0.1, 300 rounds; AdaOMD-TCH (entropic, eta-lambda 0.1).",
            _FAIR_ROTATED_MNIST,
        ),
        Experiment(
            "fair-rotated-mnist-small",
            "fair-rotated-mnist with a fifth of each client's training examples and 100 rounds.",
            {**_FAIR_ROTATED_MNIST, "dataset": "rotated-mnist-small", "num-server-rounds": 100},
        ),
        Experiment(
            "fair-cps1988",
            "CPS1988 wages above the median, one client per region (4), 8-200-2 MLP, full-batch GD; AdaOMD-TCH.",
            {
                **_FAIR_ROTATED_MNIST,
                "dataset": "cps1988",
                "num-clients": 4,
                "num-server-rounds": 100,
                "lr": 0.5,
            },
        ),
        Experiment(
            "transfer-mnist-mnistm",
            "Transfer MNIST -> MNIST-M-style target: FedAvg pretraining of LeNet-5 on 3-channel MNIST, 10 clients "
            "with 2 label shards each, then a linear probe on the target (set strategy to fedgtst, fedsr or fediir).",
            _TRANSFER_MNIST_MNISTM,
        ),
        Experiment(
            "transfer-mnist-optdigits",
            "Transfer MNIST -> optdigits scaled to 28x28: as transfer-mnist-mnistm with 1-channel MNIST as the source.",
            {**_TRANSFER_MNIST_MNISTM, "dataset": "mnist", "transfer-target": "optdigits-28", "transfer-train-examples": 0},
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


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """Parse ``--set KEY=VALUE`` pairs, raising ConfigError for a key given twice."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, value = parse_override(pair)
        if key in overrides:
            raise ConfigError(f"--set {key} is given twice ({overrides[key]!r} and {value!r}); keep one of them.")
        overrides[key] = value
    return overrides


def check_component_names(config: dict[str, Any]) -> None:
    """Raise ConfigError unless the dataset, model, partitioner and extensions of ``config`` exist."""
    from client.models import MODELS
    from server.extensions import EXTENSIONS
    from simulations.datasets import DATASETS
    from simulations.partition import PARTITIONERS

    for key, known in (("dataset", DATASETS), ("model", MODELS), ("partition", PARTITIONERS)):
        if config[key] not in known:
            raise ConfigError(f"Unknown {key} {config[key]!r}; choose one of: {', '.join(known)}.")
    for name in str(config["extensions"]).split(","):
        if name.strip() and name.strip() not in EXTENSIONS:
            raise ConfigError(f"Unknown run extension {name.strip()!r}; choose one of: {', '.join(sorted(EXTENSIONS))}.")


def check_run_config(run_config: dict[str, Any], explicit_keys: Sequence[str]) -> None:
    """Raise ValueError for a run config that the ServerApp would reject, before the run starts.

    ``corolla simulate``, ``corolla sweep`` and ``corolla run`` make these checks: known
    component names, a strategy that builds from the config, and no key in
    ``explicit_keys`` (the ones the user set) that the strategy ignores. Building a
    strategy only stores its settings, so the check is cheap.
    """
    from strategies import build_strategy, check_keys_take_effect

    check_component_names(run_config)
    # Flower's strategies log warnings about their settings when built. The ServerApp
    # builds the strategy again and logs them there.
    flower_logger = logging.getLogger("flwr")
    level = flower_logger.level
    flower_logger.setLevel(logging.ERROR)
    try:
        build_strategy(run_config)
    finally:
        flower_logger.setLevel(level)
    check_keys_take_effect(str(run_config["strategy"]), explicit_keys)


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
        f"expected a value of type {type(default).__name__}, such as {default!r}."
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
    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"Invalid {key} = {value!r}: it must be a finite number.")
        if isinstance(value, int) and not isinstance(value, bool) and not _INT64_MIN <= value <= _INT64_MAX:
            raise ConfigError(
                f"Invalid {key} = {value!r}: Flower stores run-config integers in 64 bits, from {_INT64_MIN} to {_INT64_MAX}."
            )
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
        ("q", config["q"] >= 0.0, "must be non-negative"),
        ("eta-lambda", config["eta-lambda"] >= 0.0, "must be non-negative"),
        ("omd-step", config["omd-step"] in ("entropic", "euclidean"), "must be entropic or euclidean"),
        ("lambda-loss", config["lambda-loss"] in ("initial", "local-mean"), "must be initial or local-mean"),
        ("stch-mu", config["stch-mu"] > 0.0, "must be positive"),
        ("fedmgda-epsilon", config["fedmgda-epsilon"] >= 0.0, "must be non-negative"),
        ("fedmgda-lr", config["fedmgda-lr"] > 0.0, "must be positive"),
        ("fedgtst-xi", config["fedgtst-xi"] >= 0.0, "must be non-negative"),
        ("fedgtst-target", config["fedgtst-target"] in ("max", "scaled-mean"), "must be max or scaled-mean"),
        ("fedgtst-target-scale", config["fedgtst-target-scale"] > 0.0, "must be positive"),
        ("fedgtst-protocol", config["fedgtst-protocol"] in ("scalar", "vector"), "must be scalar or vector"),
        ("fedgtst-norm", config["fedgtst-norm"] in ("minibatch", "full"), "must be minibatch or full"),
        ("fedgtst-warmup-rounds", config["fedgtst-warmup-rounds"] >= 1, "must be at least 1 (round 1 has no target)"),
        ("fedsr-l2-coeff", config["fedsr-l2-coeff"] >= 0.0, "must be non-negative"),
        ("fedsr-cmi-coeff", config["fedsr-cmi-coeff"] >= 0.0, "must be non-negative"),
        ("fediir-penalty", config["fediir-penalty"] >= 0.0, "must be non-negative"),
        ("fediir-ema", 0.0 <= config["fediir-ema"] < 1.0, "must be in [0, 1)"),
        ("client-statistic-examples", config["client-statistic-examples"] >= 0, "must be 0 (all) or positive"),
        ("transfer-train-examples", config["transfer-train-examples"] >= 0, "must be 0 (all) or positive"),
        ("transfer-epochs", config["transfer-epochs"] >= 1, "must be at least 1"),
        ("transfer-lr", config["transfer-lr"] > 0.0, "must be positive"),
        ("transfer-target-only-epochs", config["transfer-target-only-epochs"] >= 1, "must be at least 1"),
        ("transfer-patience", config["transfer-patience"] >= 0, "must be 0 (never stop) or positive"),
        ("transfer-loss-examples", config["transfer-loss-examples"] >= 0, "must be 0 (all) or positive"),
        ("client-threads", config["client-threads"] >= 0, "must be 0 (torch default) or positive"),
        ("node-wait-timeout", config["node-wait-timeout"] >= 0.0, "must be 0 (wait forever) or positive"),
        ("seed", 0 <= config["seed"] <= _MAX_SEED, f"must be in [0, {_MAX_SEED}]: torch's CPU generator keeps only a seed's lowest 32 bits, so larger seeds repeat smaller ones"),
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
