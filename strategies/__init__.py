"""Server strategies on Flower's Message API, selected by name in the run config."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from strategies.base import ClientRecord, RoundReport, StrategyState, ValidatedStrategy
from strategies.fedavg import FedAvg
from strategies.fedgtst import FedGTST
from strategies.fediir import FedIIR
from strategies.fedsr import FedSR
from strategies.fedprox import FedProx
from strategies.qfedavg import QFedAvg
from strategies.fedmgda import FedMGDAPlus
from strategies.qffl import QFFL
from strategies.tchebycheff import AFL, LOSS_SOURCES, OMDTCH, STCH, TCH, AdaOMDTCH, parse_preference_weights
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



def _tchebycheff_options(run_config: dict[str, Any]) -> dict[str, Any]:
    """Return the keyword arguments every Tchebycheff-family strategy takes from the run config."""
    num_clients = int(run_config["num-clients"])
    loss_source = str(run_config["lambda-loss"])
    if loss_source not in LOSS_SOURCES:
        raise StrategyError(f"Unknown lambda-loss {loss_source!r}; choose one of: {', '.join(LOSS_SOURCES)}.")
    try:
        weights = parse_preference_weights(str(run_config["preference-weights"]), num_clients)
    except ValueError as error:
        raise StrategyError(str(error)) from None
    return {
        "num_clients": num_clients,
        "preference_weights": weights,
        "normalize_losses": bool(run_config["normalize-losses"]),
        "loss_key": LOSS_SOURCES[loss_source],
        **_sampling(run_config),
    }


def _omd_tch(run_config: dict[str, Any]) -> ValidatedStrategy:
    return OMDTCH(eta_lambda=float(run_config["eta-lambda"]), step=str(run_config["omd-step"]), **_tchebycheff_options(run_config))


def _adaomd_tch(run_config: dict[str, Any]) -> ValidatedStrategy:
    return AdaOMDTCH(eta_lambda=float(run_config["eta-lambda"]), step=str(run_config["omd-step"]), **_tchebycheff_options(run_config))


def _afl(run_config: dict[str, Any]) -> ValidatedStrategy:
    return AFL(eta_lambda=float(run_config["eta-lambda"]), **_tchebycheff_options(run_config))


def _tch(run_config: dict[str, Any]) -> ValidatedStrategy:
    return TCH(**_tchebycheff_options(run_config))


def _stch(run_config: dict[str, Any]) -> ValidatedStrategy:
    return STCH(mu=float(run_config["stch-mu"]), **_tchebycheff_options(run_config))


def _qffl(run_config: dict[str, Any]) -> ValidatedStrategy:
    return QFFL(q=float(run_config["q"]), client_learning_rate=float(run_config["lr"]), **_sampling(run_config))


def _fedmgda(run_config: dict[str, Any]) -> ValidatedStrategy:
    return FedMGDAPlus(
        epsilon=float(run_config["fedmgda-epsilon"]),
        server_learning_rate=float(run_config["fedmgda-lr"]),
        **_sampling(run_config),
    )

def _fedgtst(run_config: dict[str, Any]) -> ValidatedStrategy:
    try:
        return FedGTST(
            xi=float(run_config["fedgtst-xi"]),
            target_rule=str(run_config["fedgtst-target"]),
            target_scale=float(run_config["fedgtst-target-scale"]),
            protocol=str(run_config["fedgtst-protocol"]),
            norm=str(run_config["fedgtst-norm"]),
            warmup_rounds=int(run_config["fedgtst-warmup-rounds"]),
            **_sampling(run_config),
        )
    except ValueError as error:
        raise StrategyError(str(error)) from None


def _fedsr(run_config: dict[str, Any]) -> ValidatedStrategy:
    try:
        return FedSR(
            l2_coeff=float(run_config["fedsr-l2-coeff"]),
            cmi_coeff=float(run_config["fedsr-cmi-coeff"]),
            **_sampling(run_config),
        )
    except ValueError as error:
        raise StrategyError(str(error)) from None


def _fediir(run_config: dict[str, Any]) -> ValidatedStrategy:
    try:
        return FedIIR(penalty=float(run_config["fediir-penalty"]), ema=float(run_config["fediir-ema"]), **_sampling(run_config))
    except ValueError as error:
        raise StrategyError(str(error)) from None


STRATEGIES: dict[str, tuple[Callable[[dict[str, Any]], ValidatedStrategy], str]] = {
    "fedavg": (_fedavg, "FedAvg: example-weighted mean of client models"),
    "fedprox": (_fedprox, "FedProx: FedAvg with a client-side proximal term (proximal-mu)"),
    "qfedavg": (_qfedavg, "Flower's q-FedAvg (q-FFL): weights clients by loss^q"),
    "fedgtst": (_fedgtst, "FedGTST: clients pull their gradient norms to a server target (fedgtst-xi, fedgtst-target)"),
    "fedsr": (_fedsr, "FedSR: Gaussian representation with L2 and conditional-MI penalties (fedsr-l2-coeff, fedsr-cmi-coeff)"),
    "fediir": (_fediir, "FedIIR: align client classifier gradients with their running mean (fediir-penalty, fediir-ema)"),
    "qffl": (_qffl, "q-FFL by q-FedAvg for any model and q >= 0 (integer buffers, negative losses, no overflow)"),
    "omd-tch": (_omd_tch, "OMD-TCH: online mirror descent on client weights (omd-step, eta-lambda), uniform average of iterates"),
    "adaomd-tch": (_adaomd_tch, "AdaOMD-TCH: OMD-TCH with the adaptive conversion over non-dominated iterates"),
    "afl": (_afl, "Agnostic federated learning: OMD-TCH with the Euclidean step, last iterate"),
    "tch": (_tch, "Tchebycheff: all weight on the client with the largest weighted loss"),
    "stch": (_stch, "Smooth Tchebycheff: client weights softmax(w * loss / stch-mu)"),
    "fedmgda": (_fedmgda, "FedMGDA+: min-norm combination of normalized updates near uniform weights (fedmgda-epsilon, fedmgda-lr)"),
}


_TCHEBYCHEFF = ("omd-tch", "adaomd-tch", "afl", "tch", "stch")

# Run-config keys that only some strategies read, and those strategies. Every other key
# (data, model, client training, extensions) applies to every strategy.
STRATEGY_KEYS: dict[str, tuple[str, ...]] = {
    "proximal-mu": ("fedprox",),
    "q": ("qfedavg", "qffl"),
    "eta-lambda": ("omd-tch", "adaomd-tch", "afl"),
    "omd-step": ("omd-tch", "adaomd-tch"),
    "normalize-losses": _TCHEBYCHEFF,
    "preference-weights": _TCHEBYCHEFF,
    "lambda-loss": _TCHEBYCHEFF,
    "stch-mu": ("stch",),
    "fedmgda-epsilon": ("fedmgda",),
    "fedmgda-lr": ("fedmgda",),
    "fedgtst-xi": ("fedgtst",),
    "fedgtst-target": ("fedgtst",),
    "fedgtst-target-scale": ("fedgtst",),
    "fedgtst-protocol": ("fedgtst",),
    "fedgtst-norm": ("fedgtst",),
    "fedgtst-warmup-rounds": ("fedgtst",),
    "fedsr-l2-coeff": ("fedsr",),
    "fedsr-cmi-coeff": ("fedsr",),
    "fediir-penalty": ("fediir",),
    "fediir-ema": ("fediir",),
    "client-statistic-examples": ("fedgtst", "fediir"),
}


def check_keys_take_effect(strategy: str, keys: Iterable[str]) -> None:
    """Raise StrategyError naming every key in ``keys`` that ``strategy`` does not read.

    Call it with the keys a user set explicitly, so that a setting meant for another
    strategy is reported instead of ignored.
    """
    unused = [key for key in keys if key in STRATEGY_KEYS and strategy not in STRATEGY_KEYS[key]]
    if unused:
        details = "; ".join(f"{key} is read only by {', '.join(STRATEGY_KEYS[key])}" for key in unused)
        raise StrategyError(
            f"Strategy {strategy!r} does not use {', '.join(unused)} ({details}). "
            "Remove the setting or choose a strategy that reads it."
        )


def build_strategy(run_config: dict[str, Any]) -> ValidatedStrategy:
    """Build the strategy named by ``run_config["strategy"]``."""
    name = str(run_config["strategy"])
    if name not in STRATEGIES:
        raise StrategyError(f"Unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}.")
    builder, _ = STRATEGIES[name]
    flower_logger = logging.getLogger("flwr")
    flower_logger.addFilter(_skip_evaluation_notice)
    try:
        return builder(run_config)
    finally:
        flower_logger.removeFilter(_skip_evaluation_notice)


def _skip_evaluation_notice(record: logging.LogRecord) -> bool:
    """Drop Flower's warning that fraction_evaluate = 0 skips federated evaluation.

    Experiments that evaluate on the server (the fairness presets) set fraction-evaluate
    to 0 on purpose, and the run's central evaluation is reported every round.
    """
    return "fraction_evaluate is set to 0.0" not in record.getMessage()


__all__ = [
    "AFL",
    "STRATEGIES",
    "STRATEGY_KEYS",
    "STCH",
    "TCH",
    "AdaOMDTCH",
    "FedMGDAPlus",
    "OMDTCH",
    "QFFL",
    "ClientRecord",
    "FedAvg",
    "FedGTST",
    "FedIIR",
    "FedProx",
    "FedSR",
    "QFedAvg",
    "Rejection",
    "RoundReport",
    "StrategyError",
    "StrategyState",
    "ValidatedStrategy",
    "build_strategy",
    "check_keys_take_effect",
    "validate_replies",
]
