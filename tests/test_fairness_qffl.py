"""q-FFL (strategy qffl) on the inputs Flower 1.42's QFedAvg mishandles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fairness_rounds import run_round

from strategies.qffl import QFFL, qffl_step

SAMPLING = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 1, "min_evaluate_nodes": 0, "min_available_nodes": 3}


def batchnorm_model(seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    network = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    network.train()
    for _ in range(seed + 1):
        network(torch.randn(8, 4))
    return {key: value.detach().numpy().copy() for key, value in network.state_dict().items()}


def losses(values) -> list[dict[str, float]]:
    return [{"initial-loss": float(value)} for value in values]


def reference_step(global_vector, client_vectors, client_losses, q, lr):
    """q-FedAvg as written in Li et al. (2020), for inputs where powers do not overflow."""
    lipschitz = 1 / lr
    deltas, hs = [], []
    for vector, loss in zip(client_vectors, client_losses):
        step = lipschitz * (global_vector - vector)
        deltas.append(loss**q * step)
        hs.append(q * loss ** (q - 1) * step @ step + lipschitz * loss**q)
    return global_vector - np.sum(deltas, axis=0) / np.sum(hs)


def test_qffl_step_matches_formula():
    generator = np.random.default_rng(0)
    start = generator.normal(size=5)
    clients = [start + 0.1 * generator.normal(size=5) for _ in range(3)]

    updated, _ = qffl_step(start, clients, np.array([0.5, 1.0, 2.0]), q=1.5, learning_rate=0.1)

    np.testing.assert_allclose(updated, reference_step(start, clients, [0.5, 1.0, 2.0], 1.5, 0.1), rtol=1e-12)


def test_qffl_with_q_zero_is_uniform_average():
    generator = np.random.default_rng(1)
    start = generator.normal(size=4)
    clients = [generator.normal(size=4) for _ in range(3)]

    updated, weights = qffl_step(start, clients, np.array([0.1, 1.0, 10.0]), q=0.0, learning_rate=0.05)

    np.testing.assert_allclose(updated, np.mean(clients, axis=0), rtol=1e-12)
    np.testing.assert_allclose(weights, [1 / 3] * 3)


def test_qffl_large_q_and_loss_stay_finite():
    generator = np.random.default_rng(2)
    start = generator.normal(size=6)
    clients = [start + generator.normal(size=6) for _ in range(3)]

    updated, weights = qffl_step(start, clients, np.array([1e6, 1e5, 1.0]), q=200.0, learning_rate=0.1)

    assert np.all(np.isfinite(updated))
    assert np.all(np.isfinite(weights))
    # (1e5 / 1e6)^200 = 1e-200: the client with loss 1e6 takes almost all the weight.
    assert weights[0] > 0
    assert weights[1] < 1e-150


def test_qffl_zero_loss_with_small_q_stays_finite():
    start = np.zeros(3)
    clients = [np.ones(3), -np.ones(3)]

    updated, _ = qffl_step(start, clients, np.array([0.0, 1.0]), q=0.5, learning_rate=0.1)

    assert np.all(np.isfinite(updated))


def test_qffl_step_rejects_negative_loss():
    with pytest.raises(ValueError, match="non-negative"):
        qffl_step(np.zeros(2), [np.ones(2)], np.array([-0.5]), q=1.0, learning_rate=0.1)


def test_qffl_keeps_integer_buffer_dtype():
    strategy = QFFL(q=1.0, client_learning_rate=0.1, **SAMPLING)
    start = batchnorm_model(0)
    clients = [batchnorm_model(seed) for seed in (1, 2, 3)]

    result = run_round(strategy, 1, start, clients, losses([0.5, 1.0, 2.0]))

    assert result["1.num_batches_tracked"].dtype == np.int64
    assert result["1.num_batches_tracked"].shape == start["1.num_batches_tracked"].shape
    assert int(result["1.num_batches_tracked"]) == 3  # clients ran 2, 3 and 4 batches
    for key, value in result.items():
        assert value.dtype == start[key].dtype, key
        assert np.all(np.isfinite(value)), key


def test_qffl_rejects_negative_loss_reply():
    strategy = QFFL(q=1.0, client_learning_rate=0.1, **SAMPLING)
    start = batchnorm_model(0)
    clients = [batchnorm_model(seed) for seed in (1, 2, 3)]

    result = run_round(strategy, 1, start, clients, losses([0.5, -1.0, 2.0]))

    reasons = [rejection.reason for rejection in strategy.report(1).rejections]
    assert len(reasons) == 1
    assert "negative" in reasons[0]
    assert strategy.report(1).accepted_train_replies == 2
    assert all(np.all(np.isfinite(value)) for value in result.values())


def test_qffl_with_every_loss_negative_keeps_previous_model():
    strategy = QFFL(q=1.0, client_learning_rate=0.1, **SAMPLING)
    start = batchnorm_model(0)

    result = run_round(strategy, 1, start, [batchnorm_model(1)], losses([-0.1]))

    assert result is None
    assert strategy.report(1).kept_previous_model


def test_qffl_q_200_with_huge_loss_through_strategy():
    strategy = QFFL(q=200.0, client_learning_rate=0.1, **SAMPLING)
    start = batchnorm_model(0)
    clients = [batchnorm_model(seed) for seed in (1, 2, 3)]

    result = run_round(strategy, 1, start, clients, losses([1e6, 3.0, 0.2]))

    assert all(np.all(np.isfinite(value)) for value in result.values())


def test_qffl_rejects_negative_q():
    with pytest.raises(ValueError, match="q >= 0"):
        QFFL(q=-1.0, client_learning_rate=0.1, **SAMPLING)
