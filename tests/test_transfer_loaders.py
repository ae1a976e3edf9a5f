"""Loaders of CIFAR-10, SVHN and MNIST-M files in their distribution formats, on small files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from simulations.datasets import DatasetError
from simulations.transfer_datasets import load_cifar10, load_mnistm, load_svhn


def write_cifar_batch(path: Path, images: np.ndarray, labels: list[int]) -> None:
    batch = {b"batch_label": b"small", b"labels": labels, b"data": images.reshape(len(images), -1), b"filenames": []}
    with open(path, "wb") as stream:
        pickle.dump(batch, stream)


def test_cifar10_reads_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, size=(5, 2, 3, 32, 32), dtype=np.uint8)
    for index in range(5):
        write_cifar_batch(folder / f"data_batch_{index + 1}", train_images[index], [index, (index + 1) % 10])
    test_images = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
    write_cifar_batch(folder / "test_batch", test_images, [7, 8, 9])

    dataset = load_cifar10(tmp_path)

    assert dataset.input_shape == (3, 32, 32)
    assert dataset.train_y.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert dataset.test_y.tolist() == [7, 8, 9]
    # Normalization is one affine map, so the order of pixel values survives it.
    first = train_images[0, 0].reshape(-1)
    assert np.array_equal(np.argsort(dataset.train_x[0].reshape(-1), kind="stable"), np.argsort(first, kind="stable"))


def test_cifar10_names_missing_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    write_cifar_batch(folder / "test_batch", np.zeros((1, 3, 32, 32), dtype=np.uint8), [0])
    with pytest.raises(DatasetError, match="data_batch_1"):
        load_cifar10(folder)


def test_cifar10_needs_a_data_directory():
    with pytest.raises(DatasetError, match="set data-dir"):
        load_cifar10(None)


def write_svhn(path: Path, images_nhwc: np.ndarray, labels: list[int]) -> None:
    savemat(path, {"X": images_nhwc.transpose(1, 2, 3, 0), "y": np.array(labels, dtype=np.uint8).reshape(-1, 1)})


def test_svhn_maps_label_ten_to_zero(tmp_path):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    write_svhn(tmp_path / "train_32x32.mat", train, [10, 1, 2, 9])
    write_svhn(tmp_path / "test_32x32.mat", rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8), [3, 10])

    dataset = load_svhn(tmp_path)

    assert dataset.input_shape == (3, 32, 32)
    assert dataset.train_y.tolist() == [0, 1, 2, 9]
    assert dataset.test_y.tolist() == [3, 0]
    red = train[1, :, :, 0].reshape(-1)
    assert np.array_equal(np.argsort(dataset.train_x[1, 0].reshape(-1), kind="stable"), np.argsort(red, kind="stable"))


def test_svhn_rejects_label_outside_one_to_ten(tmp_path):
    images = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    write_svhn(tmp_path / "train_32x32.mat", images, [11])
    write_svhn(tmp_path / "test_32x32.mat", images, [1])
    with pytest.raises(DatasetError, match="expected 1..10"):
        load_svhn(tmp_path)


def write_mnistm_split(directory: Path, split: str, labels: list[int], rng: np.random.Generator) -> np.ndarray:
    folder = directory / f"mnist_m_{split}"
    folder.mkdir(parents=True)
    images = rng.integers(0, 256, size=(len(labels), 28, 28, 3), dtype=np.uint8)
    lines = []
    for index, (image, label) in enumerate(zip(images, labels)):
        name = f"{index:08d}.png"
        Image.fromarray(image).save(folder / name)
        lines.append(f"{name} {label}")
    (directory / f"mnist_m_{split}_labels.txt").write_text("\n".join(lines) + "\n")
    return images


def test_mnistm_reads_image_folders_and_label_files(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "mnist_m"
    train = write_mnistm_split(root, "train", [3, 1, 4], rng)
    write_mnistm_split(root, "test", [5, 9], rng)

    dataset = load_mnistm(tmp_path)

    assert dataset.input_shape == (3, 28, 28)
    assert dataset.train_y.tolist() == [3, 1, 4]
    assert dataset.test_y.tolist() == [5, 9]
    green = train[2, :, :, 1].reshape(-1)
    assert np.array_equal(np.argsort(dataset.train_x[2, 1].reshape(-1), kind="stable"), np.argsort(green, kind="stable"))


def test_mnistm_rejects_malformed_label_line(tmp_path):
    rng = np.random.default_rng(3)
    write_mnistm_split(tmp_path, "train", [1], rng)
    write_mnistm_split(tmp_path, "test", [2], rng)
    (tmp_path / "mnist_m_train_labels.txt").write_text("00000000.png seven\n")
    with pytest.raises(DatasetError, match="line 1"):
        load_mnistm(tmp_path)
