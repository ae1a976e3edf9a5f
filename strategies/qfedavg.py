"""q-FedAvg, the federated solver of q-FFL (Li et al., ICLR 2020, "Fair Resource
Allocation in Federated Learning").

Clients with a higher loss get more weight: with ``L = 1 / lr``,
``Delta_k = F_k^q * L (w_t - w_k)``,
``h_k = q F_k^(q-1) ||L (w_t - w_k)||^2 + L F_k^q`` and
``w_{t+1} = w_t - sum_k Delta_k / sum_k h_k``. ``F_k`` is the client's loss at the
global model ``w_t``, which the client reports as ``initial-loss``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import QFedAvg as FlowerQFedAvg

from strategies.base import ValidatedStrategy


class QFedAvg(ValidatedStrategy, FlowerQFedAvg):
    """Flower's QFedAvg, with replies validated and the loss taken at the global model.

    NOTE: Flower 1.42's update averages integer buffers as floats and breaks
    down for negative losses or large q; it is offered here as Flower's
    baseline, unchanged in its arithmetic.
    """

    train_metric_keys = frozenset({"train-loss", "initial-loss"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, train_loss_key="initial-loss", **kwargs)

    def extra_train_config(self, server_round: int) -> dict[str, Any]:
        return {"report-initial-loss": True}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate as Flower does, then restore each array's dtype.

        Flower 1.42's update computes in float64 and returns float64 arrays, so
        from the second round every float32 client reply would fail validation.
        """
        reference = self._reference_arrays
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or reference is None:
            return arrays, metrics
        restored = {}
        for key, array in arrays.items():
            dtype = np.dtype(reference[key].dtype)
            values = array.numpy()
            if np.issubdtype(dtype, np.integer):
                values = np.rint(values)
            restored[key] = Array(np.asarray(values, dtype=dtype))
        return ArrayRecord(array_dict=restored), metrics
