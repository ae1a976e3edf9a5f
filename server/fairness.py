"""The ``fairness`` run extension: per-client test metrics of the global model every round.

For each client's test split it computes the cross-entropy and the accuracy, and from them

- ``average_accuracy``: accuracy over the pooled test examples of all clients;
- ``worst_client_loss``: the largest client test loss (the "agnostic loss" of AFL);
- ``accuracy_parity``: the population standard deviation of the client accuracies, in
  percentage points.

NOTE: this is a simulation-only evaluation. The server rebuilds every client's test split
with ``make_partitions`` from the run config, which a deployed server cannot do. In a
deployment the ClientApp's federated evaluation (``fraction-evaluate`` = 1) reports the same
per-client loss and accuracy from the clients' own data.

Each round's events get ``fairness/<metric>`` and ``fairness/client-<i>/{accuracy,loss}`` for
the global model (the last iterate). For a strategy that returns a converted model (an
average of its iterates), the same values of that model are written under
``fairness/converted/``. ``summary.json`` gets a ``fairness`` section with the metrics of the
model the run returns, and under ``last_iterate`` those of the last global model.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from client.models import build_model
from client.training import evaluate_model
from server.extensions import RunExtension
from simulations.datasets import Dataset
from simulations.partition import make_partitions

logger = logging.getLogger(__name__)

EVENT_PREFIX = "fairness"


class FairnessExtension(RunExtension):
    """Evaluate the global model on each client's test split (see the module docstring)."""

    name = "fairness"

    def __init__(self, run_config: dict[str, Any], dataset: Dataset) -> None:
        splits = make_partitions(
            dataset,
            str(run_config["partition"]),
            int(run_config["num-clients"]),
            int(run_config["seed"]),
            alpha=float(run_config["alpha"]),
            classes_per_client=int(run_config["classes-per-client"]),
        )
        empty = [client for client, indices in enumerate(splits.test) if len(indices) == 0]
        if empty:
            raise ValueError(
                f"Clients {empty} have no test examples, so the fairness extension cannot evaluate them; "
                "use fewer clients or another partition."
            )
        self.client_tests = [
            (torch.from_numpy(dataset.test_x[indices].copy()), torch.from_numpy(dataset.test_y[indices].copy()))
            for indices in splits.test
        ]
        self.model = build_model(str(run_config["model"]), dataset.input_shape, dataset.num_classes)
        self.batch_size = int(run_config["eval-batch-size"])

    def evaluate(self, arrays: ArrayRecord) -> dict[str, Any]:
        """Return the fairness metrics of the model in ``arrays``, with per-client lists."""
        self.model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        losses, accuracies, sizes = [], [], []
        for inputs, labels in self.client_tests:
            loss, accuracy = evaluate_model(self.model, inputs, labels, self.batch_size)
            losses.append(loss)
            accuracies.append(accuracy)
            sizes.append(len(labels))
        accuracy_array = np.array(accuracies)
        return {
            "average_accuracy": float(np.average(accuracy_array, weights=sizes)),
            "worst_client_loss": float(max(losses)),
            "accuracy_parity": float(100.0 * accuracy_array.std()),
            "client_accuracy": accuracies,
            "client_loss": losses,
        }

    def round_metrics(self, server_round: int, arrays: ArrayRecord, strategy: Any) -> dict[str, float]:
        values = _event_values(EVENT_PREFIX, self.evaluate(arrays))
        converted = strategy.output_arrays(arrays)
        if converted is not arrays:
            values.update(_event_values(f"{EVENT_PREFIX}/converted", self.evaluate(converted)))
        logger.info(
            "Round %d fairness: average accuracy %.4f, worst client loss %.4f, parity %.2f",
            server_round,
            values[f"{EVENT_PREFIX}/average-accuracy"],
            values[f"{EVENT_PREFIX}/worst-client-loss"],
            values[f"{EVENT_PREFIX}/accuracy-parity"],
        )
        return values

    def finish(self, output_arrays: ArrayRecord, last_arrays: ArrayRecord, strategy: Any) -> dict[str, Any]:
        section = self.evaluate(output_arrays)
        section["converted"] = output_arrays is not last_arrays
        section["last_iterate"] = self.evaluate(last_arrays)
        return {"fairness": section}


def _event_values(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    values = {
        f"{prefix}/average-accuracy": metrics["average_accuracy"],
        f"{prefix}/worst-client-loss": metrics["worst_client_loss"],
        f"{prefix}/accuracy-parity": metrics["accuracy_parity"],
    }
    for client, (accuracy, loss) in enumerate(zip(metrics["client_accuracy"], metrics["client_loss"])):
        values[f"{prefix}/client-{client}/accuracy"] = accuracy
        values[f"{prefix}/client-{client}/loss"] = loss
    return values
