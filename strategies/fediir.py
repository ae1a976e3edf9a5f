"""FedIIR: align every client's classifier gradient with the clients' mean (Guo et al., ICML 2023).

"Out-of-Distribution Generalization of Federated Learning via Implicit Invariant
Relationships" learns a representation on which one linear classifier w is optimal for every
client, penalizing the spread of the clients' classifier gradients:

    client k minimizes CE(θ; B) + γ ‖∇_w CE(θ; B) − ḡ‖₂²

with ḡ the mean classifier gradient over clients. As in the authors' public code
(``YamingGuo98/FedIIR``, ``domainbed/algorithms.py``), the server keeps ḡ as an exponential
moving average, ``ḡ ← ema · ḡ + (1 − ema) · Σ_k n_k g_k / Σ_k n_k`` starting from ḡ = 0, where
g_k = ∇_w L_k(θ_t) is client k's gradient of its mean training loss with respect to the linear
head (weight and bias). Clients report g_k (metric ``classifier-gradient``, one float per head
parameter) and receive ḡ; the ḡ used in round t + 1 includes the gradients measured at θ_t
(see ``strategies.client_statistics``), and round 1 trains without the penalty. The server
averages the models as FedAvg does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from client.regularizers import CLASSIFIER_GRADIENT, FEDIIR_MEAN_GRADIENT, FEDIIR_PENALTY
from strategies.base import StrategyState
from strategies.client_statistics import ClientStatisticsStrategy, parameter_count, reply_metrics, weighted_mean

logger = logging.getLogger(__name__)

CLASSIFIER_PREFIX = "classifier."


@dataclass
class FedIIRState(StrategyState):
    """The running mean classifier gradient ḡ; None before the first accepted reply."""

    mean_gradient: list[float] | None = None


class FedIIR(ClientStatisticsStrategy, FlowerFedAvg):
    """FedAvg whose clients add FedIIR's classifier-gradient alignment penalty.

    Parameters
    ----------
    penalty : float (default: 0.001)
        Penalty coefficient γ ≥ 0, the authors' default.
    ema : float (default: 0.95)
        Weight of the previous ḡ in its moving average, in [0, 1), the authors' default.
    **kwargs
        Flower FedAvg's sampling arguments.
    """

    state_type = FedIIRState
    statistic_keys = frozenset({CLASSIFIER_GRADIENT})
    train_metric_keys = frozenset({"train-loss", CLASSIFIER_GRADIENT})

    def __init__(self, penalty: float = 1e-3, ema: float = 0.95, **kwargs: Any) -> None:
        if not (math.isfinite(penalty) and penalty >= 0.0):
            raise ValueError(f"Invalid FedIIR penalty = {penalty!r}: it must be a finite number >= 0.")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"Invalid FedIIR ema = {ema!r}: it must be in [0, 1).")
        super().__init__(**kwargs)
        self.penalty = float(penalty)
        self.ema = float(ema)

    def statistic_config(self, server_round: int) -> dict[str, Any]:
        values: dict[str, Any] = {FEDIIR_PENALTY: self.penalty}
        if self.state.mean_gradient is not None:
            values[FEDIIR_MEAN_GRADIENT] = list(self.state.mean_gradient)
        return values

    def reply_problem(self, message: Message, phase: str) -> str | None:
        if phase != "train":
            return None
        gradient = reply_metrics(message)[CLASSIFIER_GRADIENT]
        expected = parameter_count(self._reference_arrays, CLASSIFIER_PREFIX)
        if not isinstance(gradient, list) or (expected is not None and len(gradient) != expected):
            size = len(gradient) if isinstance(gradient, list) else "a scalar"
            return f"{CLASSIFIER_GRADIENT} must hold one value per classifier parameter ({expected}), got {size}"
        return None

    def update_statistics(self, server_round: int, accepted: list[Message]) -> None:
        """Fold the accepted replies' mean classifier gradient into the moving average ḡ."""
        gradients = np.array([reply_metrics(message)[CLASSIFIER_GRADIENT] for message in accepted], dtype=np.float64)
        round_mean = weighted_mean(gradients, self.example_counts(accepted))
        previous = np.zeros_like(round_mean) if self.state.mean_gradient is None else np.asarray(self.state.mean_gradient)
        mean_gradient = self.ema * previous + (1.0 - self.ema) * round_mean
        self.state.mean_gradient = mean_gradient.tolist()

        spread = float(weighted_mean(np.sum((gradients - round_mean) ** 2, axis=1), self.example_counts(accepted)))
        values = self.report(server_round).strategy_values
        values["mean-gradient-norm"] = float(np.linalg.norm(mean_gradient))
        values["classifier-gradient-spread"] = spread
        logger.info(
            "Round %d: classifier gradients from %d replies, spread %.4g; running mean norm %.4g",
            server_round,
            len(accepted),
            spread,
            values["mean-gradient-norm"],
        )
