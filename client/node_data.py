"""A node's local data: its partition of a dataset, or its own data directory.

Each node reads its data once and keeps it in memory, keyed on the values that
determine it, so a node never re-reads files between rounds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from simulations.datasets import load_dataset
from simulations.partition import make_partitions


class NodeConfigError(ValueError):
    """Raised when a node's configuration does not say which data it serves."""


@dataclass(frozen=True)
class NodeData:
    """Tensors of one node's training and test split."""

    partition_id: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    input_shape: tuple[int, int, int]
    num_classes: int


def load_node_data(run_config: dict, node_config: dict) -> NodeData:
    """Load the data a node serves, as named by its node configuration.

    A node is given either ``partition-id`` and ``num-partitions`` (its share of
    the run's dataset, split by the run's partitioner and seed), or ``data-dir``
    (a directory holding the node's own files in the dataset's usual format).
    """
    if "data-dir" in node_config and str(node_config["data-dir"]):
        return _load_directory(str(run_config["dataset"]), str(node_config["data-dir"]))

    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise NodeConfigError(
            f"Node config {dict(node_config)!r} names no data; start the node with "
            "--node-config 'partition-id=I num-partitions=N' or \"data-dir='DIR'\"."
        )
    partition_id = int(node_config["partition-id"])
    num_partitions = int(node_config["num-partitions"])
    if num_partitions != int(run_config["num-clients"]):
        raise NodeConfigError(
            f"Node has num-partitions = {num_partitions} but the run has num-clients = "
            f"{run_config['num-clients']}; set both to the number of nodes."
        )
    if not 0 <= partition_id < num_partitions:
        raise NodeConfigError(f"partition-id = {partition_id} is outside 0..{num_partitions - 1}.")
    return _load_partition(
        str(run_config["dataset"]),
        str(run_config["data-dir"]),
        str(run_config["partition"]),
        num_partitions,
        int(run_config["seed"]),
        float(run_config["alpha"]),
        int(run_config["classes-per-client"]),
        partition_id,
    )


@functools.lru_cache(maxsize=None)
def _load_partition(
    dataset_name: str,
    data_dir: str,
    partition: str,
    num_partitions: int,
    seed: int,
    alpha: float,
    classes_per_client: int,
    partition_id: int,
) -> NodeData:
    dataset = load_dataset(dataset_name, data_dir or None)
    splits = make_partitions(dataset, partition, num_partitions, seed, alpha=alpha, classes_per_client=classes_per_client)
    train_index = splits.train[partition_id]
    test_index = splits.test[partition_id]
    return NodeData(
        partition_id=partition_id,
        train_x=_tensor(dataset.train_x[train_index]),
        train_y=_tensor(dataset.train_y[train_index]),
        test_x=_tensor(dataset.test_x[test_index]),
        test_y=_tensor(dataset.test_y[test_index]),
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
    )


@functools.lru_cache(maxsize=None)
def _load_directory(dataset_name: str, data_dir: str) -> NodeData:
    dataset = load_dataset(dataset_name, data_dir)
    return NodeData(
        partition_id=-1,
        train_x=_tensor(dataset.train_x),
        train_y=_tensor(dataset.train_y),
        test_x=_tensor(dataset.test_x),
        test_y=_tensor(dataset.test_y),
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
    )


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True))
