"""Shared server side of strategies whose clients report statistics that the server combines.

FedGTST and FedIIR follow the same round. The server sends the model with the statistic it
built from the previous round's replies. Each client measures its own statistic at the model it
received, trains with a penalty built from the server's statistic, and reports its measurement.
The server then combines the measurements of the replies that passed validation. The statistic
used in round t + 1 therefore comes from measurements at the global model of round t, because a
same-round protocol would need a second exchange (and a second copy of the model) per round.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.serde import config_record_to_proto, metric_record_to_proto
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from strategies.base import ValidatedStrategy
from strategies.validation import NUM_EXAMPLES_KEY

logger = logging.getLogger(__name__)


def reply_metrics(message: Message) -> MetricRecord:
    """Return the MetricRecord of a reply that passed validation (it has exactly one)."""
    return next(iter(message.content.metric_records.values()))


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Return ``Σ_k w_k values_k / Σ_k w_k`` along the first axis."""
    weights = np.asarray(weights, dtype=np.float64)
    return np.tensordot(weights / weights.sum(), np.asarray(values, dtype=np.float64), axes=1)


def parameter_count(arrays: ArrayRecord | None, prefix: str = "") -> int | None:
    """Return the number of values in the arrays whose key starts with ``prefix``, or None without arrays."""
    if arrays is None:
        return None
    return sum(int(np.prod(array.shape, dtype=np.int64)) for key, array in arrays.items() if key.startswith(prefix))


def aggregate_scalar_metrics(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Average the scalar metrics of the replies as Flower does, leaving out list-valued ones.

    Gradient vectors are combined by the strategy itself; Flower's default would also average
    them and print the result in its round log.
    """
    scalar_records = []
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        scalars = MetricRecord({key: value for key, value in metrics.items() if not isinstance(value, list)})
        scalar_records.append(RecordDict({"metrics": scalars}))
    return aggregate_metricrecords(scalar_records, weighting_metric_name)


class ClientStatisticsStrategy(ValidatedStrategy):
    """Mixin: send a server statistic each round, combine the clients' reported statistics.

    Subclasses define ``statistic_config`` (entries sent with the model), ``statistic_keys``
    (metric keys of the clients' measurements) and ``update_statistics`` (called with the
    accepted training replies only). The round report gets ``statistic-bytes-sent`` and
    ``statistic-bytes-received``: the serialized size of the strategy's own ConfigRecord
    entries in all training messages and of the ``statistic_keys`` entries in all training
    replies, a few bytes of record framing excluded. They are the protocol's cost on top of
    FedAvg's messages, which ``bytes_sent`` and ``bytes_received`` already include.
    """

    statistic_keys: frozenset[str] = frozenset()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_scalar_metrics)
        super().__init__(*args, **kwargs)

    def statistic_config(self, server_round: int) -> dict[str, Any]:
        """Return the entries sent to every client of ``server_round``."""
        return {}

    def update_statistics(self, server_round: int, accepted: list[Message]) -> None:
        """Combine the statistics of the accepted training replies of ``server_round``."""

    def extra_train_config(self, server_round: int) -> dict[str, Any]:
        values = dict(super().extra_train_config(server_round))
        own = self.statistic_config(server_round)
        values.update(own)
        self._statistic_config_bytes = config_record_to_proto(ConfigRecord(own)).ByteSize() if own else 0
        return values

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._statistic_config_bytes = 0
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.report(server_round).strategy_values["statistic-bytes-sent"] = float(len(messages) * self._statistic_config_bytes)
        return messages

    def _check_and_log_replies(
        self, replies: Iterable[Message], is_train: bool, validate: bool = True
    ) -> tuple[list[Message], list[Message]]:
        replies = list(replies)
        if is_train:
            received = 0
            for message in replies:
                if message.has_error() or len(message.content.metric_records) != 1:
                    continue
                metrics = reply_metrics(message)
                own = {key: metrics[key] for key in self.statistic_keys if key in metrics}
                if own:
                    received += metric_record_to_proto(MetricRecord(own)).ByteSize()
            self.report(self._current_round).strategy_values["statistic-bytes-received"] = float(received)

        accepted, rejected = super()._check_and_log_replies(replies, is_train, validate)
        if is_train and accepted:
            self.update_statistics(self._current_round, accepted)
        return accepted, rejected

    @staticmethod
    def example_counts(accepted: list[Message]) -> np.ndarray:
        """Return each accepted reply's ``num-examples``, the weights of cross-client means."""
        return np.array([float(reply_metrics(message)[NUM_EXAMPLES_KEY]) for message in accepted])
