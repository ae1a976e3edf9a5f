"""FedGTST: raise the clients' average gradient norm and shrink its spread (Ma et al., NeurIPS 2024).

"FedGTST: Boosting Global Transferability of Federated Models via Statistics Tuning"
(arXiv 2410.13045) bounds the target loss of a federated model by its source loss plus a
domain discrepancy term that tightens when the cross-client average of the local Jacobian
(gradient) norms ‖∇L_k(θ)‖ is larger and their variance smaller. Each round:

1. every client reports ``grad-norm``, a scalar: its gradient norm at the received model θ_t
   on its training data. By default this is the mean minibatch norm E_B ‖∇_θ CE(θ_t; B)‖₂,
   the quantity the penalty acts on (``norm = "minibatch"``). The alternative is the
   full-data norm ‖∇_θ L_k(θ_t)‖₂ (``norm = "full"``). The paper writes ‖∇L_k(θ_t)‖ without
   fixing the estimate. The full-data norm is below the mean minibatch norm by the minibatch
   noise, so a target built from full-data norms pulls the minibatch norms down;
2. the server builds a target γ above the cross-client average from the accepted norms r_k:
   ``max``: γ = max_k r_k (default), or ``scaled-mean``: γ = β · Σ_k n_k r_k / Σ_k n_k;
3. each client trains with ``CE(θ; B) + ξ (γ − ‖∇_θ CE(θ; B)‖₂)²`` on every minibatch B, which
   pulls every client's norm towards the same, larger value;
4. the server averages the client models as FedAvg does.

With ξ = 0 the clients train exactly as under FedAvg (they still report their norms). The
γ used in round t + 1 comes from the norms measured at θ_t (see
``strategies.client_statistics``). Rounds 1 to ``warmup_rounds`` train without the penalty,
and round 1 always does because no norm has been reported yet.

The ``vector`` protocol, from the authors' development code, exchanges full gradient vectors:
clients also report g_k = ∇_θ L_k(θ_t), the server sends ``v = ḡ / ‖ḡ‖ · max_k r_k`` with
ḡ = Σ_k n_k g_k / Σ_k n_k and r_k the reported ``grad-norm`` (the average direction rescaled
to the largest norm), and clients add ``ξ ‖v − ∇_θ CE(θ; B)‖₂²``. It sends one float64 per
parameter each way per client.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from client.regularizers import (
    FEDGTST_NORM,
    FEDGTST_NORMS,
    FEDGTST_PROTOCOL,
    FEDGTST_PROTOCOLS,
    FEDGTST_TARGET_GRADIENT,
    FEDGTST_TARGET_NORM,
    FEDGTST_XI,
    GRAD_NORM,
    GRADIENT,
)
from strategies.base import StrategyState
from strategies.client_statistics import ClientStatisticsStrategy, parameter_count, reply_metrics, weighted_mean

logger = logging.getLogger(__name__)

TARGET_RULES = ("max", "scaled-mean")


def build_target_norm(norms: np.ndarray, example_counts: np.ndarray, rule: str = "max", scale: float = 1.0) -> float:
    """Return the target γ for the next round from the clients' gradient norms.

    ``max`` returns the largest norm; ``scaled-mean`` returns ``scale`` times the mean norm
    weighted by the clients' example counts.
    """
    norms = np.asarray(norms, dtype=np.float64)
    if norms.size == 0:
        raise ValueError("Cannot build a FedGTST target from zero gradient norms.")
    if rule == "max":
        return float(norms.max())
    if rule == "scaled-mean":
        return float(scale * weighted_mean(norms, example_counts))
    raise ValueError(f"Unknown FedGTST target rule {rule!r}; choose one of: {', '.join(TARGET_RULES)}.")


def build_target_gradient(gradients: np.ndarray, example_counts: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
    """Return ``ḡ / ‖ḡ‖ · max_k r_k``, with ḡ the example-weighted mean of the rows of ``gradients``.

    r_k are the clients' reported ``norms``, or the norms of the rows when ``norms`` is None.
    A zero mean gradient has no direction, so the zero vector is returned for it.
    """
    gradients = np.asarray(gradients, dtype=np.float64)
    mean = weighted_mean(gradients, example_counts)
    mean_norm = float(np.linalg.norm(mean))
    if mean_norm == 0.0:
        return mean
    largest = float(np.max(np.linalg.norm(gradients, axis=1) if norms is None else np.asarray(norms, dtype=np.float64)))
    return mean / mean_norm * largest


@dataclass
class FedGTSTState(StrategyState):
    """Targets for the next round: γ (scalar protocol) or v (vector protocol); None before any reply."""

    target_norm: float | None = None
    target_gradient: list[float] | None = None


class FedGTST(ClientStatisticsStrategy, FlowerFedAvg):
    """FedAvg whose clients add FedGTST's gradient-norm penalty, with a server-built target.

    Parameters
    ----------
    xi : float (default: 0.01)
        Penalty coefficient ξ ≥ 0; 0 trains as FedAvg.
    target_rule : str (default: "max")
        How γ is built from the reported norms: ``max`` or ``scaled-mean``.
    target_scale : float (default: 1.0)
        β of the ``scaled-mean`` rule; ignored by ``max``.
    protocol : str (default: "scalar")
        ``scalar`` exchanges norms only; ``vector`` exchanges full gradient vectors.
    norm : str (default: "minibatch")
        What clients report as their norm: the mean minibatch norm or the full-data norm.
    warmup_rounds : int (default: 1)
        Rounds trained without the penalty. Round 1 always is, because no norm has been
        reported yet; 2 also skips the target built from the norms at the initial model.
    **kwargs
        Flower FedAvg's sampling arguments.
    """

    state_type = FedGTSTState

    def __init__(
        self,
        xi: float = 0.01,
        target_rule: str = "max",
        target_scale: float = 1.0,
        protocol: str = "scalar",
        norm: str = "minibatch",
        warmup_rounds: int = 1,
        **kwargs: Any,
    ) -> None:
        if not (math.isfinite(xi) and xi >= 0.0):
            raise ValueError(f"Invalid FedGTST xi = {xi!r}: it must be a finite number >= 0.")
        if target_rule not in TARGET_RULES:
            raise ValueError(f"Invalid FedGTST target rule {target_rule!r}; choose one of: {', '.join(TARGET_RULES)}.")
        if not (math.isfinite(target_scale) and target_scale > 0.0):
            raise ValueError(f"Invalid FedGTST target scale = {target_scale!r}: it must be a finite number > 0.")
        if protocol not in FEDGTST_PROTOCOLS:
            raise ValueError(f"Invalid FedGTST protocol {protocol!r}; choose one of: {', '.join(FEDGTST_PROTOCOLS)}.")
        if norm not in FEDGTST_NORMS:
            raise ValueError(f"Invalid FedGTST norm {norm!r}; choose one of: {', '.join(FEDGTST_NORMS)}.")
        if warmup_rounds < 1:
            raise ValueError(f"Invalid FedGTST warmup rounds = {warmup_rounds!r}: round 1 has no target, so use 1 or more.")
        super().__init__(**kwargs)
        self.norm = norm
        self.warmup_rounds = int(warmup_rounds)
        self.xi = float(xi)
        self.target_rule = target_rule
        self.target_scale = float(target_scale)
        self.protocol = protocol
        keys = {GRAD_NORM} if protocol == "scalar" else {GRAD_NORM, GRADIENT}
        self.statistic_keys = frozenset(keys)
        self.train_metric_keys = frozenset({"train-loss"} | keys)

    def statistic_config(self, server_round: int) -> dict[str, Any]:
        values: dict[str, Any] = {FEDGTST_XI: self.xi, FEDGTST_PROTOCOL: self.protocol, FEDGTST_NORM: self.norm}
        report = self.report(server_round)
        if server_round <= self.warmup_rounds:
            return values
        if self.protocol == "scalar" and self.state.target_norm is not None:
            values[FEDGTST_TARGET_NORM] = self.state.target_norm
            report.strategy_values["target-norm"] = self.state.target_norm
        if self.protocol == "vector" and self.state.target_gradient is not None:
            values[FEDGTST_TARGET_GRADIENT] = list(self.state.target_gradient)
            report.strategy_values["target-norm"] = float(np.linalg.norm(self.state.target_gradient))
        return values

    def reply_problem(self, message: Message, phase: str) -> str | None:
        if phase != "train":
            return None
        metrics = reply_metrics(message)
        norm = metrics[GRAD_NORM]
        if isinstance(norm, list) or norm < 0.0:
            return f"{GRAD_NORM} must be a non-negative number, got {norm!r}"
        if self.protocol == "vector":
            gradient = metrics[GRADIENT]
            expected = parameter_count(self._reference_arrays)
            if not isinstance(gradient, list) or (expected is not None and len(gradient) != expected):
                size = len(gradient) if isinstance(gradient, list) else "a scalar"
                return f"{GRADIENT} must hold one value per model parameter ({expected}), got {size}"
        return None

    def update_statistics(self, server_round: int, accepted: list[Message]) -> None:
        """Build the next round's target from the accepted replies and record the norms' statistics."""
        counts = self.example_counts(accepted)
        norms = np.array([float(reply_metrics(message)[GRAD_NORM]) for message in accepted])
        mean = float(weighted_mean(norms, counts))
        variance = float(weighted_mean((norms - mean) ** 2, counts))

        if self.protocol == "scalar":
            self.state.target_norm = build_target_norm(norms, counts, self.target_rule, self.target_scale)
            next_target = self.state.target_norm
        else:
            gradients = np.array([reply_metrics(message)[GRADIENT] for message in accepted], dtype=np.float64)
            target = build_target_gradient(gradients, counts, norms)
            self.state.target_gradient = target.tolist()
            next_target = float(np.linalg.norm(target))

        values = self.report(server_round).strategy_values
        values["mean-grad-norm"] = mean
        values["grad-norm-variance"] = variance
        values["max-grad-norm"] = float(norms.max())
        values["next-target-norm"] = next_target
        logger.info(
            "Round %d: gradient norms from %d replies: mean %.4g, variance %.4g; next target %.4g",
            server_round,
            len(accepted),
            mean,
            variance,
            next_target,
        )
