"""Server strategies on Flower's Message API, selected by name in the run config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from strategies.base import ClientRecord, RoundReport, StrategyState, ValidatedStrategy
from strategies.fedavg import FedAvg
from strategies.fedprox import FedProx
from strategies.qfedavg import QFedAvg
from strategies.validation import Rejection, validate_replies


class StrategyError(ValueError):
    """Raised for an unknown strategy name or invalid strategy settings."""


def _sampling(run_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "fraction_train": float(run_config["fraction-train"]),
        "fraction_evaluate": float(run_config["fraction-evaluate"]),
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": int(run_config["num-clients"]),
    }


def _fedavg(run_config: dict[str, Any]) -> ValidatedStrategy:
    return FedAvg(**_sampling(run_config))


def _fedprox(run_config: dict[str, Any]) -> ValidatedStrategy:
    return FedProx(proximal_mu=float(run_config["proximal-mu"]), **_sampling(run_config))


def _qfedavg(run_config: dict[str, Any]) -> ValidatedStrategy:
    return QFedAvg(client_learning_rate=float(run_config["lr"]), q=float(run_config["q"]), **_sampling(run_config))


STRATEGIES: dict[str, tuple[Callable[[dict[str, Any]], ValidatedStrategy], str]] = {
    "fedavg": (_fedavg, "FedAvg: example-weighted mean of client models"),
    "fedprox": (_fedprox, "FedProx: FedAvg with a client-side proximal term (proximal-mu)"),
    "qfedavg": (_qfedavg, "Flower's q-FedAvg (q-FFL): weights clients by loss^q"),
}


def build_strategy(run_config: dict[str, Any]) -> ValidatedStrategy:
    """Build the strategy named by ``run_config["strategy"]``."""
    name = str(run_config["strategy"])
    if name not in STRATEGIES:
        raise StrategyError(f"Unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}.")
    builder, _ = STRATEGIES[name]
    return builder(run_config)


__all__ = [
    "STRATEGIES",
    "ClientRecord",
    "FedAvg",
    "FedProx",
    "QFedAvg",
    "Rejection",
    "RoundReport",
    "StrategyError",
    "StrategyState",
    "ValidatedStrategy",
    "build_strategy",
    "validate_replies",
]
