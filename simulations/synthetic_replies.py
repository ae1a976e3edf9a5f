"""Training replies built directly, without a ClientApp, for strategy tests and aggregation benchmarks.

A reply has the shape Corolla's ClientApp sends: the model under ``arrays``, a MetricRecord
under ``metrics`` and the partition id in a ConfigRecord under ``client``. Flower 1.42 stamps
every Message with the ids in ``TaskIdentity``, so replies are built inside
``task_identity``, which sets those ids and restores the previous ones afterwards.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1


@contextlib.contextmanager
def task_identity(run_id: int = 1, node_id: int = SERVER_NODE_ID) -> Iterator[None]:
    """Set Flower's ``TaskIdentity`` for building Messages outside a running app, then restore it."""
    previous = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, node_id
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = previous


def make_train_reply(
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, int | float],
    partition_id: int,
    node_id: int,
) -> Message:
    """Return a training reply from ``node_id`` carrying ``arrays``, ``metrics`` and ``partition_id``.

    Must be called inside ``task_identity``.
    """
    request = Message(RecordDict(), dst_node_id=node_id, message_type="train")
    request.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    server_node_id = TaskIdentity.node_id
    TaskIdentity.node_id = node_id
    try:
        content = RecordDict(
            {
                "arrays": ArrayRecord({key: Array(np.asarray(value, order="C")) for key, value in arrays.items()}),
                "metrics": MetricRecord(dict(metrics)),
                "client": ConfigRecord({"partition-id": partition_id}),
            }
        )
        return Message(content, reply_to=request)
    finally:
        TaskIdentity.node_id = server_node_id
