"""Behaviour every Corolla strategy shares: reply validation, round reports, state.

``ValidatedStrategy`` is a mixin placed before a Flower Message-API strategy in
the bases of a Corolla strategy. It replaces Flower's reply check with
``validate_replies`` (so every strategy rejects the same bad replies with the
same reasons), keeps a ``RoundReport`` per round for the run directory, and
holds the strategy's state in one serializable object.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid

from strategies.validation import NUM_EXAMPLES_KEY, Rejection, reply_partition_id, validate_replies

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientRecord:
    """One accepted reply: who sent it and the metrics it carried."""

    phase: str
    node_id: int
    partition_id: int
    num_examples: int
    metrics: dict[str, float]


@dataclass
class RoundReport:
    """Record of one round (accepted and rejected replies, bytes, strategy values) for the run events."""

    server_round: int
    client_results: list[ClientRecord] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    accepted_train_replies: int = 0
    kept_previous_model: bool = False
    strategy_values: dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0


def message_size(message: Message) -> int:
    """Return the size in bytes of ``message`` in Flower's protobuf wire format."""
    return message_to_proto(message).ByteSize()


@dataclass
class StrategyState:
    """State of a strategy that only counts rounds; strategies with more state subclass it.

    Every field must be a plain value, a list, a dict or a numpy array, so that
    ``dataclasses.asdict`` gives a checkpointable dictionary.
    """

    last_round: int = 0


class ValidatedStrategy:
    """Mixin: validate replies, record round reports, expose ``state``.

    Subclasses set ``train_metric_keys`` to the metric keys a training reply
    must carry besides ``num-examples``, and may extend ``extra_train_config``.
    """

    train_metric_keys: frozenset[str] = frozenset({"train-loss"})
    evaluate_metric_keys: frozenset[str] = frozenset({"eval-loss", "eval-accuracy"})
    state_type: type[StrategyState] = StrategyState

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state = self.state_type()
        self.reports: dict[int, RoundReport] = {}
        self._reference_arrays: ArrayRecord | None = None
        self._current_round = 0

    # --- state -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Return the strategy's state as a dictionary of plain values."""
        return dataclasses.asdict(self.state)

    def load_state_dict(self, values: dict[str, Any]) -> None:
        """Restore the state saved by ``state_dict``."""
        self.state = self.state_type(**values)

    # --- round hooks -------------------------------------------------------

    def report(self, server_round: int) -> RoundReport:
        """Return the report of ``server_round``, creating it on first use."""
        if server_round not in self.reports:
            self.reports[server_round] = RoundReport(server_round)
        return self.reports[server_round]

    def extra_train_config(self, server_round: int) -> dict[str, Any]:
        """Return values the strategy sends to every client with the model."""
        return {}

    def output_arrays(self, last_arrays: ArrayRecord) -> ArrayRecord:
        """Return the model the run delivers; the last global model unless a strategy converts its iterates."""
        return last_arrays

    def _count_sent(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        self.report(self._current_round).bytes_sent += sum(message_size(message) for message in messages)
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Keep the global model as the reference for validation, then sample nodes."""
        self._reference_arrays = arrays
        self._current_round = server_round
        self.state.last_round = server_round
        for key, value in self.extra_train_config(server_round).items():
            config[key] = value
        return self._count_sent(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._current_round = server_round
        return self._count_sent(super().configure_evaluate(server_round, arrays, config, grid))

    def reply_problem(self, message: Message, phase: str) -> str | None:
        """Return why a reply that passed ``validate_replies`` is invalid for this strategy, or None.

        Strategies whose clients report extra values (a gradient norm that must not be
        negative, a vector of a fixed length) override this. A reply with a problem is
        rejected like any other invalid reply.
        """
        return None

    def _apply_reply_checks(self, accepted: list[Message], phase: str) -> tuple[list[Message], list[Rejection]]:
        kept: list[Message] = []
        rejections: list[Rejection] = []
        for message in accepted:
            problem = self.reply_problem(message, phase)
            if problem is None:
                kept.append(message)
                continue
            rejection = Rejection(phase, int(message.metadata.src_node_id), reply_partition_id(message), problem)
            rejections.append(rejection)
            logger.warning(
                "Rejected %s reply from node %d (partition %d): %s", phase, rejection.node_id, rejection.partition_id, problem
            )
        return kept, rejections

    def _check_and_log_replies(
        self, replies: Iterable[Message], is_train: bool, validate: bool = True
    ) -> tuple[list[Message], list[Message]]:
        """Validate replies with ``validate_replies`` and record them in the round report.

        This overrides Flower's check, which every Flower strategy calls at the
        start of ``aggregate_train`` and ``aggregate_evaluate``. The second list
        it returns is empty because rejected replies are kept in the report.
        """
        phase = "train" if is_train else "evaluate"
        report = self.report(self._current_round)
        replies = list(replies)
        report.bytes_received += sum(message_size(message) for message in replies)
        accepted, rejections = validate_replies(
            replies,
            phase,
            self.train_metric_keys if is_train else self.evaluate_metric_keys,
            self._reference_arrays if is_train else None,
        )
        accepted, strategy_rejections = self._apply_reply_checks(accepted, phase)
        rejections = rejections + strategy_rejections
        report.rejections.extend(rejections)

        for message in accepted:
            metrics = dict(next(iter(message.content.metric_records.values())))
            count = int(metrics.pop(NUM_EXAMPLES_KEY))
            report.client_results.append(
                ClientRecord(
                    phase,
                    int(message.metadata.src_node_id),
                    reply_partition_id(message),
                    count,
                    {key: float(value) for key, value in metrics.items() if not isinstance(value, list)},
                )
            )
        logger.info("aggregate_%s: %d replies accepted, %d rejected", phase, len(accepted), len(rejections))

        if is_train:
            report.accepted_train_replies = len(accepted)
            if not accepted:
                report.kept_previous_model = True
                logger.warning(
                    "Round %d: every training reply was rejected; keeping the previous global model.",
                    self._current_round,
                )
        return accepted, []
