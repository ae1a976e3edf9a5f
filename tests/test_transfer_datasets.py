"""Transfer domains: the MNIST-M-style builder, its cache, and the digit variants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simulations import transfer_datasets
from simulations.datasets import DatasetError, load_dataset, write_idx
from simulations.transfer_datasets import (
    TEST_PHOTOS,
    TRAIN_PHOTOS,
    blend_with_photos,
    build_mnistm_synthetic,
    load_mnistm_synthetic,
    load_photos,
    optdigits_to_mnist_layout,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def small_digits(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 28, 28), dtype=np.uint8)


def solid_photo(colour: tuple[int, int, int], size: int = 40) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (size, size, 3)).copy()


def test_blend_is_absolute_difference_per_channel():
    digits = small_digits(5)
    photo = solid_photo((200, 10, 90))
    blended = blend_with_photos(digits, [photo], np.random.default_rng(0))

    expected = np.abs(np.array([200, 10, 90])[None, :, None, None] - digits[:, None].astype(int))
    assert blended.dtype == np.uint8
    assert blended.shape == (5, 3, 28, 28)
    assert np.array_equal(blended, expected)


def test_builder_is_deterministic_for_a_seed():
    digits = small_digits(20)
    photos = [np.random.default_rng(index).integers(0, 256, size=(50, 60, 3), dtype=np.uint8) for index in range(3)]

    first = build_mnistm_synthetic(digits, digits[:8], seed=4, train_photos=photos, test_photos=photos)
    second = build_mnistm_synthetic(digits, digits[:8], seed=4, train_photos=photos, test_photos=photos)
    other = build_mnistm_synthetic(digits, digits[:8], seed=5, train_photos=photos, test_photos=photos)

    assert np.array_equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert not np.array_equal(first[0], other[0])


def test_crops_come_from_split_photos():
    blank = np.zeros((30, 28, 28), dtype=np.uint8)
    train_colours = [(255, 0, 0), (0, 255, 0)]
    test_colours = [(0, 0, 255)]

    train, test = build_mnistm_synthetic(
        blank,
        blank,
        seed=0,
        train_photos=[solid_photo(colour) for colour in train_colours],
        test_photos=[solid_photo(colour) for colour in test_colours],
    )

    assert {tuple(image[:, 0, 0]) for image in train} == set(train_colours)
    assert {tuple(image[:, 0, 0]) for image in test} == set(test_colours)


def test_photo_pools_share_no_photo():
    assert not set(TRAIN_PHOTOS) & set(TEST_PHOTOS)
    train = load_photos(TRAIN_PHOTOS)
    test = load_photos(TEST_PHOTOS)
    for photo in train + test:
        assert photo.dtype == np.uint8
        assert photo.ndim == 3
        assert photo.shape[2] == 3
        assert max(photo.shape[:2]) <= transfer_datasets.PHOTO_LONGER_SIDE
    fingerprints = {photo.tobytes()[:4096] for photo in train}
    assert not any(photo.tobytes()[:4096] in fingerprints for photo in test)


def test_blend_rejects_photo_smaller_than_patch():
    with pytest.raises(DatasetError, match="smaller than a 28x28 patch"):
        blend_with_photos(small_digits(2), [solid_photo((1, 2, 3), size=20)], np.random.default_rng(0))


def write_small_mnist(directory: Path) -> None:
    directory.mkdir()
    rng = np.random.default_rng(0)
    write_idx(directory / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28), dtype=np.uint8))
    write_idx(directory / "train-labels-idx1-ubyte.gz", np.arange(40, dtype=np.uint8) % 10)
    write_idx(directory / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (12, 28, 28), dtype=np.uint8))
    write_idx(directory / "t10k-labels-idx1-ubyte.gz", np.arange(12, dtype=np.uint8) % 10)


def test_synthetic_target_is_cached_and_read_back(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("COROLLA_CACHE", str(cache))
    mnist = tmp_path / "mnist"
    write_small_mnist(mnist)

    built = load_mnistm_synthetic(mnist)
    files = list(cache.glob("mnistm-synthetic-*.npz"))
    read_back = load_mnistm_synthetic(mnist)

    assert len(files) == 1
    assert built.input_shape == (3, 28, 28)
    assert len(built.train_y) == 40
    assert len(built.test_y) == 12
    assert np.array_equal(built.train_x, read_back.train_x)
    assert np.array_equal(built.test_x, read_back.test_x)
    assert np.isfinite(built.train_x).all()


def test_cache_directory_defaults_to_user_cache(monkeypatch):
    monkeypatch.delenv("COROLLA_CACHE", raising=False)
    assert transfer_datasets.cache_directory() == Path.home() / ".cache" / "corolla"


def test_optdigits_layout_puts_digit_in_centre_box():
    counts = np.full((2, 8, 8), 16, dtype=np.uint8)
    images = optdigits_to_mnist_layout(counts)

    assert images.shape == (2, 28, 28)
    assert images.dtype == np.uint8
    assert images[:, :4].max() == 0
    assert images[:, -4:].max() == 0
    assert images[:, :, :4].max() == 0
    assert images[:, :, -4:].max() == 0
    assert images[:, 4:24, 4:24].min() == 255


def test_optdigits_28_matches_source_shape():
    assert load_dataset("optdigits-28").input_shape == load_dataset("mnist").input_shape == (1, 28, 28)


def test_mnist_rgb_replicates_the_channel():
    rgb = load_dataset("mnist-rgb")
    gray = load_dataset("mnist")

    assert rgb.input_shape == (3, 28, 28)
    for channel in range(3):
        assert np.array_equal(rgb.test_x[:50, channel], gray.test_x[:50, 0])
