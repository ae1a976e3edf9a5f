"""FedGTST: reduction to FedAvg, the double-backprop penalty, the server target and its inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from torch import nn
from torch.nn import functional as F

from client import app as corolla_client
from client.regularizers import GRAD_NORM, GradientMatchingPenalty, GradientNormPenalty, mean_minibatch_gradient_norm
from server.results import read_events
from simulations.inprocess import run_inprocess
from strategies.fedgtst import build_target_gradient, build_target_norm

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def final_weights(config: dict) -> dict[str, torch.Tensor]:
    run_inprocess(config)
    return torch.load(Path(config["out-dir"]) / "final_model.pt")


def test_zero_xi_gives_fedavg_weights_exactly(digits_config):
    common = {"num-clients": 4, "num-server-rounds": 3, "fraction-evaluate": 0.0, "local-steps": 3}
    fedavg = final_weights(digits_config("fedavg", strategy="fedavg", **common))
    fedgtst = final_weights(digits_config("fedgtst", strategy="fedgtst", **{"fedgtst-xi": 0.0}, **common))

    assert fedavg.keys() == fedgtst.keys()
    for key in fedavg:
        assert torch.equal(fedavg[key], fedgtst[key]), key


def test_positive_xi_changes_the_weights(digits_config):
    common = {"num-clients": 4, "num-server-rounds": 3, "fraction-evaluate": 0.0, "local-steps": 3, "lr": 0.5}
    fedavg = final_weights(digits_config("fedavg", strategy="fedavg", **common))
    fedgtst = final_weights(digits_config("fedgtst", strategy="fedgtst", **{"fedgtst-xi": 1.0}, **common))

    assert any(not torch.equal(fedavg[key], fedgtst[key]) for key in fedavg)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    return model


def finite_difference_gradient(function, parameters: list[torch.Tensor], step: float = 1e-6) -> list[torch.Tensor]:
    gradients = []
    for parameter in parameters:
        gradient = torch.zeros_like(parameter)
        flat = parameter.data.view(-1)
        for index in range(flat.numel()):
            original = flat[index].item()
            flat[index] = original + step
            upper = function()
            flat[index] = original - step
            lower = function()
            flat[index] = original
            gradient.view(-1)[index] = (upper - lower) / (2 * step)
        gradients.append(gradient)
    return gradients


@pytest.mark.parametrize(
    "make_penalty",
    [
        lambda: GradientNormPenalty(xi=0.7, target_norm=2.5),
        lambda: GradientMatchingPenalty(0.7, torch.linspace(-1.0, 1.0, 15 + 12, dtype=torch.float64), head_only=False),
    ],
    ids=["scalar", "vector"],
)
def test_penalty_gradient_matches_finite_differences(make_penalty):
    model = tiny_model()
    penalty = make_penalty()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    parameters = list(model.parameters())

    def value() -> float:
        loss = F.cross_entropy(model(inputs), labels)
        return penalty.penalty(model, inputs, labels, loss).item()

    loss = F.cross_entropy(model(inputs), labels)
    analytic = torch.autograd.grad(penalty.penalty(model, inputs, labels, loss), parameters)
    numeric = finite_difference_gradient(value, parameters)

    for got, expected in zip(analytic, numeric):
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-8)


def test_scalar_penalty_is_zero_at_the_target_norm():
    model = tiny_model()
    inputs = torch.randn(5, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1, 0])
    loss = F.cross_entropy(model(inputs), labels)
    norm = mean_minibatch_gradient_norm(model, inputs, labels, list(model.parameters()), batch_size=5)

    value = GradientNormPenalty(xi=3.0, target_norm=norm).penalty(model, inputs, labels, loss)

    assert abs(value.item()) < 1e-20


def test_max_target_is_largest_norm():
    assert build_target_norm(np.array([1.0, 4.0, 2.0]), np.array([10, 1, 10])) == 4.0


def test_scaled_mean_target_weights_by_examples():
    target = build_target_norm(np.array([1.0, 4.0]), np.array([3, 1]), rule="scaled-mean", scale=2.0)
    assert target == pytest.approx(2.0 * (3 * 1.0 + 1 * 4.0) / 4)


def test_unknown_target_rule_is_rejected():
    with pytest.raises(ValueError, match="scaled-mean"):
        build_target_norm(np.array([1.0]), np.array([1]), rule="median")


def test_target_gradient_has_mean_direction_and_largest_norm():
    gradients = np.array([[3.0, 0.0], [0.0, 1.0]])
    target = build_target_gradient(gradients, np.array([1, 1]))

    mean = gradients.mean(axis=0)
    assert np.linalg.norm(target) == pytest.approx(3.0)
    assert np.allclose(target / np.linalg.norm(target), mean / np.linalg.norm(mean))


def client_app_with_norm(bad_partition: int, bad_value: float) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        reply = corolla_client.train(message, context)
        if int(context.node_config["partition-id"]) == bad_partition:
            metrics = dict(reply.content["metrics"])
            metrics[GRAD_NORM] = bad_value
            reply.content["metrics"] = MetricRecord(metrics)
        return reply

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return corolla_client.evaluate(message, context)

    return app


@pytest.mark.parametrize("bad_value, reason", [(float("nan"), "is not finite"), (-1.0, "non-negative")])
def test_target_uses_only_accepted_norms(digits_config, bad_value, reason):
    config = digits_config(strategy="fedgtst", **{"num-clients": 4, "num-server-rounds": 2, "fraction-evaluate": 0.0, "local-steps": 3})
    summary = run_inprocess(config, client_app=client_app_with_norm(bad_partition=2, bad_value=bad_value))
    events = read_events(Path(config["out-dir"]) / "events.jsonl")

    rejected = [event.rejected_reply for event in events if event.WhichOneof("event") == "rejected_reply"]
    assert [rejection.partition_id for rejection in rejected] == [2, 2]
    assert reason in rejected[0].reason
    for server_round in (1, 2):
        accepted_norms = [
            event.client_result.metrics[GRAD_NORM]
            for event in events
            if event.WhichOneof("event") == "client_result" and event.round == server_round
        ]
        assert len(accepted_norms) == 3
        values = summary["history"][server_round]["strategy"]
        assert values["next-target-norm"] == max(accepted_norms)
        assert values["mean-grad-norm"] <= max(accepted_norms)
    assert summary["history"][2]["strategy"]["target-norm"] == summary["history"][1]["strategy"]["next-target-norm"]


def test_warmup_rounds_send_no_target(digits_config):
    overrides = {"num-clients": 3, "num-server-rounds": 3, "fraction-evaluate": 0.0, "local-steps": 2, "fedgtst-warmup-rounds": 2}
    summary = run_inprocess(digits_config(strategy="fedgtst", **overrides))

    assert "target-norm" not in summary["history"][1]["strategy"]
    assert "target-norm" not in summary["history"][2]["strategy"]
    assert summary["history"][3]["strategy"]["target-norm"] == summary["history"][2]["strategy"]["next-target-norm"]
