"""The transfer extension: a real run's summary, early stopping on the training loss, shape checks."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord

from client.models import build_model
from client.training import TrainSettings, client_generator, train_locally
from server.transfer import TransferEvaluation
from simulations.datasets import load_dataset
from simulations.experiments import resolve_run_config
from simulations.inprocess import run_inprocess

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TRANSFER_KEYS = {"target_accuracy", "source_accuracy", "random_features_accuracy", "target_only_accuracy"}

# digits and optdigits are both 1x8x8: the smallest real source -> target pair.
SMALL_TRANSFER = {
    "extensions": "transfer",
    "transfer-target": "optdigits",
    "transfer-train-examples": 400,
    "transfer-epochs": 3,
    "transfer-target-only-epochs": 1,
    "transfer-loss-examples": 300,
    "local-steps": 3,
}


def test_transfer_run_reports_every_accuracy(digits_config):
    summary = run_inprocess(digits_config(**SMALL_TRANSFER, **{"num-clients": 3, "num-server-rounds": 2, "fraction-evaluate": 0.0}))

    transfer = summary["transfer"]
    assert TRANSFER_KEYS <= set(transfer)
    for key in TRANSFER_KEYS:
        assert 0.0 <= transfer[key] <= 1.0, key
    assert transfer["best_round"] in (1, 2)
    assert transfer["probe"]["train_examples"] == 400
    assert all("global-train-loss" in entry["extensions"] for entry in summary["history"])


def test_transfer_run_of_every_new_strategy(digits_config):
    for strategy in ("fedgtst", "fedsr", "fediir"):
        overrides = {"strategy": strategy, "num-clients": 3, "num-server-rounds": 2, "fraction-evaluate": 0.0}
        summary = run_inprocess(digits_config(strategy, **SMALL_TRANSFER, **overrides))
        assert TRANSFER_KEYS <= set(summary["transfer"]), strategy


def trained_arrays(steps: int) -> ArrayRecord:
    dataset = load_dataset("digits")
    model = build_model("mlp", dataset.input_shape, dataset.num_classes, seed=0)
    if steps:
        inputs = torch.from_numpy(dataset.train_x.copy())
        labels = torch.from_numpy(dataset.train_y.copy())
        train_locally(model, inputs, labels, TrainSettings(lr=0.1, local_steps=steps, batch_size=32), client_generator(0, 0, 1))
    return ArrayRecord(model.state_dict())


def test_early_stopping_keeps_best_model(tmp_path):
    config = resolve_run_config("digits-fedavg", {**SMALL_TRANSFER, "transfer-patience": 2, "out-dir": str(tmp_path)})
    extension = TransferEvaluation(config, load_dataset("digits"))
    good, untrained, better = trained_arrays(20), trained_arrays(0), trained_arrays(200)

    extension.round_metrics(0, untrained, None)
    extension.round_metrics(1, good, None)
    extension.round_metrics(2, untrained, None)
    extension.round_metrics(3, untrained, None)
    extension.round_metrics(4, better, None)

    assert extension.global_train_loss(better) < extension.global_train_loss(good)
    assert extension.best_round == 1
    assert extension.stopped_round == 3
    assert all(torch.equal(extension.best_state[key], value) for key, value in good.to_torch_state_dict().items())


def test_without_patience_the_lowest_loss_wins(tmp_path):
    config = resolve_run_config("digits-fedavg", {**SMALL_TRANSFER, "out-dir": str(tmp_path)})
    extension = TransferEvaluation(config, load_dataset("digits"))

    for server_round, steps in enumerate((0, 20, 0, 0, 0, 200)):
        extension.round_metrics(server_round, trained_arrays(steps), None)

    assert extension.best_round == 5
    assert extension.stopped_round is None


def test_target_of_another_shape_is_rejected(tmp_path):
    config = resolve_run_config("digits-fedavg", {**SMALL_TRANSFER, "transfer-target": "optdigits-28", "out-dir": str(tmp_path)})
    with pytest.raises(ValueError, match="optdigits-28"):
        TransferEvaluation(config, load_dataset("digits"))


def test_transfer_without_target_is_rejected(tmp_path):
    config = resolve_run_config("digits-fedavg", {**SMALL_TRANSFER, "transfer-target": "", "out-dir": str(tmp_path)})
    with pytest.raises(ValueError, match="set transfer-target"):
        TransferEvaluation(config, load_dataset("digits"))


def test_transfer_experiments_resolve():
    mnistm = resolve_run_config("transfer-mnist-mnistm")
    optdigits = resolve_run_config("transfer-mnist-optdigits")

    assert (mnistm["dataset"], mnistm["transfer-target"]) == ("mnist-rgb", "mnistm-synthetic")
    assert (optdigits["dataset"], optdigits["transfer-target"]) == ("mnist", "optdigits-28")
    for config in (mnistm, optdigits):
        assert config["model"] == "lenet5"
        assert config["num-clients"] == 10
        assert (config["partition"], config["classes-per-client"]) == ("shards", 2)
        assert "transfer" in config["extensions"]
