"""FedSR and FedIIR: each penalty is zero in the cases its definition gives, and the runs complete."""

from __future__ import annotations

import pytest

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn
from torch.nn import functional as F

from client.fedsr import (
    REFERENCE_STATE_KEY,
    FedSRRegularizer,
    GaussianRepresentationModel,
    cmi_penalty,
    fedsr_regularizer,
    l2_representation_penalty,
)
from client.models import build_model, build_run_model
from client.regularizers import GradientMatchingPenalty, local_gradient, matched_parameters, regularizer_from_config
from client.training import MinibatchRegularizer, TrainSettings, client_generator, train_locally
from simulations.datasets import load_dataset
from simulations.inprocess import run_inprocess

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def digits_tensors(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = load_dataset("digits")
    return torch.from_numpy(dataset.train_x[:count].copy()), torch.from_numpy(dataset.train_y[:count].copy())


def test_l2_penalty_is_zero_for_zero_representation():
    assert float(l2_representation_penalty(torch.zeros(4, 7))) == 0.0
    assert float(l2_representation_penalty(torch.ones(2, 3))) == 3.0


def test_cmi_penalty_is_zero_when_distributions_match():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 2, 1, 2])
    reference_mean = torch.randn(3, 5, generator=generator)
    reference_raw_std = torch.randn(3, 5, generator=generator)
    scale = torch.tensor(1.7)
    mean = reference_mean[labels] / scale
    std = F.softplus(reference_raw_std)[labels] / scale

    value = cmi_penalty(mean, std, labels, reference_mean, reference_raw_std, scale)

    assert abs(float(value)) < 1e-6


def test_cmi_penalty_is_positive_when_distributions_differ():
    labels = torch.tensor([0, 1])
    value = cmi_penalty(torch.ones(2, 3), torch.ones(2, 3), labels, torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor(1.0))
    assert float(value) > 0.0


def test_fedsr_penalty_is_zero_with_zero_coefficients():
    inputs, labels = digits_tensors(16)
    model = build_run_model({"model": "mlp", "strategy": "fedsr"}, (1, 8, 8), 10, seed=0)
    regularizer = FedSRRegularizer(0.0, 0.0, 10, model.representation_dim, torch.Generator().manual_seed(0))

    _, penalty = regularizer.objective(model, inputs, labels)

    assert float(penalty) == 0.0


def test_fedsr_model_keeps_the_base_features_and_classifier():
    base = build_model("mlp", (1, 8, 8), 10, seed=3)
    wrapped = build_run_model({"model": "mlp", "strategy": "fedsr"}, (1, 8, 8), 10, seed=3)
    inputs, _ = digits_tensors(8)

    assert isinstance(wrapped, GaussianRepresentationModel)
    assert torch.equal(wrapped(inputs), base(inputs))
    assert set(wrapped.state_dict()) == set(base.state_dict()) | {"scale.weight", "scale.bias"}


def test_fedsr_reference_kept_between_rounds():
    inputs, labels = digits_tensors(64)
    model = build_run_model({"model": "mlp", "strategy": "fedsr"}, (1, 8, 8), 10, seed=0)
    state = RecordDict()
    config = ConfigRecord({"fedsr-l2-coeff": 0.01, "fedsr-cmi-coeff": 0.1})

    regularizer = fedsr_regularizer(config, model, 10, state, noise_seed=1)
    train_locally(model, inputs, labels, TrainSettings(lr=0.1, local_steps=3, batch_size=16), client_generator(0, 0, 1), regularizer)
    regularizer.save(state)
    restored = fedsr_regularizer(config, model, 10, state, noise_seed=2)

    stored = state.array_records[REFERENCE_STATE_KEY]["mean"].numpy()
    assert np.abs(stored).max() > 0.0
    assert torch.equal(restored.reference_mean.detach(), torch.from_numpy(stored))


def test_fediir_penalty_is_zero_when_gradient_equals_mean():
    inputs, labels = digits_tensors(32)
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    mean_gradient = local_gradient(model, inputs, labels, matched_parameters(model, head_only=True))
    penalty = GradientMatchingPenalty(0.5, mean_gradient, head_only=True)

    loss = F.cross_entropy(model(inputs), labels)
    value = penalty.penalty(model, inputs, labels, loss)

    assert abs(value.item()) < 1e-12


def test_fediir_first_round_has_no_penalty():
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    assert regularizer_from_config(ConfigRecord({"fediir-penalty": 0.001}), model) is None
    assert regularizer_from_config(ConfigRecord({"fediir-penalty": 0.0, "fediir-mean-gradient": [0.0] * 2010}), model) is None


class ZeroPenalty(MinibatchRegularizer):
    def penalty(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        return loss * 0.0


def test_zero_penalty_hook_keeps_plain_training():
    inputs, labels = digits_tensors(64)
    settings = TrainSettings(lr=0.1, local_steps=4, batch_size=16)
    plain = build_model("mlp", (1, 8, 8), 10, seed=0)
    hooked = build_model("mlp", (1, 8, 8), 10, seed=0)

    plain_result = train_locally(plain, inputs, labels, settings, client_generator(0, 0, 1))
    hooked_result = train_locally(hooked, inputs, labels, settings, client_generator(0, 0, 1), ZeroPenalty())

    assert hooked_result.penalties == [0.0] * 4
    assert plain_result.penalties == []
    for expected, got in zip(plain.parameters(), hooked.parameters()):
        assert torch.equal(expected, got)


def test_fedsr_and_fediir_runs_complete(digits_config):
    for strategy in ("fedsr", "fediir"):
        overrides = {"num-clients": 3, "num-server-rounds": 2, "local-steps": 3, "fraction-evaluate": 0.0}
        summary = run_inprocess(digits_config(strategy, strategy=strategy, **overrides))
        assert summary["status"] == "completed"
        assert summary["history"][-1]["accepted"] == 3
        assert np.isfinite(summary["final"]["loss"])
