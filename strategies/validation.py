"""Validation of client replies, shared by every Corolla strategy.

Flower 1.42 averages a reply with NaN weights in silently, crashes on a
wrong-shaped array, raises on an extra metric key, and divides by zero when
every reply reports zero examples. Here each reply is checked on its own; a bad
reply is rejected with a reason and logged with its node id, and the others are
aggregated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message

logger = logging.getLogger(__name__)

NUM_EXAMPLES_KEY = "num-examples"


@dataclass(frozen=True)
class Rejection:
    """A reply left out of aggregation, and why."""

    phase: str
    node_id: int
    partition_id: int
    reason: str


def reply_partition_id(message: Message) -> int:
    """Return the partition id a reply reports, or -1 when it reports none."""
    if message.has_error() or "client" not in message.content.config_records:
        return -1
    value = message.content.config_records["client"].get("partition-id", -1)
    return int(value) if isinstance(value, int) else -1


def _metric_problem(message: Message, expected_keys: frozenset[str]) -> str | None:
    metric_records = message.content.metric_records
    if len(metric_records) != 1:
        return f"expected one MetricRecord, got {len(metric_records)}"
    metrics = next(iter(metric_records.values()))

    missing = sorted(expected_keys - set(metrics))
    extra = sorted(set(metrics) - expected_keys)
    if missing:
        return f"missing metric keys {missing}"
    if extra:
        return f"unexpected metric keys {extra}"

    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(float(item)) for item in values):
            return f"metric {key!r} is not finite ({value!r})"

    count = metrics[NUM_EXAMPLES_KEY]
    if not isinstance(count, int) or isinstance(count, bool):
        return f"{NUM_EXAMPLES_KEY} must be an integer, got {count!r}"
    if count <= 0:
        return f"{NUM_EXAMPLES_KEY} must be positive, got {count}"
    return None


def _array_problem(message: Message, reference: ArrayRecord) -> str | None:
    array_records = message.content.array_records
    if len(array_records) != 1:
        return f"expected one ArrayRecord, got {len(array_records)}"
    arrays = next(iter(array_records.values()))

    missing = [key for key in reference if key not in arrays]
    extra = [key for key in arrays if key not in reference]
    if missing:
        return f"missing arrays {missing}"
    if extra:
        return f"unexpected arrays {extra}"

    for key, expected in reference.items():
        received = arrays[key]
        if tuple(received.shape) != tuple(expected.shape):
            return f"array {key!r} has shape {tuple(received.shape)}, expected {tuple(expected.shape)}"
        if received.dtype != expected.dtype:
            return f"array {key!r} has dtype {received.dtype}, expected {expected.dtype}"
        values = received.numpy()
        if np.issubdtype(values.dtype, np.inexact) and not np.all(np.isfinite(values)):
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            return f"array {key!r} has {bad} non-finite values"
    return None


def validate_replies(
    replies: Iterable[Message],
    phase: str,
    expected_metric_keys: Iterable[str],
    reference_arrays: ArrayRecord | None = None,
) -> tuple[list[Message], list[Rejection]]:
    """Split replies into accepted and rejected ones.

    A reply is rejected when it carries an error, when its MetricRecord lacks an
    expected key or has an unexpected one, when a metric is not finite, when
    ``num-examples`` is not a positive integer, or (with ``reference_arrays``)
    when its arrays differ from the reference in keys, shapes or dtypes or hold
    non-finite values. Accepted replies are returned sorted by partition id and
    node id, so aggregation does not depend on arrival order.
    """
    expected = frozenset(expected_metric_keys) | {NUM_EXAMPLES_KEY}
    accepted: list[Message] = []
    rejections: list[Rejection] = []
    for message in replies:
        node_id = int(message.metadata.src_node_id)
        if message.has_error():
            problem = f"client error: {message.error.reason}"
        else:
            problem = _metric_problem(message, expected)
            if problem is None and reference_arrays is not None:
                problem = _array_problem(message, reference_arrays)

        if problem is None:
            accepted.append(message)
            continue
        rejection = Rejection(phase, node_id, reply_partition_id(message), problem)
        rejections.append(rejection)
        logger.warning("Rejected %s reply from node %d (partition %d): %s", phase, node_id, rejection.partition_id, problem)

    accepted.sort(key=lambda message: (reply_partition_id(message), int(message.metadata.src_node_id)))
    return accepted, rejections
