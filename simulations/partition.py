"""Split a dataset's examples among simulated clients (IID, Dirichlet, label shards, natural groups).

Every partitioner takes a seed or a `numpy.random.Generator`, validates its inputs before
drawing anything, and returns one sorted int64 index array per client. The arrays are
disjoint. `make_partitions` builds matching train and test splits for a `Dataset` and caches
them per process, because every simulated client node asks for the same split.
"""

from __future__ import annotations

import hashlib
import logging
import math
import operator
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from simulations.datasets import Dataset

logger = logging.getLogger(__name__)

PARTITIONERS: dict[str, str] = {
    "iid": "Shuffle the training examples and deal them out in near-equal parts.",
    "dirichlet": "Per class, split the examples among clients in proportions drawn from Dir(alpha).",
    "shards": "Each client gets classes-per-client classes, and each class is split evenly among its clients.",
    "natural": "One client per natural group of the dataset (a writer, a region); needs group ids.",
}


class PartitionError(ValueError):
    """Raised for partition arguments that cannot give every client a valid, non-empty part."""


@dataclass(frozen=True)
class ClientSplits:
    """Per-client index arrays into a dataset's training and test examples.

    ``train[i]`` and ``test[i]`` belong to client i. A result of `make_partitions` is cached and
    shared, so its arrays are read-only and callers must not change its lists.
    """

    train: list[np.ndarray]
    test: list[np.ndarray]


# ---------------------------------------------------------------------------------------------
# Input checks


def _to_generator(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise PartitionError(
        f"Invalid rng {rng!r}: pass a numpy.random.Generator or an integer seed so the partition is reproducible."
    )


def _check_integer(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool):
        raise PartitionError(f"Invalid {name} = {value!r}: expected an integer >= {minimum}.")
    try:
        number = operator.index(value)
    except TypeError:
        raise PartitionError(f"Invalid {name} = {value!r}: expected an integer >= {minimum}.") from None
    if number < minimum:
        raise PartitionError(f"Invalid {name} = {number}: it must be at least {minimum}.")
    return number


def _check_labels(labels: np.ndarray | Sequence[int], name: str = "labels") -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise PartitionError(f"Invalid {name}: expected a 1-D array of class labels, got shape {array.shape}.")
    if array.size == 0:
        raise PartitionError(f"Invalid {name}: the array is empty, so there is nothing to partition.")
    if not np.issubdtype(array.dtype, np.integer):
        raise PartitionError(f"Invalid {name}: expected integer class labels, got dtype {array.dtype}.")
    if array.min() < 0:
        raise PartitionError(f"Invalid {name}: class labels must be >= 0, found {array.min()}.")
    return array.astype(np.int64, copy=False)


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise PartitionError(f"Invalid alpha = {alpha!r}: expected a positive number such as 0.5.")
    if not math.isfinite(alpha) or alpha <= 0:
        raise PartitionError(
            f"Invalid alpha = {alpha!r}: the Dirichlet concentration must be a finite number > 0; "
            "use 0.1 to 1 for strong label skew or 100 and above for near-IID clients."
        )
    return float(alpha)


def _check_enough_samples(num_samples: int, num_clients: int) -> None:
    if num_clients > num_samples:
        raise PartitionError(
            f"More clients than samples: num_clients = {num_clients} but only {num_samples} examples; "
            f"use at most {num_samples} clients."
        )


def _sorted_parts(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


def _split_by_counts(indices: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Cut ``indices`` into consecutive pieces of the given sizes, which must sum to its length."""
    return np.split(indices, np.cumsum(counts)[:-1])


# ---------------------------------------------------------------------------------------------
# Partitioners


def partition_iid(num_samples: int, num_clients: int, rng: np.random.Generator | int) -> list[np.ndarray]:
    """Shuffle ``range(num_samples)`` and split it into ``num_clients`` parts of near-equal size.

    Part sizes differ by at most one. Because the split follows a random permutation, a dataset
    stored sorted by label still gives every client a mix of classes.
    """
    num_samples = _check_integer("num_samples", num_samples, 1)
    num_clients = _check_integer("num_clients", num_clients, 1)
    _check_enough_samples(num_samples, num_clients)
    generator = _to_generator(rng)

    permutation = generator.permutation(num_samples)
    return _sorted_parts(np.array_split(permutation, num_clients))


def _draw_dirichlet_parts(
    labels: np.ndarray, num_clients: int, alpha: float, generator: np.random.Generator
) -> list[np.ndarray]:
    """Split each class's shuffled indices among clients in Dir(alpha) proportions."""
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        class_indices = generator.permutation(np.flatnonzero(labels == label))
        proportions = generator.dirichlet(np.full(num_clients, alpha))

        # Rounding the cumulative proportions down gives cut points that assign every example
        # once. A class with fewer examples than clients leaves some clients without it.
        cut_points = np.floor(np.cumsum(proportions)[:-1] * len(class_indices)).astype(np.int64)
        for client, piece in enumerate(np.split(class_indices, cut_points)):
            pieces[client].append(piece)
    return _sorted_parts([np.concatenate(client_pieces) for client_pieces in pieces])


def partition_dirichlet(
    labels: np.ndarray | Sequence[int],
    num_clients: int,
    alpha: float,
    rng: np.random.Generator | int,
    min_examples: int = 1,
    max_retries: int = 100,
) -> list[np.ndarray]:
    """Split examples among clients with label proportions drawn from a Dirichlet distribution.

    For every class c, client proportions p_c ~ Dir(alpha * 1_K) over the K clients are drawn,
    and the shuffled examples of class c are cut in those proportions. Small alpha gives each
    client few classes, and alpha = 1000 gives near-IID label proportions. Drawing per class, not
    per client, keeps every example assigned, but client sizes vary with the draw.

    When some client ends up with fewer than ``min_examples`` examples, the whole split is
    redrawn, at most ``max_retries`` times, before PartitionError is raised.
    """
    labels = _check_labels(labels)
    num_clients = _check_integer("num_clients", num_clients, 1)
    min_examples = _check_integer("min_examples", min_examples, 0)
    max_retries = _check_integer("max_retries", max_retries, 0)
    alpha = _check_alpha(alpha)
    _check_enough_samples(len(labels), num_clients)
    if min_examples * num_clients > len(labels):
        raise PartitionError(
            f"Invalid min_examples = {min_examples}: {num_clients} clients with at least {min_examples} examples "
            f"each need {min_examples * num_clients}, but there are {len(labels)}; lower min_examples or num_clients."
        )
    generator = _to_generator(rng)

    for attempt in range(max_retries + 1):
        parts = _draw_dirichlet_parts(labels, num_clients, alpha, generator)
        sizes = np.array([len(part) for part in parts])
        smallest_client = int(np.argmin(sizes))
        if sizes[smallest_client] >= min_examples:
            return parts
        logger.debug(
            "Dirichlet draw %d gave client %d only %d examples (min_examples = %d); redrawing",
            attempt,
            smallest_client,
            sizes[smallest_client],
            min_examples,
        )

    raise PartitionError(
        f"Dirichlet partition with alpha = {alpha} left a client below min_examples = {min_examples} in all "
        f"{max_retries + 1} draws (in the last, client {smallest_client} got only {sizes[smallest_client]} examples); "
        "use a larger alpha or fewer clients."
    )


def _assign_classes_to_clients(
    classes: np.ndarray, num_clients: int, classes_per_client: int, generator: np.random.Generator
) -> list[np.ndarray]:
    """Give each client ``classes_per_client`` distinct classes, using every class equally often.

    Client by client, the k = ``classes_per_client`` classes used least so far are chosen, with
    ties broken at random. If the use counts differ by at most one before a client's turn, they
    still do after it, so every class ends up with floor(K k / C) or ceil(K k / C) of the K k
    slots (K clients, C classes). Random tie-breaking varies which classes share a client.
    """
    use_counts = np.zeros(len(classes), dtype=np.int64)
    client_classes = []
    for _ in range(num_clients):
        # Adding a uniform draw in [0, 1) orders by use count first and at random within a count.
        priority = use_counts + generator.random(len(classes))
        chosen = np.argsort(priority)[:classes_per_client]
        use_counts[chosen] += 1
        client_classes.append(np.sort(classes[chosen]))
    return client_classes


def partition_shards(
    labels: np.ndarray | Sequence[int],
    num_clients: int,
    classes_per_client: int,
    rng: np.random.Generator | int,
) -> list[np.ndarray]:
    """Give each client the examples of exactly ``classes_per_client`` classes (label shards).

    Each class is assigned to as nearly the same number of clients as possible, and its
    shuffled examples are split evenly among those clients. Classes are the distinct values in
    ``labels``. When num_clients * classes_per_client is below the number of classes, some
    classes go to no client and their examples are left out, with a warning.
    """
    labels = _check_labels(labels)
    num_clients = _check_integer("num_clients", num_clients, 1)
    classes_per_client = _check_integer("classes_per_client", classes_per_client, 1)
    classes = np.unique(labels)
    if classes_per_client > len(classes):
        raise PartitionError(
            f"Invalid classes_per_client = {classes_per_client}: the labels contain only {len(classes)} classes; "
            f"use a value from 1 to {len(classes)}."
        )
    _check_enough_samples(len(labels), num_clients)
    generator = _to_generator(rng)

    client_classes = _assign_classes_to_clients(classes, num_clients, classes_per_client, generator)

    clients_of_class: dict[int, list[int]] = {int(label): [] for label in classes}
    for client, assigned_classes in enumerate(client_classes):
        for label in assigned_classes:
            clients_of_class[int(label)].append(client)

    pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    unused_examples = 0
    for label, clients in clients_of_class.items():
        class_indices = generator.permutation(np.flatnonzero(labels == label))
        if not clients:
            unused_examples += len(class_indices)
            continue
        if len(class_indices) < len(clients):
            raise PartitionError(
                f"Class {label} has {len(class_indices)} examples but is assigned to {len(clients)} clients, so some "
                "would get none of it; use fewer clients or a smaller classes_per_client."
            )
        for client, piece in zip(clients, np.array_split(class_indices, len(clients))):
            pieces[client].append(piece)

    if unused_examples:
        logger.warning(
            "Shard partition leaves %d examples unassigned because %d clients x %d classes cover fewer than %d classes",
            unused_examples,
            num_clients,
            classes_per_client,
            len(classes),
        )
    return _sorted_parts([np.concatenate(client_pieces) for client_pieces in pieces])


def partition_natural(groups: np.ndarray | Sequence[object]) -> list[np.ndarray]:
    """Make one client per distinct group id, with the indices of that group's examples.

    Client i gets the group with the i-th smallest id, in the order of ``np.unique(groups)``.
    Group ids may be integers or strings.
    """
    array = np.asarray(groups)
    if array.ndim != 1:
        raise PartitionError(f"Invalid groups: expected a 1-D array of group ids, got shape {array.shape}.")
    if array.size == 0:
        raise PartitionError("Invalid groups: the array is empty, so there is nothing to partition.")

    _, group_of_example, group_sizes = np.unique(array, return_inverse=True, return_counts=True)
    by_group = np.argsort(group_of_example, kind="stable")
    return _sorted_parts(_split_by_counts(by_group, group_sizes))


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Round ``total * weights / weights.sum()`` to integers that sum to ``total``.

    Each share is rounded down and the leftover units go to the largest fractional parts, ties
    to the lower index. A zero weight gets zero, because fewer units are left over than there
    are positive fractional parts.
    """
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    leftover = total - int(counts.sum())
    by_fraction = np.argsort(-(exact - counts), kind="stable")
    counts[by_fraction[:leftover]] += 1
    return counts


def split_test_like_train(
    train_labels: np.ndarray | Sequence[int],
    train_parts: Sequence[np.ndarray],
    test_labels: np.ndarray | Sequence[int],
    rng: np.random.Generator | int,
) -> list[np.ndarray]:
    """Split the test set among clients so each client's test labels follow its training labels.

    For each class c, the shuffled test examples of c are divided among clients in proportion
    to each client's number of training examples of c, with largest-remainder rounding. A
    client with no training example of c gets no test example of c. A class that no
    client trains on is split evenly. Every test example goes to exactly one client.
    """
    train_labels = _check_labels(train_labels, "train_labels")
    test_labels = _check_labels(test_labels, "test_labels")
    if len(train_parts) == 0:
        raise PartitionError("Invalid train_parts: expected one index array per client, got none.")
    for client, part in enumerate(train_parts):
        part = np.asarray(part)
        if part.size and (part.min() < 0 or part.max() >= len(train_labels)):
            raise PartitionError(
                f"Invalid train_parts[{client}]: indices must be in [0, {len(train_labels)}), "
                f"found {part.min()} to {part.max()}."
            )
    generator = _to_generator(rng)

    num_clients = len(train_parts)
    num_labels = int(max(train_labels.max(), test_labels.max())) + 1
    train_counts = np.stack(
        [np.bincount(train_labels[np.asarray(part, dtype=np.int64)], minlength=num_labels) for part in train_parts]
    )

    pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(test_labels):
        class_indices = generator.permutation(np.flatnonzero(test_labels == label))
        weights = train_counts[:, label].astype(np.float64)
        if weights.sum() == 0:
            weights = np.ones(num_clients)
        counts = _largest_remainder(len(class_indices), weights)
        for client, piece in enumerate(_split_by_counts(class_indices, counts)):
            pieces[client].append(piece)
    return _sorted_parts([np.concatenate(client_pieces) for client_pieces in pieces])


# ---------------------------------------------------------------------------------------------
# Train and test splits for a Dataset


def _natural_splits(dataset: Dataset, num_clients: int) -> ClientSplits:
    if dataset.train_groups is None or dataset.test_groups is None:
        raise PartitionError(
            f"Partition 'natural' needs group ids, but dataset {dataset.name!r} has none; "
            f"choose one of: {', '.join(name for name in PARTITIONERS if name != 'natural')}."
        )
    group_ids = np.unique(dataset.train_groups)
    if num_clients != len(group_ids):
        raise PartitionError(
            f"Partition 'natural' makes one client per group: dataset {dataset.name!r} has {len(group_ids)} "
            f"training groups but num_clients = {num_clients}; set num_clients to {len(group_ids)}."
        )
    unknown_test_groups = np.setdiff1d(np.unique(dataset.test_groups), group_ids)
    if unknown_test_groups.size:
        raise PartitionError(
            f"Partition 'natural': test groups {unknown_test_groups.tolist()} of dataset {dataset.name!r} have no "
            "training examples, so no client would evaluate them; give both splits the same group ids."
        )

    train = partition_natural(dataset.train_groups)
    test = [np.flatnonzero(dataset.test_groups == group_id).astype(np.int64) for group_id in group_ids]
    return ClientSplits(train=train, test=test)


def _build_splits(
    dataset: Dataset, partition: str, num_clients: int, seed: int, alpha: float, classes_per_client: int
) -> ClientSplits:
    if partition == "natural":
        return _natural_splits(dataset, num_clients)

    generator = np.random.default_rng(seed)
    if partition == "iid":
        train = partition_iid(len(dataset.train_y), num_clients, generator)
    elif partition == "dirichlet":
        train = partition_dirichlet(dataset.train_y, num_clients, alpha, generator)
    else:
        train = partition_shards(dataset.train_y, num_clients, classes_per_client, generator)
    test = split_test_like_train(dataset.train_y, train, dataset.test_y, generator)
    return ClientSplits(train=train, test=test)


def _labels_fingerprint(dataset: Dataset) -> str:
    """Hash the labels and group ids, so two datasets with one name but other files get other keys."""
    digest = hashlib.blake2b(digest_size=16)
    for array in (dataset.train_y, dataset.test_y, dataset.train_groups, dataset.test_groups):
        digest.update(b"none" if array is None else np.ascontiguousarray(array).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


_SPLITS_CACHE: dict[tuple[object, ...], ClientSplits] = {}
_SPLITS_CACHE_LOCK = threading.Lock()


def make_partitions(
    dataset: Dataset,
    partition: str,
    num_clients: int,
    seed: int,
    alpha: float = 0.5,
    classes_per_client: int = 2,
) -> ClientSplits:
    """Split a dataset's training and test examples among ``num_clients`` clients.

    ``partition`` is a name from `PARTITIONERS`. ``alpha`` is used only by "dirichlet" and
    ``classes_per_client`` only by "shards". Test parts follow each client's training label
    distribution (see `split_test_like_train`), except for "natural", which splits the test
    set by its own group ids. The same arguments give the same splits, and the result is
    cached per process on the dataset's name and labels and on these arguments.

    Raises PartitionError for invalid arguments and when a client would get no training example.
    """
    if partition not in PARTITIONERS:
        raise PartitionError(f"Unknown partition {partition!r}; choose one of: {', '.join(PARTITIONERS)}.")
    num_clients = _check_integer("num_clients", num_clients, 1)
    seed = _check_integer("seed", seed, 0)
    _check_enough_samples(len(dataset.train_y), num_clients)

    key: tuple[object, ...] = (dataset.name, _labels_fingerprint(dataset), partition, num_clients, seed)
    if partition == "dirichlet":
        key += (_check_alpha(alpha),)
    elif partition == "shards":
        key += (_check_integer("classes_per_client", classes_per_client, 1),)

    with _SPLITS_CACHE_LOCK:
        cached = _SPLITS_CACHE.get(key)
        if cached is not None:
            return cached

        splits = _build_splits(dataset, partition, num_clients, seed, alpha, classes_per_client)
        for client, part in enumerate(splits.train):
            if len(part) == 0:
                raise PartitionError(
                    f"Client {client} of {num_clients} got no training examples with partition {partition!r}; "
                    "use fewer clients or, for partition 'dirichlet', a larger alpha."
                )
        empty_test_clients = [client for client, part in enumerate(splits.test) if len(part) == 0]
        if empty_test_clients:
            logger.warning(
                "Clients %s got no test examples with partition %r on dataset %s; their evaluation is empty",
                empty_test_clients,
                partition,
                dataset.name,
            )

        for part in (*splits.train, *splits.test):
            part.flags.writeable = False
        logger.info(
            "Partitioned %s for %d clients with %r (seed %d): train sizes %d to %d, test sizes %d to %d",
            dataset.name,
            num_clients,
            partition,
            seed,
            min(len(part) for part in splits.train),
            max(len(part) for part in splits.train),
            min(len(part) for part in splits.test),
            max(len(part) for part in splits.test),
        )
        _SPLITS_CACHE[key] = splits
        return splits
