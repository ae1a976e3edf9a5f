"""Drive one training round of a strategy with replies built in the test, without ClientApps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import ConfigRecord
from flwr.clientapp import ClientApp

from simulations.inprocess import InProcessGrid
from simulations.synthetic_replies import make_train_reply, task_identity
from strategies.aggregation import numpy_to_record, record_to_numpy


def run_round(
    strategy,
    server_round: int,
    global_model: Mapping[str, np.ndarray],
    client_models: Sequence[Mapping[str, np.ndarray]],
    metrics: Sequence[Mapping[str, float | int]],
    partition_ids: Sequence[int] | None = None,
) -> dict[str, np.ndarray] | None:
    """Send ``global_model`` through ``configure_train``, aggregate the given replies, return the new model."""
    partition_ids = list(range(len(client_models))) if partition_ids is None else list(partition_ids)
    with task_identity():
        grid = InProcessGrid(ClientApp(), {}, max(len(client_models), strategy.min_available_nodes, 1))
        list(strategy.configure_train(server_round, numpy_to_record(global_model), ConfigRecord(), grid))
        replies = [
            make_train_reply(model, {"num-examples": 10, "train-loss": 1.0, **values}, partition, 1000 + index)
            for index, (model, values, partition) in enumerate(zip(client_models, metrics, partition_ids))
        ]
        arrays, _ = strategy.aggregate_train(server_round, replies)
    return None if arrays is None else record_to_numpy(arrays)
