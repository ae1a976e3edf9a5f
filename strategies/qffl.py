"""q-FFL by q-FedAvg (Li, Sanjabi, Beirami and Smith, ICLR 2020, "Fair Resource Allocation in Federated Learning").

q-FFL minimizes ``Σ_k F_k(θ)^(q+1) / (q+1)``, which weights clients with a higher loss more as
q grows (q = 0 is uniform FedAvg). Its solver q-FedAvg, with ``L = 1 / lr`` (lr being the
clients' learning rate) and ``F_k = F_k(θ_t)`` the loss at the global model (the reply's
``initial-loss``), sets

    Δθ_k = L (θ_t - θ_k),   Δ_k = F_k^q Δθ_k,   h_k = q F_k^(q-1) ||Δθ_k||² + L F_k^q,
    θ_{t+1} = θ_t - Σ_k Δ_k / Σ_k h_k.

This implementation differs from Flower 1.42's ``QFedAvg`` (strategy ``qfedavg``) where that
one fails:

- Only floating-point arrays take the step. Integer arrays (BatchNorm's
  ``num_batches_tracked``) get the example-weighted average of the client values, rounded,
  and every array keeps its dtype.
- ``F_k^q`` and ``F_k^(q-1)`` are computed as ``exp(q log F_k - s)`` and
  ``exp((q-1) log F_k - s)``, with s the largest of these exponents. The factor ``e^-s`` cancels
  between numerator and denominator, so q = 200 with a loss of 1e6 (``F^q = 1e1200``) does not
  overflow.
- F^q is undefined for a negative loss with fractional q, and q-FFL's objective assumes
  F >= 0, so a reply with a negative loss is rejected with that reason (``reply_problem``) and
  the round goes on with the others. A zero loss is raised to 1e-12, which keeps
  ``F^(q-1)`` finite for q < 1.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from strategies.aggregation import combine_float_update, flatten, floating_keys, numpy_to_record, record_to_numpy, reply_arrays, unflatten
from strategies.base import ValidatedStrategy
from strategies.validation import NUM_EXAMPLES_KEY, reply_partition_id

logger = logging.getLogger(__name__)

INITIAL_LOSS_KEY = "initial-loss"
SMALLEST_LOSS = 1e-12


def qffl_step(
    global_vector: np.ndarray,
    client_vectors: list[np.ndarray],
    losses: np.ndarray,
    q: float,
    learning_rate: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``θ_{t+1}`` of q-FedAvg for flattened float64 models, and each client's step weight.

    The step weight of client k is the coefficient ``c_k`` in
    ``θ_{t+1} = θ_t + Σ_k c_k (θ_k - θ_t)``, that is ``L F_k^q / Σ_j h_j``.
    Raises ValueError for a negative loss or q < 0.
    """
    losses = np.asarray(losses, dtype=np.float64)
    if q < 0:
        raise ValueError(f"Invalid q = {q}: q-FFL needs q >= 0.")
    if np.any(losses < 0) or not np.all(np.isfinite(losses)):
        raise ValueError(f"Invalid losses {losses.tolist()}: q-FFL needs finite, non-negative losses.")
    lipschitz = 1.0 / learning_rate

    log_losses = np.log(np.maximum(losses, SMALLEST_LOSS))
    delta_exponents = q * log_losses
    h_exponents = (q - 1.0) * log_losses
    scale = max(delta_exponents.max(), h_exponents.max())

    numerator = np.zeros_like(global_vector)
    denominator = 0.0
    delta_weights = np.exp(delta_exponents - scale)
    for index, client_vector in enumerate(client_vectors):
        scaled_step = lipschitz * (global_vector - client_vector)
        squared_norm = float(scaled_step @ scaled_step)
        numerator += delta_weights[index] * scaled_step
        denominator += q * np.exp(h_exponents[index] - scale) * squared_norm + lipschitz * delta_weights[index]

    step_weights = lipschitz * delta_weights / denominator
    return global_vector - numerator / denominator, step_weights


class QFFL(ValidatedStrategy, FlowerFedAvg):
    """q-FFL solved by q-FedAvg, for any model and any q >= 0 (see the module docstring).

    Parameters
    ----------
    q : float
        Fairness exponent q >= 0; 0 gives uniform FedAvg.
    client_learning_rate : float
        The clients' learning rate lr; q-FedAvg's Lipschitz estimate is L = 1 / lr.
    **kwargs
        Passed to Flower's FedAvg (sampling fractions and minimum node counts).
    """

    train_metric_keys = frozenset({"train-loss", INITIAL_LOSS_KEY})

    def __init__(self, q: float, client_learning_rate: float, **kwargs: Any) -> None:
        if not q >= 0:
            raise ValueError(f"Invalid q = {q!r}: q-FFL needs q >= 0.")
        if not client_learning_rate > 0:
            raise ValueError(f"Invalid client learning rate {client_learning_rate!r}: it must be > 0.")
        super().__init__(**kwargs)
        self.q = float(q)
        self.client_learning_rate = float(client_learning_rate)

    def extra_train_config(self, server_round: int) -> dict[str, Any]:
        return {"report-initial-loss": True}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Take the q-FedAvg step from the global model with the replies' losses at it."""
        accepted, _ = self._check_and_log_replies(replies, is_train=True)
        if not accepted or self._reference_arrays is None:
            return None, None

        reference = record_to_numpy(self._reference_arrays)
        keys = floating_keys(reference)
        models = [reply_arrays(message) for message in accepted]
        metrics = [next(iter(message.content.metric_records.values())) for message in accepted]
        losses = np.array([float(record[INITIAL_LOSS_KEY]) for record in metrics])
        counts = [int(record[NUM_EXAMPLES_KEY]) for record in metrics]

        updated, step_weights = qffl_step(
            flatten(reference, keys),
            [flatten(model, keys) for model in models],
            losses,
            self.q,
            self.client_learning_rate,
        )
        arrays = combine_float_update(unflatten(updated, reference, keys), models, counts, reference)

        report = self.report(server_round)
        for message, weight in zip(accepted, step_weights):
            report.strategy_values[f"step-weight-{reply_partition_id(message)}"] = float(weight)
        logger.info("Round %d: q-FFL step weights %s", server_round, np.array2string(step_weights, precision=3))
        return numpy_to_record(arrays), self.train_metrics_aggr_fn([message.content for message in accepted], self.weighted_by_key)

    def reply_problem(self, message: Message, phase: str) -> str | None:
        """Reject a training reply whose loss at the global model is negative."""
        if phase != "train":
            return None
        loss = float(next(iter(message.content.metric_records.values()))[INITIAL_LOSS_KEY])
        if loss < 0:
            return f"{INITIAL_LOSS_KEY} = {loss:g} is negative; q-FFL weights clients by loss^q and needs losses >= 0"
        return None
