"""Simplex projections and the entropic step: properties, brute force and closed forms."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from strategies.simplex import entropic_step, euclidean_step, project_to_capped_simplex, project_to_simplex

finite_values = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)
vectors = st.integers(min_value=1, max_value=12).flatmap(lambda size: arrays(np.float64, size, elements=finite_values))
small_vectors = st.integers(min_value=1, max_value=6).flatmap(lambda size: arrays(np.float64, size, elements=finite_values))


def brute_force_projection(values: np.ndarray) -> np.ndarray:
    """Return the projection found by trying every support S and keeping the one that meets the KKT conditions.

    The projection is ``v_S - τ`` on its support S and 0 elsewhere, with τ fixed by the sum.
    It is the candidate whose entries on S are >= 0 and whose left-out values are <= τ.
    Checking these conditions is exact for small m, where comparing squared distances is not:
    two supports can give distances that differ by less than the rounding error of their sum.
    """
    tolerance = 1e-9
    for size in range(1, values.size + 1):
        for support in itertools.combinations(range(values.size), size):
            support = list(support)
            outside = [index for index in range(values.size) if index not in support]
            tau = (values[support].sum() - 1.0) / size
            if np.all(values[support] - tau >= -tolerance) and np.all(values[outside] - tau <= tolerance):
                candidate = np.zeros_like(values)
                candidate[support] = np.maximum(values[support] - tau, 0.0)
                return candidate
    raise AssertionError(f"no support meets the KKT conditions for {values}")


@given(vectors)
def test_projection_lies_on_simplex(values):
    projected = project_to_simplex(values)

    assert np.all(projected >= 0)
    assert abs(projected.sum() - 1.0) < 1e-9


@given(vectors)
def test_projection_is_idempotent(values):
    once = project_to_simplex(values)
    twice = project_to_simplex(once)

    np.testing.assert_allclose(twice, once, atol=1e-12)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([9e15, 9e15], [0.5, 0.5]),
        ([1e16, 1e16], [0.5, 0.5]),
        ([1e18, 1e18, 1e18, 1e18], [0.25, 0.25, 0.25, 0.25]),
        ([1e18, 0.0], [1.0, 0.0]),
        ([-1e18, -1e18 + 2**10], [0.0, 1.0]),
    ],
)
def test_projection_of_huge_values(values, expected):
    projected = project_to_simplex(values)

    np.testing.assert_allclose(projected, expected, atol=1e-12)
    assert abs(projected.sum() - 1.0) < 1e-12


@settings(max_examples=200)
@given(small_vectors)
@example(np.array([0.0, -512.0, -0.99999]))
def test_projection_equals_brute_force(values):
    np.testing.assert_allclose(project_to_simplex(values), brute_force_projection(values), atol=1e-9)


def test_projection_of_simplex_point_is_itself():
    point = np.array([0.2, 0.3, 0.5])

    np.testing.assert_allclose(project_to_simplex(point), point, atol=1e-15)


def test_projection_rejects_nan():
    with pytest.raises(ValueError, match="finite"):
        project_to_simplex([0.5, np.nan])


@given(vectors, st.floats(min_value=0.0, max_value=0.5))
def test_capped_projection_respects_box_and_sum(values, epsilon):
    size = values.size
    lower, upper = max(0.0, 1.0 / size - epsilon), min(1.0, 1.0 / size + epsilon)

    projected = project_to_capped_simplex(values, lower, upper)

    assert abs(projected.sum() - 1.0) < 1e-9
    assert np.all(projected >= lower - 1e-12)
    assert np.all(projected <= upper + 1e-12)


@given(vectors)
def test_capped_projection_with_unit_box_is_simplex_projection(values):
    np.testing.assert_allclose(project_to_capped_simplex(values, 0.0, 1.0), project_to_simplex(values), atol=1e-9)


@settings(max_examples=100)
@given(small_vectors, st.floats(min_value=0.01, max_value=0.5))
def test_capped_projection_is_closest_feasible_point(values, epsilon):
    size = values.size
    lower, upper = max(0.0, 1.0 / size - epsilon), min(1.0, 1.0 / size + epsilon)
    projected = project_to_capped_simplex(values, lower, upper)
    distance = np.sum((projected - values) ** 2)

    # Every feasible point is at least as far; random feasible points near the projection test this.
    generator = np.random.default_rng(0)
    for _ in range(50):
        other = project_to_capped_simplex(projected + generator.normal(scale=0.3, size=size), lower, upper)
        assert np.sum((other - values) ** 2) >= distance - 1e-9


def test_capped_projection_rejects_box_without_simplex_point():
    with pytest.raises(ValueError, match="contains no point of the simplex"):
        project_to_capped_simplex([0.1, 0.2], 0.6, 0.9)


@given(
    st.integers(min_value=1, max_value=10).flatmap(
        lambda size: st.tuples(
            arrays(np.float64, size, elements=st.floats(min_value=0.01, max_value=1.0)),
            arrays(np.float64, size, elements=st.floats(min_value=-5.0, max_value=5.0)),
        )
    ),
    st.floats(min_value=0.0, max_value=3.0),
)
def test_entropic_step_equals_closed_form(weights_and_gradient, step_size):
    weights, gradient = weights_and_gradient
    weights = weights / weights.sum()
    closed_form = weights * np.exp(step_size * gradient) / np.sum(weights * np.exp(step_size * gradient))

    np.testing.assert_allclose(entropic_step(weights, gradient, step_size), closed_form, rtol=1e-10, atol=1e-15)


def test_entropic_step_survives_huge_exponents():
    stepped = entropic_step([0.5, 0.5], [1e6, 0.0], 1.0)

    np.testing.assert_array_equal(stepped, [1.0, 0.0])


def test_entropic_step_with_zero_step_keeps_weights():
    weights = np.array([0.1, 0.2, 0.7])

    np.testing.assert_allclose(entropic_step(weights, [3.0, -1.0, 2.0], 0.0), weights, rtol=1e-15)


def test_entropic_step_keeps_zero_weight_at_zero():
    stepped = entropic_step([0.0, 1.0], [10.0, 0.0], 1.0)

    np.testing.assert_array_equal(stepped, [0.0, 1.0])


def test_euclidean_step_projects_gradient_step():
    weights = np.array([0.5, 0.5])

    np.testing.assert_allclose(euclidean_step(weights, [1.0, 0.0], 0.2), [0.6, 0.4])
    np.testing.assert_allclose(euclidean_step(weights, [10.0, 0.0], 1.0), [1.0, 0.0])
