"""Fairness across clients by Tchebycheff scalarization: OMD-TCH, AdaOMD-TCH, AFL, TCH and STCH.

Client i has the objective f_i (its training loss) and a preference weight w_i > 0. The
Tchebycheff problem is ``min_θ max_i w_i f_i(θ) = min_θ max_{λ ∈ Δ_m} Σ_i λ_i w_i f_i(θ)``
(Liu, Zhang, Xie, Donahue and Zhao, "Adaptive Online Mirror Descent for Tchebycheff
Scalarization in Multi-Objective Learning", arXiv 2410.21764, first version 2024). Every
strategy here runs the same round t:

1. Send θ_t; each client reports ``initial-loss`` = f_i(θ_t) and returns its model θ_t^i after
   local training.
2. Choose weights λ_t on the simplex (the only step in which the strategies differ).
3. Set ``θ_{t+1} = Σ_i c_i θ_t^i`` with ``c_i = λ_{t,i} w_i / Σ_j λ_{t,j} w_j``. Because
   ``θ_t^i - θ_t`` is client i's descent step on f_i, this is a step on ``Σ_i λ_i w_i f_i``
   with the weights scaled to sum to one. With w = 1 it is the λ-weighted average of the
   client models.

| strategy     | λ_t                                                          | model returned              |
| ------------ | ------------------------------------------------------------ | --------------------------- |
| `omd-tch`    | λ_1 = 1/m, then an OMD step on λ with the gradient w ⊙ f(θ_t) | uniform average of θ_1..θ_T |
| `adaomd-tch` | as `omd-tch`                                                 | adaptive conversion         |
| `afl`        | as `omd-tch` with the Euclidean step                         | last iterate θ_{T+1}        |
| `tch`        | one-hot on ``argmax_i w_i f_i(θ_t)``                          | last iterate                |
| `stch`       | ``softmax(w ⊙ f(θ_t) / μ)``                                   | last iterate                |

OMD-TCH aggregates with λ_t and then updates it from f(θ_t), so λ_{t+1} first acts in round
t + 1. TCH and STCH take λ_t from f(θ_t) in the same round: TCH steps along a subgradient
of ``max_i w_i f_i`` at θ_t, STCH along the gradient of its smooth version
``μ log Σ_i exp(w_i f_i / μ)`` (Lin et al., ICML 2024, "Smooth Tchebycheff Scalarization for
Multi-Objective Optimization").

Weights are indexed by the partition id each reply carries, so ``num-clients`` fixes m.
With ``normalize-losses`` every f_i is divided by its value in the first round the client
took part in, before it enters λ. The iterates recorded by the conversions are the models
θ_t sent in rounds 1..T (θ_1 is the initial model), paired with the losses the clients
measured at them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from strategies.aggregation import numpy_to_record, record_to_numpy, reply_arrays, weighted_average
from strategies.base import StrategyState, ValidatedStrategy
from strategies.conversion import AdaptiveAverage, UniformAverage
from strategies.simplex import entropic_step, euclidean_step
from strategies.validation import Rejection, reply_partition_id

logger = logging.getLogger(__name__)

INITIAL_LOSS_KEY = "initial-loss"
TRAIN_LOSS_KEY = "train-loss"
# Run-config value of ``lambda-loss`` -> metric key of the loss that drives λ.
LOSS_SOURCES = {"initial": INITIAL_LOSS_KEY, "local-mean": TRAIN_LOSS_KEY}
OMD_STEPS = ("entropic", "euclidean")


def parse_preference_weights(text: str, num_clients: int) -> np.ndarray:
    """Parse ``preference-weights`` (comma-separated positive numbers, one per client; empty = all ones)."""
    if not text.strip():
        return np.ones(num_clients)
    parts = [part.strip() for part in text.split(",")]
    try:
        values = np.array([float(part) for part in parts])
    except ValueError:
        raise ValueError(
            f"Invalid preference-weights {text!r}: expected comma-separated numbers such as '1,1,2'."
        ) from None
    if values.size != num_clients:
        raise ValueError(
            f"preference-weights has {values.size} values but num-clients = {num_clients}; give one weight per client."
        )
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"Invalid preference-weights {text!r}: every weight must be a finite number > 0.")
    return values


@dataclass
class TchebycheffState(StrategyState):
    """State of a Tchebycheff-family strategy; lists are indexed by partition id.

    ``lambda_`` is the weight vector the next round aggregates with (OMD) or the one the last
    round used (TCH, STCH). ``first_losses`` and ``last_losses`` contain each client's first and
    latest reported loss of the kind that drives λ (``lambda-loss``), NaN before it reports.
    ``iterate_losses`` contains each client's latest loss at the model it was sent, f_i(θ_t),
    which the conversions pair with θ_t whatever drives λ. ``uniform`` and ``adaptive`` contain
    the online-to-batch conversion, when the strategy has one.
    """

    lambda_: list[float] = field(default_factory=list)
    first_losses: list[float] = field(default_factory=list)
    last_losses: list[float] = field(default_factory=list)
    iterate_losses: list[float] = field(default_factory=list)
    uniform: UniformAverage | None = None
    adaptive: AdaptiveAverage | None = None


class TchebycheffStrategy(ValidatedStrategy, FlowerFedAvg):
    """Round structure shared by the Tchebycheff family; subclasses define ``choose_lambda``.

    Parameters
    ----------
    num_clients : int
        Number of clients m; replies must carry a partition id in 0..m-1.
    preference_weights : numpy.ndarray or None (default: None)
        Preference weights w (positive, one per client); None means all ones.
    normalize_losses : bool (default: False)
        Divide each client's loss by its first reported value before it enters λ.
    loss_key : str (default: "initial-loss")
        Metric that gives f_i: ``initial-loss`` (loss at θ_t) or ``train-loss`` (mean loss over
        the local steps, as the authors' code uses).
    **kwargs
        Passed to Flower's FedAvg (sampling fractions and minimum node counts).
    """

    train_metric_keys = frozenset({TRAIN_LOSS_KEY, INITIAL_LOSS_KEY})
    state_type = TchebycheffState
    # None, "uniform" or "adaptive": the online-to-batch conversion of the returned model.
    conversion: str | None = None

    def __init__(
        self,
        num_clients: int,
        preference_weights: np.ndarray | None = None,
        normalize_losses: bool = False,
        loss_key: str = INITIAL_LOSS_KEY,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_clients < 1:
            raise ValueError(f"num_clients = {num_clients}: a Tchebycheff strategy needs at least one client.")
        if loss_key not in LOSS_SOURCES.values():
            raise ValueError(f"Unknown loss key {loss_key!r}; choose one of: {', '.join(LOSS_SOURCES.values())}.")
        self.num_clients = num_clients
        self.preference_weights = np.ones(num_clients) if preference_weights is None else np.asarray(preference_weights, dtype=np.float64)
        if self.preference_weights.shape != (num_clients,) or np.any(self.preference_weights <= 0):
            raise ValueError(f"Invalid preference weights {self.preference_weights.tolist()}: expected {num_clients} positive values.")
        self.normalize_losses = normalize_losses
        self.loss_key = loss_key

        self.state.lambda_ = [1.0 / num_clients] * num_clients
        self.state.first_losses = [math.nan] * num_clients
        self.state.last_losses = [math.nan] * num_clients
        self.state.iterate_losses = [math.nan] * num_clients
        if self.conversion == "uniform":
            self.state.uniform = UniformAverage()
        elif self.conversion == "adaptive":
            self.state.adaptive = AdaptiveAverage()

    # --- state ---------------------------------------------------------------

    def load_state_dict(self, values: dict[str, Any]) -> None:
        """Restore the state saved by ``state_dict``, rebuilding the conversion dataclasses."""
        values = dict(values)
        uniform = values.pop("uniform", None)
        adaptive = values.pop("adaptive", None)
        self.state = TchebycheffState(**values)
        self.state.uniform = None if uniform is None else UniformAverage(**uniform)
        self.state.adaptive = None if adaptive is None else AdaptiveAverage(**adaptive)

    # --- hooks for subclasses ------------------------------------------------

    def choose_lambda(self, objective: np.ndarray, present: np.ndarray) -> np.ndarray:
        """Return λ_t for this round from ``objective = w ⊙ f(θ_t)`` and the mask of clients that replied."""
        raise NotImplementedError

    def update_after_round(self, objective: np.ndarray, known: np.ndarray) -> None:
        """Update the state once the round's model is aggregated (OMD's step on λ)."""

    # --- round ---------------------------------------------------------------

    def extra_train_config(self, server_round: int) -> dict[str, Any]:
        return {"report-initial-loss": True}

    def output_arrays(self, last_arrays: ArrayRecord) -> ArrayRecord:
        """Return the converted model (uniform or adaptive average of θ_1..θ_T), or ``last_arrays`` without a conversion."""
        converter = self.state.uniform or self.state.adaptive
        average = None if converter is None else converter.average()
        return last_arrays if average is None else numpy_to_record(average)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weight the client models by ``λ_t ⊙ w``, record θ_t for the conversion and update the state."""
        accepted, _ = self._check_and_log_replies(replies, is_train=True)
        by_client = self._replies_by_client(server_round, accepted)
        if not by_client:
            return None, None

        present = np.zeros(self.num_clients, dtype=bool)
        raw_losses = np.full(self.num_clients, math.nan)
        for client, message in by_client.items():
            present[client] = True
            metrics = next(iter(message.content.metric_records.values()))
            raw_losses[client] = float(metrics[self.loss_key])
            self.state.iterate_losses[client] = float(metrics[INITIAL_LOSS_KEY])
        self._remember_losses(raw_losses, present)
        objective, known = self._objective()

        lambda_ = self.choose_lambda(objective, present)
        clients = sorted(by_client)
        coefficients = lambda_[clients] * self.preference_weights[clients]
        if coefficients.sum() <= 0:
            # Every client that replied has λ_i = 0 (possible after a Euclidean step).
            logger.warning("Round %d: the clients that replied all have weight 0; averaging them uniformly.", server_round)
            coefficients = np.ones(len(clients))
        arrays = weighted_average([reply_arrays(by_client[client]) for client in clients], coefficients)

        self._record_iterate()
        self.update_after_round(objective, known)

        report = self.report(server_round)
        for client in range(self.num_clients):
            report.strategy_values[f"lambda-{client}"] = float(lambda_[client])
        report.strategy_values["max-weighted-loss"] = float(np.max(objective[known])) if known.any() else math.nan
        if self.state.adaptive is not None:
            report.strategy_values["kept-iterates"] = float(len(self.state.adaptive.iterates))
        logger.info(
            "Round %d: lambda = [%s], max weighted loss %.4f",
            server_round,
            ", ".join(f"{value:.3f}" for value in lambda_),
            report.strategy_values["max-weighted-loss"],
        )

        metrics = self.train_metrics_aggr_fn([by_client[client].content for client in clients], self.weighted_by_key)
        return numpy_to_record(arrays), metrics

    # --- steps of a round ----------------------------------------------------

    def reply_problem(self, message: Message, phase: str) -> str | None:
        """Reject a training reply whose partition id has no weight λ_i."""
        client = reply_partition_id(message)
        if phase == "train" and not 0 <= client < self.num_clients:
            return f"partition id {client} is outside 0..{self.num_clients - 1}, so it has no weight λ_i"
        return None

    def _replies_by_client(self, server_round: int, accepted: list[Message]) -> dict[int, Message]:
        """Map partition id -> reply; reject a second reply for the same partition."""
        report = self.report(server_round)
        by_client: dict[int, Message] = {}
        for message in accepted:
            client = reply_partition_id(message)
            if client not in by_client:
                by_client[client] = message
                continue
            problem = f"a second reply for partition {client} in the same round"
            node_id = int(message.metadata.src_node_id)
            report.rejections.append(Rejection("train", node_id, client, problem))
            report.accepted_train_replies -= 1
            logger.warning("Rejected train reply from node %d (partition %d): %s", node_id, client, problem)
        if not by_client:
            report.kept_previous_model = True
        return by_client

    def _remember_losses(self, raw_losses: np.ndarray, present: np.ndarray) -> None:
        for client in np.flatnonzero(present):
            value = float(raw_losses[client])
            if math.isnan(self.state.first_losses[client]):
                self.state.first_losses[client] = value
                if self.normalize_losses and value <= 0:
                    logger.warning("Client %d reported a first loss of %g; its losses are left unnormalized.", client, value)
            self.state.last_losses[client] = value
        missing = np.flatnonzero(~present)
        if missing.size:
            logger.warning("Clients %s did not reply this round; their latest reported losses stand in.", missing.tolist())

    def _objective(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``w ⊙ f`` from the latest losses (normalized if configured) and the mask of clients with a loss."""
        losses = np.array(self.state.last_losses, dtype=np.float64)
        known = ~np.isnan(losses)
        if self.normalize_losses:
            first = np.array(self.state.first_losses, dtype=np.float64)
            divisor = np.where(known & (first > 0), first, 1.0)
            losses = losses / divisor
        objective = np.where(known, self.preference_weights * losses, 0.0)
        return objective, known

    def _record_iterate(self) -> None:
        """Add θ_t, the model the clients trained from, with its loss vector f(θ_t) to the conversion."""
        converter = self.state.uniform or self.state.adaptive
        if converter is None or self._reference_arrays is None:
            return
        losses = np.array(self.state.iterate_losses, dtype=np.float64)
        # NOTE: with partial participation a client's latest loss may come from an earlier
        # model, so the adaptive conversion compares partly stale loss vectors. A client that
        # never reported counts as the largest float loss.
        losses = np.where(np.isnan(losses), np.finfo(np.float64).max, losses)
        converter.add(record_to_numpy(self._reference_arrays), losses)


class OMDTCH(TchebycheffStrategy):
    """OMD-TCH (Liu et al., 2024, arXiv 2410.21764): online mirror descent on λ, uniform conversion.

    λ_1 = 1/m. After round t, with the gradient ``g = w ⊙ f(θ_t)`` (zero for a client that
    never reported), the entropic step is ``λ_{t+1,i} ∝ λ_{t,i} exp(η_λ g_i)`` and the
    Euclidean step is ``λ_{t+1} = Π_Δ(λ_t + η_λ g)``. The returned model is
    ``(1/T) Σ_t θ_t``. The entropic step converges at ``O(sqrt(log m / T))``.

    Parameters
    ----------
    eta_lambda : float
        Step size η_λ >= 0 of the weight update; 0 keeps λ uniform (FedAvg with equal weights).
    step : str (default: "entropic")
        "entropic" (exponentiated gradient) or "euclidean" (projected gradient).
    """

    conversion = "uniform"

    def __init__(self, eta_lambda: float, step: str = "entropic", **kwargs: Any) -> None:
        if step not in OMD_STEPS:
            raise ValueError(f"Unknown OMD step {step!r}; choose one of: {', '.join(OMD_STEPS)}.")
        if not eta_lambda >= 0:
            raise ValueError(f"Invalid eta-lambda = {eta_lambda!r}: the step size must be >= 0.")
        super().__init__(**kwargs)
        self.eta_lambda = float(eta_lambda)
        self.step = step

    def choose_lambda(self, objective: np.ndarray, present: np.ndarray) -> np.ndarray:
        return np.array(self.state.lambda_, dtype=np.float64)

    def update_after_round(self, objective: np.ndarray, known: np.ndarray) -> None:
        step = entropic_step if self.step == "entropic" else euclidean_step
        self.state.lambda_ = step(self.state.lambda_, objective, self.eta_lambda).tolist()


class AdaOMDTCH(OMDTCH):
    """AdaOMD-TCH (Liu et al., 2024, arXiv 2410.21764): OMD-TCH with the adaptive conversion.

    The returned model is ``Σ_j weight_j θ_j / T`` over the kept mutually non-dominated
    iterates (see ``strategies.conversion.AdaptiveAverage``).
    """

    conversion = "adaptive"


class AFL(OMDTCH):
    """Agnostic federated learning (Mohri, Sivek and Suresh, ICML 2019), as OMD with the Euclidean step.

    AFL solves ``min_θ max_{λ ∈ Δ} Σ_i λ_i f_i(θ)`` by descent on θ and projected gradient
    ascent on λ: exactly the iterates of ``omd-tch`` with ``omd-step = euclidean``. This
    strategy returns the last iterate θ_{T+1}. Mohri et al. return the average of the
    iterates instead, which is the model ``omd-tch`` with the Euclidean step returns.
    """

    conversion = None

    def __init__(self, eta_lambda: float, **kwargs: Any) -> None:
        super().__init__(eta_lambda=eta_lambda, step="euclidean", **kwargs)


class TCH(TchebycheffStrategy):
    """Tchebycheff scalarization by subgradient steps: all weight on the worst weighted loss.

    ``λ_t`` is one-hot on ``argmax_i w_i f_i(θ_t)`` over the clients that replied (ties go to
    the lowest partition id), so ``θ_{t+1}`` is that client's model.
    """

    def choose_lambda(self, objective: np.ndarray, present: np.ndarray) -> np.ndarray:
        candidates = np.where(present, objective, -np.inf)
        lambda_ = np.zeros(self.num_clients)
        lambda_[int(np.argmax(candidates))] = 1.0
        self.state.lambda_ = lambda_.tolist()
        return lambda_


class STCH(TchebycheffStrategy):
    """Smooth Tchebycheff scalarization (Lin et al., ICML 2024): ``λ_t = softmax(w ⊙ f(θ_t) / μ)``.

    ``μ log Σ_i exp(w_i f_i / μ)`` lies within ``μ log m`` of ``max_i w_i f_i``, and its
    gradient is ``Σ_i λ_i w_i ∇f_i`` with these λ. The softmax runs over the clients that
    replied. The authors' federated code uses ``exp(w_i (f_i - max f) / (m γ))``, that is
    μ = m γ.

    Parameters
    ----------
    mu : float
        Temperature μ > 0; small μ approaches TCH, large μ approaches uniform weights.
    """

    def __init__(self, mu: float, **kwargs: Any) -> None:
        if not mu > 0:
            raise ValueError(f"Invalid stch-mu = {mu!r}: the temperature must be > 0.")
        super().__init__(**kwargs)
        self.mu = float(mu)

    def choose_lambda(self, objective: np.ndarray, present: np.ndarray) -> np.ndarray:
        scaled = np.where(present, objective / self.mu, -np.inf)
        scaled -= scaled.max()
        weights = np.exp(scaled)
        lambda_ = weights / weights.sum()
        self.state.lambda_ = lambda_.tolist()
        return lambda_
