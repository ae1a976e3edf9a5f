"""Tests for simulations.partition: the partitioners, test splits and make_partitions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulations.datasets import Dataset
from simulations.partition import (
    PARTITIONERS,
    ClientSplits,
    PartitionError,
    make_partitions,
    partition_dirichlet,
    partition_iid,
    partition_natural,
    partition_shards,
    split_test_like_train,
)


def sorted_labels(num_classes: int, per_class: int) -> np.ndarray:
    """Return labels 0,0,...,1,1,... as a dataset stored sorted by class would have them."""
    return np.repeat(np.arange(num_classes), per_class)


def toy_dataset(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    name: str = "toy",
    train_groups: np.ndarray | None = None,
    test_groups: np.ndarray | None = None,
) -> Dataset:
    train_x = np.zeros((len(train_labels), 1, 2, 2), dtype=np.float32)
    test_x = np.zeros((len(test_labels), 1, 2, 2), dtype=np.float32)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    return Dataset(
        name,
        train_x,
        train_labels.astype(np.int64),
        test_x,
        test_labels.astype(np.int64),
        num_classes,
        train_groups,
        test_groups,
    )


def assert_disjoint_cover(parts: list[np.ndarray], num_samples: int) -> None:
    """Check that the parts are int64 and together contain every index once."""
    for part in parts:
        assert part.dtype == np.int64
    combined = np.concatenate(parts)
    assert len(combined) == num_samples
    np.testing.assert_array_equal(np.sort(combined), np.arange(num_samples))


# ---------------------------------------------------------------------------------------------
# IID


def test_iid_on_sorted_labels_mixes_classes() -> None:
    labels = sorted_labels(num_classes=10, per_class=100)

    parts = partition_iid(len(labels), num_clients=10, rng=0)

    for part in parts:
        assert len(np.unique(labels[part])) >= 8


def test_iid_part_sizes_differ_by_at_most_one() -> None:
    parts = partition_iid(103, num_clients=10, rng=0)

    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == 103


def test_iid_covers_every_index_once() -> None:
    parts = partition_iid(257, num_clients=7, rng=np.random.default_rng(3))

    assert_disjoint_cover(parts, 257)


def test_iid_more_clients_than_samples_raises() -> None:
    with pytest.raises(PartitionError, match="More clients than samples: num_clients = 6 .* only 5"):
        partition_iid(5, num_clients=6, rng=0)


@pytest.mark.parametrize("rng", [None, 1.5, True, "seed"])
def test_iid_rejects_non_reproducible_rng(rng: object) -> None:
    with pytest.raises(PartitionError, match="Generator or an integer seed"):
        partition_iid(10, num_clients=2, rng=rng)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Dirichlet


def test_dirichlet_large_alpha_is_near_uniform() -> None:
    labels = sorted_labels(num_classes=10, per_class=1000)

    parts = partition_dirichlet(labels, num_clients=5, alpha=1000.0, rng=0)

    for part in parts:
        proportions = np.bincount(labels[part], minlength=10) / len(part)
        assert np.abs(proportions - 0.1).max() < 0.02


def test_dirichlet_small_alpha_skews_labels() -> None:
    labels = sorted_labels(num_classes=10, per_class=200)

    parts = partition_dirichlet(labels, num_clients=10, alpha=0.05, rng=0)

    largest_share = [np.bincount(labels[part], minlength=10).max() / len(part) for part in parts]
    assert np.median(largest_share) > 0.5


@pytest.mark.parametrize("alpha", [0.0, -0.5, float("nan"), float("inf")])
def test_dirichlet_invalid_alpha_names_value(alpha: float) -> None:
    with pytest.raises(PartitionError, match="alpha") as error:
        partition_dirichlet(sorted_labels(2, 10), num_clients=2, alpha=alpha, rng=0)
    assert repr(alpha) in str(error.value)


def test_dirichlet_rare_class_assigned_once() -> None:
    labels = np.concatenate([np.zeros(3, dtype=np.int64), np.ones(200, dtype=np.int64)])

    parts = partition_dirichlet(labels, num_clients=10, alpha=1.0, rng=0)

    assert_disjoint_cover(parts, len(labels))
    clients_with_class_zero = sum(int(np.any(labels[part] == 0)) for part in parts)
    assert clients_with_class_zero <= 3


def test_dirichlet_empty_client_raises() -> None:
    labels = np.array([0, 1, 0, 1, 0])

    with pytest.raises(PartitionError) as error:
        partition_dirichlet(labels, num_clients=4, alpha=1e-3, rng=0, max_retries=20)
    message = str(error.value)
    assert "only 0 examples" in message
    assert "21 draws" in message
    assert "larger alpha" in message


def test_dirichlet_impossible_min_examples_raises() -> None:
    with pytest.raises(PartitionError, match="min_examples = 5"):
        partition_dirichlet(sorted_labels(2, 5), num_clients=3, alpha=1.0, rng=0, min_examples=5)


def test_dirichlet_min_examples_respected() -> None:
    labels = sorted_labels(num_classes=10, per_class=50)

    parts = partition_dirichlet(labels, num_clients=10, alpha=0.3, rng=1, min_examples=10)

    assert min(len(part) for part in parts) >= 10


def test_dirichlet_rejects_float_labels() -> None:
    with pytest.raises(PartitionError, match="integer class labels"):
        partition_dirichlet(np.array([0.0, 1.0]), num_clients=1, alpha=1.0, rng=0)


# ---------------------------------------------------------------------------------------------
# Shards


@pytest.mark.parametrize("classes_per_client", [1, 2, 3, 10])
def test_shards_each_client_has_exactly_k_classes(classes_per_client: int) -> None:
    labels = sorted_labels(num_classes=10, per_class=60)

    parts = partition_shards(labels, num_clients=12, classes_per_client=classes_per_client, rng=0)

    for part in parts:
        assert len(np.unique(labels[part])) == classes_per_client


def test_shards_use_classes_evenly() -> None:
    labels = sorted_labels(num_classes=10, per_class=60)

    parts = partition_shards(labels, num_clients=7, classes_per_client=3, rng=0)

    clients_per_class = np.zeros(10, dtype=np.int64)
    for part in parts:
        clients_per_class[np.unique(labels[part])] += 1
    assert clients_per_class.max() - clients_per_class.min() <= 1
    assert clients_per_class.sum() == 21


def test_shards_split_classes_evenly() -> None:
    labels = sorted_labels(num_classes=4, per_class=30)

    parts = partition_shards(labels, num_clients=6, classes_per_client=2, rng=0)

    for label in range(4):
        counts = [int(np.sum(labels[part] == label)) for part in parts if np.any(labels[part] == label)]
        assert max(counts) - min(counts) <= 1


def test_shards_cover_every_example() -> None:
    labels = sorted_labels(num_classes=10, per_class=20)

    parts = partition_shards(labels, num_clients=10, classes_per_client=2, rng=5)

    assert_disjoint_cover(parts, len(labels))


@pytest.mark.parametrize("classes_per_client", [0, 11])
def test_shards_invalid_classes_per_client_raises(classes_per_client: int) -> None:
    with pytest.raises(PartitionError, match=f"classes_per_client = {classes_per_client}"):
        partition_shards(sorted_labels(10, 5), num_clients=2, classes_per_client=classes_per_client, rng=0)


def test_shards_class_with_too_few_examples_raises() -> None:
    labels = np.concatenate([np.zeros(2, dtype=np.int64), np.ones(50, dtype=np.int64)])

    with pytest.raises(PartitionError, match="Class 0 has 2 examples but is assigned to"):
        partition_shards(labels, num_clients=6, classes_per_client=2, rng=0)


# ---------------------------------------------------------------------------------------------
# Natural groups


def test_natural_orders_clients_by_group_id() -> None:
    parts = partition_natural(np.array(["west", "east", "west", "south", "east"]))

    assert len(parts) == 3
    np.testing.assert_array_equal(parts[0], [1, 4])
    np.testing.assert_array_equal(parts[1], [3])
    np.testing.assert_array_equal(parts[2], [0, 2])


def test_natural_accepts_a_list() -> None:
    parts = partition_natural([7, 3, 7])

    np.testing.assert_array_equal(parts[0], [1])
    np.testing.assert_array_equal(parts[1], [0, 2])


def test_natural_empty_groups_raise() -> None:
    with pytest.raises(PartitionError, match="empty"):
        partition_natural(np.array([], dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# Test splits


def test_split_test_assigns_every_test_example_once() -> None:
    train_labels = sorted_labels(num_classes=5, per_class=40)
    test_labels = np.random.default_rng(0).integers(0, 5, size=137)
    train_parts = partition_dirichlet(train_labels, num_clients=6, alpha=0.5, rng=0)

    test_parts = split_test_like_train(train_labels, train_parts, test_labels, rng=0)

    assert_disjoint_cover(test_parts, len(test_labels))


def test_split_test_follows_client_classes() -> None:
    train_labels = np.array([0] * 10 + [1] * 10 + [2] * 10 + [3] * 10)
    train_parts = [
        np.arange(0, 20),  # client 0 trains on classes {0, 1}
        np.concatenate([np.arange(0, 5), np.arange(20, 30)]),  # classes {0, 2}, overlaps client 0 on purpose
        np.arange(30, 40),  # class {3}
    ]
    test_labels = np.repeat(np.arange(4), 9)

    test_parts = split_test_like_train(train_labels, train_parts, test_labels, rng=0)

    assert set(test_labels[test_parts[0]].tolist()) == {0, 1}
    assert set(test_labels[test_parts[1]].tolist()) == {0, 2}
    assert set(test_labels[test_parts[2]].tolist()) == {3}


def test_split_test_shares_follow_train_counts() -> None:
    train_labels = np.zeros(40, dtype=np.int64)
    train_parts = [np.arange(0, 30), np.arange(30, 40)]
    test_labels = np.zeros(20, dtype=np.int64)

    test_parts = split_test_like_train(train_labels, train_parts, test_labels, rng=0)

    assert len(test_parts[0]) == 15
    assert len(test_parts[1]) == 5


def test_split_test_untrained_class_is_split_evenly() -> None:
    train_labels = np.zeros(30, dtype=np.int64)
    train_parts = [np.arange(0, 10), np.arange(10, 20), np.arange(20, 30)]
    test_labels = np.full(10, 4)

    test_parts = split_test_like_train(train_labels, train_parts, test_labels, rng=0)

    assert sorted(len(part) for part in test_parts) == [3, 3, 4]


def test_split_test_rejects_out_of_range_indices() -> None:
    train_labels = np.zeros(5, dtype=np.int64)
    train_parts = [np.arange(3), np.array([4, 5])]

    with pytest.raises(PartitionError, match=r"train_parts\[1\]"):
        split_test_like_train(train_labels, train_parts, np.zeros(2, dtype=np.int64), rng=0)


# ---------------------------------------------------------------------------------------------
# make_partitions


def test_partitioner_registry_names() -> None:
    assert set(PARTITIONERS) == {"iid", "dirichlet", "shards", "natural"}


def test_make_partitions_zero_clients_raises() -> None:
    dataset = toy_dataset(sorted_labels(2, 10), sorted_labels(2, 5))

    with pytest.raises(PartitionError, match="num_clients = 0"):
        make_partitions(dataset, "iid", num_clients=0, seed=0)


def test_more_clients_than_samples_raises() -> None:
    dataset = toy_dataset(sorted_labels(2, 10), sorted_labels(2, 5))

    with pytest.raises(PartitionError, match="More clients than samples: num_clients = 21 .* only 20"):
        make_partitions(dataset, "iid", num_clients=21, seed=0)


def test_make_partitions_unknown_partition_lists_names() -> None:
    dataset = toy_dataset(sorted_labels(2, 10), sorted_labels(2, 5))

    with pytest.raises(PartitionError) as error:
        make_partitions(dataset, "pathological", num_clients=2, seed=0)
    for name in PARTITIONERS:
        assert name in str(error.value)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards"])
def test_make_partitions_same_seed_same_parts(partition: str) -> None:
    dataset = toy_dataset(sorted_labels(10, 50), sorted_labels(10, 20), name=f"repro-{partition}")

    # Two names give two cache keys, so the second split is computed afresh.
    renamed = toy_dataset(dataset.train_y, dataset.test_y, name=f"repro-{partition}-again")

    first = make_partitions(dataset, partition, num_clients=8, seed=3)
    second = make_partitions(renamed, partition, num_clients=8, seed=3)

    assert first is not second
    for part_a, part_b in zip(first.train + first.test, second.train + second.test):
        np.testing.assert_array_equal(part_a, part_b)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards"])
def test_make_partitions_other_seed_other_parts(partition: str) -> None:
    dataset = toy_dataset(sorted_labels(10, 50), sorted_labels(10, 20), name=f"seeds-{partition}")

    first = make_partitions(dataset, partition, num_clients=8, seed=3)
    second = make_partitions(dataset, partition, num_clients=8, seed=4)

    assert any(not np.array_equal(part_a, part_b) for part_a, part_b in zip(first.train, second.train))


def test_make_partitions_is_cached_and_read_only() -> None:
    dataset = toy_dataset(sorted_labels(10, 50), sorted_labels(10, 20), name="cached")

    first = make_partitions(dataset, "dirichlet", num_clients=5, seed=0, alpha=0.5)
    second = make_partitions(dataset, "dirichlet", num_clients=5, seed=0, alpha=0.5)

    assert first is second
    assert isinstance(first, ClientSplits)
    assert not first.train[0].flags.writeable
    assert not first.test[0].flags.writeable


def test_partition_cache_keys_on_labels() -> None:
    first_dataset = toy_dataset(sorted_labels(2, 10), sorted_labels(2, 5), name="shared-name")
    second_dataset = toy_dataset(sorted_labels(2, 12), sorted_labels(2, 5), name="shared-name")

    first = make_partitions(first_dataset, "iid", num_clients=2, seed=0)
    second = make_partitions(second_dataset, "iid", num_clients=2, seed=0)

    assert sum(len(part) for part in first.train) == 20
    assert sum(len(part) for part in second.train) == 24


def test_partition_cache_ignores_unused_arguments() -> None:
    dataset = toy_dataset(sorted_labels(4, 10), sorted_labels(4, 5), name="unused-args")

    first = make_partitions(dataset, "iid", num_clients=2, seed=0, alpha=0.1)
    second = make_partitions(dataset, "iid", num_clients=2, seed=0, alpha=5.0)

    assert first is second


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards"])
def test_make_partitions_covers_test_set(partition: str) -> None:
    dataset = toy_dataset(sorted_labels(10, 30), sorted_labels(10, 7), name=f"cover-{partition}")

    splits = make_partitions(dataset, partition, num_clients=5, seed=0)

    assert_disjoint_cover(list(splits.train), len(dataset.train_y))
    assert_disjoint_cover(list(splits.test), len(dataset.test_y))


def test_make_partitions_natural_groups() -> None:
    dataset = toy_dataset(
        sorted_labels(2, 4),
        sorted_labels(2, 2),
        name="grouped",
        train_groups=np.array([2, 1, 2, 1, 3, 3, 1, 2]),
        test_groups=np.array([3, 1, 2, 1]),
    )

    splits = make_partitions(dataset, "natural", num_clients=3, seed=0)

    np.testing.assert_array_equal(splits.train[0], [1, 3, 6])
    np.testing.assert_array_equal(splits.train[2], [4, 5])
    np.testing.assert_array_equal(splits.test[0], [1, 3])
    np.testing.assert_array_equal(splits.test[1], [2])
    np.testing.assert_array_equal(splits.test[2], [0])


def test_natural_without_groups_raises() -> None:
    dataset = toy_dataset(sorted_labels(2, 4), sorted_labels(2, 2), name="ungrouped")

    with pytest.raises(PartitionError, match="needs group ids"):
        make_partitions(dataset, "natural", num_clients=2, seed=0)


def test_natural_client_count_mismatch_raises() -> None:
    dataset = toy_dataset(
        sorted_labels(2, 4),
        sorted_labels(2, 2),
        name="grouped-count",
        train_groups=np.array([0, 1, 2, 0, 1, 2, 0, 1]),
        test_groups=np.array([0, 1, 2, 0]),
    )

    with pytest.raises(PartitionError, match="has 3 training groups but num_clients = 5"):
        make_partitions(dataset, "natural", num_clients=5, seed=0)


def test_natural_unknown_test_group_raises() -> None:
    dataset = toy_dataset(
        sorted_labels(2, 2),
        sorted_labels(2, 2),
        name="grouped-unknown",
        train_groups=np.array([0, 0, 1, 1]),
        test_groups=np.array([0, 1, 9, 1]),
    )

    with pytest.raises(PartitionError, match=r"test groups \[9\]"):
        make_partitions(dataset, "natural", num_clients=2, seed=0)


def test_make_partitions_allows_empty_test_part() -> None:
    dataset = toy_dataset(sorted_labels(4, 10), np.zeros(6, dtype=np.int64), name="one-test-class")

    splits = make_partitions(dataset, "shards", num_clients=4, seed=0, classes_per_client=1)

    assert sum(len(part) for part in splits.test) == 6
    assert min(len(part) for part in splits.test) == 0


# ---------------------------------------------------------------------------------------------
# Properties


label_arrays = st.integers(min_value=1, max_value=6).flatmap(
    lambda num_classes: st.lists(st.integers(0, num_classes - 1), min_size=1, max_size=200)
)


@settings(max_examples=60, deadline=None)
@given(num_samples=st.integers(1, 500), num_clients=st.integers(1, 50), seed=st.integers(0, 2**32 - 1))
def test_iid_property_disjoint_cover(num_samples: int, num_clients: int, seed: int) -> None:
    if num_clients > num_samples:
        with pytest.raises(PartitionError):
            partition_iid(num_samples, num_clients, seed)
        return

    parts = partition_iid(num_samples, num_clients, seed)

    assert len(parts) == num_clients
    assert_disjoint_cover(parts, num_samples)


@settings(max_examples=60, deadline=None)
@given(
    labels=label_arrays,
    num_clients=st.integers(1, 8),
    alpha=st.floats(0.05, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_property_disjoint_cover(labels: list[int], num_clients: int, alpha: float, seed: int) -> None:
    label_array = np.array(labels)
    if num_clients > len(label_array):
        with pytest.raises(PartitionError, match="More clients than samples"):
            partition_dirichlet(label_array, num_clients, alpha, seed)
        return
    try:
        parts = partition_dirichlet(label_array, num_clients, alpha, seed, max_retries=5)
    except PartitionError as error:
        # Small label sets with many clients may leave a client empty in every draw.
        assert "larger alpha" in str(error)
        return

    assert len(parts) == num_clients
    assert min(len(part) for part in parts) >= 1
    assert_disjoint_cover(parts, len(label_array))


@settings(max_examples=60, deadline=None)
@given(labels=label_arrays, num_clients=st.integers(1, 8), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_shards_property_disjoint_and_k_classes(
    labels: list[int], num_clients: int, seed: int, data: st.DataObject
) -> None:
    label_array = np.array(labels)
    num_classes = len(np.unique(label_array))
    classes_per_client = data.draw(st.integers(1, num_classes), label="classes_per_client")
    try:
        parts = partition_shards(label_array, num_clients, classes_per_client, seed)
    except PartitionError as error:
        # A class with fewer examples than the clients assigned to it, or fewer examples than clients.
        assert "examples" in str(error)
        return

    combined = np.concatenate(parts)
    assert len(np.unique(combined)) == len(combined)
    for part in parts:
        assert len(np.unique(label_array[part])) == classes_per_client
    if num_clients * classes_per_client >= num_classes:
        assert_disjoint_cover(parts, len(label_array))


@settings(max_examples=60, deadline=None)
@given(
    train_labels=label_arrays,
    test_labels=st.lists(st.integers(0, 7), min_size=1, max_size=100),
    num_clients=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_test_property_classes_follow_train(
    train_labels: list[int], test_labels: list[int], num_clients: int, seed: int
) -> None:
    train_array = np.array(train_labels)
    test_array = np.array(test_labels)
    if num_clients > len(train_array):
        return
    train_parts = partition_iid(len(train_array), num_clients, seed)

    test_parts = split_test_like_train(train_array, train_parts, test_array, seed)

    assert_disjoint_cover(test_parts, len(test_array))
    trained_classes = set(train_array.tolist())
    for train_part, test_part in zip(train_parts, test_parts):
        client_classes = set(train_array[train_part].tolist())
        for label in set(test_array[test_part].tolist()) & trained_classes:
            assert label in client_classes


@pytest.mark.parametrize("alpha", [0.0, "large"])
def test_make_partitions_invalid_alpha_raises(alpha: object) -> None:
    dataset = toy_dataset(sorted_labels(2, 10), sorted_labels(2, 5), name="bad-alpha")

    with pytest.raises(PartitionError, match=f"Invalid alpha = {alpha!r}"):
        make_partitions(dataset, "dirichlet", num_clients=2, seed=0, alpha=alpha)  # type: ignore[arg-type]
