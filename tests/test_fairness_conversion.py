"""Online-to-batch conversions: uniform averaging and the adaptive domination bookkeeping."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from strategies.conversion import AdaptiveAverage, UniformAverage, dominates


def model(value: float) -> dict[str, np.ndarray]:
    return {"weight": np.full((2, 2), value, dtype=np.float32), "steps": np.array([int(value)], dtype=np.int64)}


def test_dominates_is_weak_and_coordinatewise():
    assert dominates([1.0, 2.0], [1.0, 3.0])
    assert dominates([1.0, 2.0], [1.0, 2.0])
    assert not dominates([1.0, 4.0], [2.0, 3.0])


def test_uniform_average_of_iterates():
    conversion = UniformAverage()
    for value in (1.0, 2.0, 6.0):
        conversion.add(model(value))

    average = conversion.average()
    np.testing.assert_allclose(average["weight"], np.full((2, 2), 3.0))
    assert average["weight"].dtype == np.float32
    assert average["steps"].dtype == np.int64
    assert conversion.count == 3


def test_uniform_average_before_first_iterate_is_none():
    assert UniformAverage().average() is None
    assert AdaptiveAverage().average() is None


def test_first_iterate_is_kept_with_weight_one():
    conversion = AdaptiveAverage()

    assert conversion.add(model(1.0), [1.0, 1.0]) == "kept"
    assert conversion.weights == [1.0]


def test_dominated_iterate_splits_weight_among_dominators():
    conversion = AdaptiveAverage()
    conversion.add(model(1.0), [1.0, 3.0])
    conversion.add(model(2.0), [3.0, 1.0])

    outcome = conversion.add(model(9.0), [4.0, 4.0])

    assert outcome == "dominated"
    assert conversion.weights == [1.5, 1.5]
    assert len(conversion.iterates) == 2


def test_dominated_iterate_gives_weight_only_to_its_dominators():
    conversion = AdaptiveAverage()
    conversion.add(model(1.0), [1.0, 3.0])
    conversion.add(model(2.0), [3.0, 1.0])

    conversion.add(model(9.0), [2.0, 3.5])

    assert conversion.weights == [2.0, 1.0]


def test_new_iterate_absorbs_weights_of_those_it_dominates():
    conversion = AdaptiveAverage()
    conversion.add(model(1.0), [2.0, 3.0])
    conversion.add(model(2.0), [3.0, 2.0])
    conversion.add(model(3.0), [5.0, 5.0])  # dominated: weights become 1.5 and 1.5

    outcome = conversion.add(model(4.0), [1.0, 1.0])

    assert outcome == "kept"
    assert conversion.weights == [4.0]
    assert conversion.losses == [[1.0, 1.0]]
    np.testing.assert_array_equal(conversion.iterates[0]["weight"], model(4.0)["weight"])


def test_non_dominated_iterate_joins_without_absorbing():
    conversion = AdaptiveAverage()
    conversion.add(model(1.0), [1.0, 3.0])

    conversion.add(model(2.0), [3.0, 1.0])

    assert conversion.weights == [1.0, 1.0]


def test_equal_loss_vector_counts_as_dominated():
    conversion = AdaptiveAverage()
    conversion.add(model(1.0), [1.0, 1.0])

    assert conversion.add(model(2.0), [1.0, 1.0]) == "dominated"
    assert conversion.weights == [2.0]


def test_total_weight_equals_number_of_iterates():
    generator = np.random.default_rng(0)
    conversion = AdaptiveAverage()
    for step in range(200):
        conversion.add(model(float(step)), generator.random(4).tolist())

        assert sum(conversion.weights) == pytest.approx(step + 1)
        assert conversion.count == step + 1


def test_kept_iterates_do_not_dominate_one_another():
    generator = np.random.default_rng(1)
    conversion = AdaptiveAverage()
    for step in range(200):
        conversion.add(model(float(step)), generator.random(3).tolist())

    for first, second in zip(conversion.losses, conversion.losses[1:]):
        assert not dominates(first, second)
        assert not dominates(second, first)


def test_adaptive_output_is_weighted_average():
    conversion = AdaptiveAverage()
    conversion.add(model(1.0), [1.0, 3.0])
    conversion.add(model(3.0), [3.0, 1.0])
    conversion.add(model(100.0), [5.0, 5.0])  # dominated by both: weights 1.5 and 1.5

    average = conversion.average()

    np.testing.assert_allclose(average["weight"], np.full((2, 2), (1.5 * 1.0 + 1.5 * 3.0) / 3))


def test_stored_iterate_survives_numpy_edit():
    live = model(1.0)
    conversion = AdaptiveAverage()
    conversion.add(live, [1.0, 1.0])

    live["weight"] += 5.0

    np.testing.assert_array_equal(conversion.iterates[0]["weight"], np.full((2, 2), 1.0, dtype=np.float32))


def test_stored_iterate_survives_torch_edit():
    network = torch.nn.Linear(3, 2)
    adaptive, uniform = AdaptiveAverage(), UniformAverage()
    before = {key: value.detach().numpy().copy() for key, value in network.state_dict().items()}
    adaptive.add(network.state_dict(), [1.0])
    uniform.add(network.state_dict())

    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(10.0)

    for key, value in before.items():
        np.testing.assert_array_equal(adaptive.iterates[0][key], value)
        np.testing.assert_array_equal(adaptive.average()[key], value)
        np.testing.assert_array_equal(uniform.average()[key], value)


def test_adaptive_rejects_loss_vector_of_wrong_length():
    conversion = AdaptiveAverage()
    conversion.add(model(1.0), [1.0, 1.0])

    with pytest.raises(ValueError, match="2"):
        conversion.add(model(2.0), [1.0])


def test_conversion_state_round_trips_through_asdict():
    conversion = AdaptiveAverage()
    conversion.add(model(1.0), [1.0, 3.0])
    conversion.add(model(2.0), [3.0, 1.0])

    restored = AdaptiveAverage(**dataclasses.asdict(conversion))
    restored.add(model(5.0), [4.0, 4.0])
    conversion.add(model(5.0), [4.0, 4.0])

    assert restored.weights == conversion.weights
    np.testing.assert_array_equal(restored.average()["weight"], conversion.average()["weight"])
