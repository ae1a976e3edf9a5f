"""Local training: FedProx's proximal term, and one-client FedAvg equals centralized training."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn import functional as F

from client.models import build_model
from client.training import TrainSettings, client_generator, train_locally
from simulations.datasets import load_dataset
from simulations.inprocess import run_inprocess


def test_proximal_term_is_nonzero_after_first_step():
    dataset = load_dataset("digits")
    model = build_model("mlp", dataset.input_shape, dataset.num_classes, seed=0)
    inputs = torch.from_numpy(dataset.train_x[:64].copy())
    labels = torch.from_numpy(dataset.train_y[:64].copy())
    settings = TrainSettings(lr=0.1, local_steps=3, batch_size=16, proximal_mu=0.5)

    result = train_locally(model, inputs, labels, settings, client_generator(0, 0, 1))

    assert result.proximal_terms[0] == 0.0
    assert result.proximal_terms[1] > 0.0
    assert result.proximal_terms[2] > 0.0


def test_proximal_term_is_absent_when_mu_is_zero():
    dataset = load_dataset("digits")
    model = build_model("mlp", dataset.input_shape, dataset.num_classes, seed=0)
    inputs = torch.from_numpy(dataset.train_x[:64].copy())
    labels = torch.from_numpy(dataset.train_y[:64].copy())

    result = train_locally(model, inputs, labels, TrainSettings(local_steps=2), client_generator(0, 0, 1))

    assert result.proximal_terms == []


def test_proximal_term_pulls_towards_global_model():
    dataset = load_dataset("digits")
    inputs = torch.from_numpy(dataset.train_x[:256].copy())
    labels = torch.from_numpy(dataset.train_y[:256].copy())
    distances = []
    for mu in (0.0, 10.0):
        model = build_model("mlp", dataset.input_shape, dataset.num_classes, seed=0)
        start = [p.detach().clone() for p in model.parameters()]
        train_locally(model, inputs, labels, TrainSettings(lr=0.1, local_steps=20, batch_size=16, proximal_mu=mu), client_generator(0, 0, 1))
        distances.append(sum(float(torch.sum((p.detach() - s) ** 2)) for p, s in zip(model.parameters(), start)))
    assert distances[1] < distances[0]


def test_full_batch_takes_one_step_per_epoch():
    dataset = load_dataset("digits")
    model = build_model("mlp", dataset.input_shape, dataset.num_classes, seed=0)
    inputs = torch.from_numpy(dataset.train_x[:100].copy())
    labels = torch.from_numpy(dataset.train_y[:100].copy())

    result = train_locally(model, inputs, labels, TrainSettings(batch_size=0, local_epochs=3), client_generator(0, 0, 1))

    assert result.steps == 3
    assert result.examples_seen == 300


def test_one_client_fedavg_equals_plain_pytorch_loop(digits_config):
    rounds, epochs, batch_size, lr, seed = 3, 2, 32, 0.05, 7
    config = digits_config(
        **{"num-clients": 1, "num-server-rounds": rounds, "local-epochs": epochs, "batch-size": batch_size, "lr": lr, "seed": seed, "partition": "iid", "fraction-evaluate": 0.0}
    )
    run_inprocess(config)
    federated = torch.load(Path(config["out-dir"]) / "final_model.pt")

    # The same training written as a plain loop: one SGD optimizer, the
    # client's data order for each round, no Flower involved.
    dataset = load_dataset("digits")
    inputs = torch.from_numpy(dataset.train_x.copy())
    labels = torch.from_numpy(dataset.train_y.copy())
    model = build_model("mlp", dataset.input_shape, dataset.num_classes, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for server_round in range(1, rounds + 1):
        generator = client_generator(seed, 0, server_round)
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=generator)
            for start in range(0, len(labels), batch_size):
                batch = order[start : start + batch_size]
                optimizer.zero_grad()
                F.cross_entropy(model(inputs[batch]), labels[batch]).backward()
                optimizer.step()

    centralized = model.state_dict()
    assert federated.keys() == centralized.keys()
    for key in centralized:
        assert torch.equal(federated[key], centralized[key]), key
