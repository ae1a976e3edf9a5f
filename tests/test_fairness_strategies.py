"""Tchebycheff-family strategies and FedMGDA+, one round at a time with replies built in the test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from strategies import STRATEGIES, StrategyError, build_strategy
from strategies.fedmgda import FedMGDAPlus, min_norm_weights
from strategies.simplex import project_to_simplex
from strategies.tchebycheff import AFL, OMDTCH, STCH, TCH, AdaOMDTCH, parse_preference_weights
from simulations.experiments import resolve_run_config
from fairness_rounds import run_round

SAMPLING = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 1, "min_evaluate_nodes": 0}


def sampling(num_clients: int) -> dict:
    return {**SAMPLING, "min_available_nodes": num_clients}


def global_model() -> dict[str, np.ndarray]:
    return {"weight": np.zeros((3, 2), dtype=np.float32), "count": np.array([4], dtype=np.int64)}


def client_models(num_clients: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    generator = np.random.default_rng(seed)
    return [
        {"weight": generator.normal(size=(3, 2)).astype(np.float32), "count": np.array([4 + client], dtype=np.int64)}
        for client in range(num_clients)
    ]


def initial_losses(values) -> list[dict[str, float]]:
    return [{"initial-loss": float(value)} for value in values]


def test_omd_entropic_step_uses_losses_at_global_model():
    strategy = OMDTCH(eta_lambda=0.5, step="entropic", num_clients=3, **sampling(3))
    losses = np.array([0.5, 1.0, 2.0])

    run_round(strategy, 1, global_model(), client_models(3), initial_losses(losses))

    expected = np.exp(0.5 * losses) / np.exp(0.5 * losses).sum()
    np.testing.assert_allclose(strategy.state.lambda_, expected, rtol=1e-12)


def test_omd_euclidean_step_projects_onto_simplex():
    strategy = OMDTCH(eta_lambda=0.3, step="euclidean", num_clients=3, **sampling(3))
    losses = np.array([0.5, 1.0, 2.0])

    run_round(strategy, 1, global_model(), client_models(3), initial_losses(losses))

    np.testing.assert_allclose(strategy.state.lambda_, project_to_simplex(np.full(3, 1 / 3) + 0.3 * losses))


def test_omd_aggregates_with_previous_lambda():
    strategy = OMDTCH(eta_lambda=1.0, num_clients=2, **sampling(2))
    models = client_models(2)
    run_round(strategy, 1, global_model(), models, initial_losses([1.0, 2.0]))
    lambda_ = np.array(strategy.state.lambda_)

    result = run_round(strategy, 2, global_model(), models, initial_losses([1.0, 1.0]))

    expected = lambda_[0] * models[0]["weight"].astype(np.float64) + lambda_[1] * models[1]["weight"]
    np.testing.assert_allclose(result["weight"], expected, rtol=1e-6)
    assert result["weight"].dtype == np.float32
    assert result["count"].dtype == np.int64


def test_omd_with_zero_step_is_uniform_average():
    strategy = OMDTCH(eta_lambda=0.0, num_clients=4, **sampling(4))
    models = client_models(4)
    for server_round in (1, 2, 3):
        result = run_round(strategy, server_round, global_model(), models, initial_losses([0.1, 5.0, 1.0, 2.0]))

    expected = np.mean([model["weight"].astype(np.float64) for model in models], axis=0).astype(np.float32)
    np.testing.assert_array_equal(result["weight"], expected)
    assert len(set(strategy.state.lambda_)) == 1


def test_preference_weights_scale_objective_and_aggregation():
    weights = np.array([1.0, 3.0])
    strategy = OMDTCH(eta_lambda=0.2, num_clients=2, preference_weights=weights, **sampling(2))
    models = client_models(2)

    result = run_round(strategy, 1, global_model(), models, initial_losses([1.0, 1.0]))

    expected = (1.0 * models[0]["weight"].astype(np.float64) + 3.0 * models[1]["weight"]) / 4.0
    np.testing.assert_allclose(result["weight"], expected, rtol=1e-6)
    scaled = np.exp(0.2 * weights)
    np.testing.assert_allclose(strategy.state.lambda_, scaled / scaled.sum())


def test_normalized_losses_divide_by_first_round():
    strategy = OMDTCH(eta_lambda=1.0, num_clients=2, normalize_losses=True, **sampling(2))
    run_round(strategy, 1, global_model(), client_models(2), initial_losses([2.0, 4.0]))
    np.testing.assert_allclose(strategy.state.lambda_, [0.5, 0.5])

    run_round(strategy, 2, global_model(), client_models(2), initial_losses([1.0, 4.0]))

    expected = np.exp([0.5, 1.0]) / np.exp([0.5, 1.0]).sum()
    np.testing.assert_allclose(strategy.state.lambda_, expected)


def test_local_mean_loss_source_reads_train_loss():
    strategy = OMDTCH(eta_lambda=1.0, num_clients=2, loss_key="train-loss", **sampling(2))
    metrics = [{"initial-loss": 1.0, "train-loss": 0.0}, {"initial-loss": 1.0, "train-loss": 1.0}]

    run_round(strategy, 1, global_model(), client_models(2), metrics)

    np.testing.assert_allclose(strategy.state.lambda_, np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum())


def test_tch_returns_model_of_worst_weighted_client():
    strategy = TCH(num_clients=3, preference_weights=np.array([1.0, 1.0, 5.0]), **sampling(3))
    models = client_models(3)

    result = run_round(strategy, 1, global_model(), models, initial_losses([3.0, 2.0, 1.0]))

    np.testing.assert_array_equal(result["weight"], models[2]["weight"])
    assert strategy.state.lambda_ == [0.0, 0.0, 1.0]


def test_stch_weights_are_softmax_of_weighted_losses():
    strategy = STCH(mu=0.5, num_clients=3, **sampling(3))
    losses = np.array([0.2, 0.4, 1.0])
    models = client_models(3)

    result = run_round(strategy, 1, global_model(), models, initial_losses(losses))

    softmax = np.exp(losses / 0.5) / np.exp(losses / 0.5).sum()
    np.testing.assert_allclose(strategy.state.lambda_, softmax)
    expected = sum(weight * model["weight"].astype(np.float64) for weight, model in zip(softmax, models))
    np.testing.assert_allclose(result["weight"], expected, rtol=1e-6)


def test_afl_last_iterate_equals_omd_euclidean_iterate():
    afl = AFL(eta_lambda=0.1, num_clients=3, **sampling(3))
    omd = OMDTCH(eta_lambda=0.1, step="euclidean", num_clients=3, **sampling(3))
    model = global_model()
    for server_round in (1, 2, 3):
        losses = initial_losses(np.random.default_rng(server_round).random(3) * 3)
        afl_model = run_round(afl, server_round, model, client_models(3, server_round), losses)
        omd_model = run_round(omd, server_round, model, client_models(3, server_round), losses)
        np.testing.assert_array_equal(afl_model["weight"], omd_model["weight"])
        model = afl_model

    assert afl.state.lambda_ == omd.state.lambda_
    assert afl.state.uniform is None
    assert omd.state.uniform.count == 3


def test_adaptive_conversion_records_the_model_clients_started_from():
    strategy = AdaOMDTCH(eta_lambda=0.1, num_clients=2, **sampling(2))
    start = global_model()
    start["weight"][:] = 7.0

    run_round(strategy, 1, start, client_models(2), initial_losses([1.0, 2.0]))

    np.testing.assert_array_equal(strategy.state.adaptive.iterates[0]["weight"], start["weight"])
    assert strategy.state.adaptive.losses == [[1.0, 2.0]]


def test_adaptive_conversion_pairs_iterate_with_initial_losses():
    strategy = AdaOMDTCH(eta_lambda=0.1, num_clients=2, loss_key="train-loss", **sampling(2))
    metrics = [{"initial-loss": 1.0, "train-loss": 0.25}, {"initial-loss": 2.0, "train-loss": 0.5}]

    run_round(strategy, 1, global_model(), client_models(2), metrics)

    assert strategy.state.adaptive.losses == [[1.0, 2.0]]
    assert strategy.state.last_losses == [0.25, 0.5]


def test_reply_with_unknown_partition_is_rejected():
    strategy = OMDTCH(eta_lambda=0.1, num_clients=2, **sampling(2))
    models = client_models(3)

    result = run_round(strategy, 1, global_model(), models, initial_losses([1.0, 1.0, 1.0]), partition_ids=[0, 1, 7])

    reasons = [rejection.reason for rejection in strategy.report(1).rejections]
    assert len(reasons) == 1
    assert "outside 0..1" in reasons[0]
    expected = (models[0]["weight"].astype(np.float64) + models[1]["weight"]) / 2
    np.testing.assert_allclose(result["weight"], expected, rtol=1e-6)


def test_second_reply_for_a_partition_is_rejected():
    strategy = TCH(num_clients=2, **sampling(2))

    run_round(strategy, 1, global_model(), client_models(3), initial_losses([1.0, 2.0, 3.0]), partition_ids=[0, 1, 1])

    assert ["second reply" in rejection.reason for rejection in strategy.report(1).rejections] == [True]
    assert strategy.report(1).accepted_train_replies == 2


def test_missing_client_keeps_its_last_loss():
    strategy = OMDTCH(eta_lambda=1.0, num_clients=2, **sampling(1))
    run_round(strategy, 1, global_model(), client_models(2), initial_losses([1.0, 3.0]))
    lambda_after_first = np.array(strategy.state.lambda_)

    run_round(strategy, 2, global_model(), client_models(1), initial_losses([1.0]), partition_ids=[0])

    expected = lambda_after_first * np.exp([1.0, 3.0])
    np.testing.assert_allclose(strategy.state.lambda_, expected / expected.sum())


def test_state_round_trip_continues_identically():
    first = AdaOMDTCH(eta_lambda=0.5, num_clients=3, **sampling(3))
    for server_round in (1, 2):
        run_round(first, server_round, global_model(), client_models(3, server_round), initial_losses([1.0, 2.0, 0.5 * server_round]))
    second = AdaOMDTCH(eta_lambda=0.5, num_clients=3, **sampling(3))
    second.load_state_dict(first.state_dict())

    losses = initial_losses([0.1, 0.2, 0.3])
    result_first = run_round(first, 3, global_model(), client_models(3, 3), losses)
    result_second = run_round(second, 3, global_model(), client_models(3, 3), losses)

    np.testing.assert_array_equal(result_first["weight"], result_second["weight"])
    assert first.state.adaptive.weights == second.state.adaptive.weights
    assert first.state.lambda_ == second.state.lambda_


def test_parse_preference_weights():
    np.testing.assert_array_equal(parse_preference_weights("", 3), [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(parse_preference_weights("1, 2,0.5", 3), [1.0, 2.0, 0.5])
    with pytest.raises(ValueError, match="one weight per client"):
        parse_preference_weights("1,2", 3)
    with pytest.raises(ValueError, match="> 0"):
        parse_preference_weights("1,0,1", 3)
    with pytest.raises(ValueError, match="comma-separated numbers"):
        parse_preference_weights("1;2;3", 3)


def test_builder_reports_bad_preference_weights():
    config = resolve_run_config("fair-rotated-mnist-small", {"strategy": "omd-tch", "preference-weights": "1,2"})

    with pytest.raises(StrategyError, match="num-clients = 10"):
        build_strategy(config)


@pytest.mark.parametrize("name", ["omd-tch", "adaomd-tch", "afl", "tch", "stch", "qffl", "fedmgda"])
def test_every_fairness_strategy_is_registered(name):
    config = resolve_run_config("fair-rotated-mnist-small", {"strategy": name})

    assert name in STRATEGIES
    assert build_strategy(config) is not None


# --- FedMGDA+ ---------------------------------------------------------------


def brute_force_min_norm(gram: np.ndarray, epsilon: float) -> np.ndarray:
    size = gram.shape[0]
    lower, upper = max(0.0, 1 / size - epsilon), min(1.0, 1 / size + epsilon)
    result = minimize(
        lambda weights: weights @ gram @ weights,
        np.full(size, 1 / size),
        jac=lambda weights: 2 * gram @ weights,
        bounds=[(lower, upper)] * size,
        constraints=[{"type": "eq", "fun": lambda weights: weights.sum() - 1.0}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return result.x


@pytest.mark.parametrize("epsilon", [0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_norm_weights_match_quadratic_program(epsilon, seed):
    generator = np.random.default_rng(seed)
    vectors = generator.normal(size=(6, 20)) + generator.normal(size=20)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    gram = vectors @ vectors.T

    weights = min_norm_weights(gram, epsilon)
    reference = brute_force_min_norm(gram, epsilon)

    assert weights @ gram @ weights <= reference @ gram @ reference + 1e-9
    assert abs(weights.sum() - 1) < 1e-9
    assert np.all(np.abs(weights - 1 / 6) <= epsilon + 1e-9)


def test_min_norm_weights_with_zero_epsilon_are_uniform():
    np.testing.assert_array_equal(min_norm_weights(np.eye(4), 0.0), np.full(4, 0.25))


def test_fedmgda_steps_along_normalized_updates():
    strategy = FedMGDAPlus(epsilon=0.0, server_learning_rate=0.5, **sampling(2))
    start = global_model()
    models = [
        {"weight": np.full((3, 2), -2.0, dtype=np.float32), "count": np.array([6], dtype=np.int64)},
        {"weight": np.full((3, 2), 4.0, dtype=np.float32), "count": np.array([8], dtype=np.int64)},
    ]

    result = run_round(strategy, 1, start, models, [{}, {}])

    # The unit update directions are -u and +u with u = ones/sqrt(6); uniform weights cancel them.
    np.testing.assert_allclose(result["weight"], np.zeros((3, 2)), atol=1e-7)
    np.testing.assert_array_equal(result["count"], [7])


def test_fedmgda_moves_at_most_server_learning_rate():
    strategy = FedMGDAPlus(epsilon=1.0, server_learning_rate=0.3, **sampling(3))

    result = run_round(strategy, 1, global_model(), client_models(3), [{}, {}, {}])

    assert np.linalg.norm(result["weight"].astype(np.float64)) <= 0.3 + 1e-6
