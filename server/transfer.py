"""The ``transfer`` run extension: pretrain federatedly on a source, then probe a target domain.

The protocol is FedGTST's (Ma et al., NeurIPS 2024). Federated pretraining on the source domain
stops early on the global training loss and keeps the best model. Then the feature extractor is
frozen, only the last linear layer is fitted on the target's training split with Adam, and the
target test accuracy is the result. The same run reports the source test accuracy of the kept
model and two references that do not depend on the pretraining. One is a linear probe on the
features of the randomly initialized model the run started from, the other the same network
trained from scratch on the target alone.

Run-config keys: ``transfer-target`` (a dataset name), ``transfer-data-dir``,
``transfer-train-examples``, ``transfer-epochs``, ``transfer-lr``, ``transfer-target-only-epochs``,
``transfer-patience`` and ``transfer-loss-examples``.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.nn import functional as F

from client.models import build_model, build_run_model
from client.training import evaluate_model
from server.extensions import RunExtension
from simulations.datasets import Dataset, load_dataset

logger = logging.getLogger(__name__)

PROBE_BATCH_SIZE = 128
# The target-only reference trains the whole network with Adam at PyTorch's default rate.
TARGET_ONLY_LR = 1e-3
TARGET_ONLY_BATCH_SIZE = 64
FEATURE_BATCH_SIZE = 1000


@dataclass(frozen=True)
class ProbeSettings:
    """Settings of the linear probe: Adam for ``epochs`` epochs over ``train_examples`` target examples."""

    epochs: int
    lr: float
    batch_size: int
    train_examples: int
    seed: int


@torch.no_grad()
def extract_features(model: nn.Module, inputs: torch.Tensor, batch_size: int = FEATURE_BATCH_SIZE) -> torch.Tensor:
    """Return ``model.features`` of every input, computed in evaluation mode."""
    model.eval()
    return torch.cat([model.features(inputs[start : start + batch_size]) for start in range(0, len(inputs), batch_size)])


def fit_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    settings: ProbeSettings,
    initial_head: nn.Linear | None = None,
) -> float:
    """Fit a linear layer on fixed features with Adam and return its test accuracy.

    The layer starts from a copy of ``initial_head`` when given (the pretrained classifier,
    when source and target share their classes), otherwise from PyTorch's default
    initialization under ``settings.seed``. Cross-entropy on frozen features is convex in the
    layer, so with enough epochs the result hardly depends on the start.
    """
    generator = torch.Generator()
    generator.manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        head = nn.Linear(train_features.shape[1], num_classes)
    if initial_head is not None:
        head.load_state_dict(initial_head.state_dict())
    optimizer = torch.optim.Adam(head.parameters(), lr=settings.lr)

    for _ in range(settings.epochs):
        order = torch.randperm(len(train_labels), generator=generator)
        for start in range(0, len(order), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(head(train_features[batch]), train_labels[batch]).backward()
            optimizer.step()

    with torch.no_grad():
        return float((head(test_features).argmax(dim=1) == test_labels).double().mean())


def _target_split(target: Dataset, train_examples: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Return the target's training subset (all when ``train_examples`` is 0) and test split as tensors."""
    indices = np.arange(len(target.train_y))
    if 0 < train_examples < len(indices):
        indices = np.sort(np.random.default_rng(seed).permutation(len(indices))[:train_examples])
    return (
        torch.from_numpy(np.array(target.train_x[indices])),
        torch.from_numpy(np.array(target.train_y[indices])),
        torch.from_numpy(np.array(target.test_x)),
        torch.from_numpy(np.array(target.test_y)),
    )


@functools.lru_cache(maxsize=16)
def random_features_accuracy(
    model_name: str, target_name: str, target_data_dir: str, settings: ProbeSettings, model_seed: int
) -> float:
    """Return the probe accuracy on the features of the model initialized with ``model_seed``.

    That is the model every run with this seed starts from, so the result is cached per process.
    """
    target = load_dataset(target_name, target_data_dir or None)
    train_x, train_y, test_x, test_y = _target_split(target, settings.train_examples, settings.seed)
    model = build_model(model_name, target.input_shape, target.num_classes, seed=model_seed)
    return fit_linear_probe(
        extract_features(model, train_x), train_y, extract_features(model, test_x), test_y, target.num_classes, settings, model.classifier
    )


@functools.lru_cache(maxsize=16)
def target_only_accuracy(
    model_name: str, target_name: str, target_data_dir: str, settings: ProbeSettings, model_seed: int, epochs: int
) -> float:
    """Return the test accuracy of the network trained from scratch on the target's training subset.

    Adam (lr ``TARGET_ONLY_LR``, batch ``TARGET_ONLY_BATCH_SIZE``) for ``epochs`` epochs, from the
    initialization of ``model_seed``; cached per process like ``random_features_accuracy``.
    """
    target = load_dataset(target_name, target_data_dir or None)
    train_x, train_y, test_x, test_y = _target_split(target, settings.train_examples, settings.seed)
    model = build_model(model_name, target.input_shape, target.num_classes, seed=model_seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=TARGET_ONLY_LR)
    generator = torch.Generator()
    generator.manual_seed(settings.seed)

    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_y), generator=generator)
        for start in range(0, len(order), TARGET_ONLY_BATCH_SIZE):
            batch = order[start : start + TARGET_ONLY_BATCH_SIZE]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(train_x[batch]), train_y[batch]).backward()
            optimizer.step()
    _, accuracy = evaluate_model(model, test_x, test_y, FEATURE_BATCH_SIZE)
    return accuracy


class TransferEvaluation(RunExtension):
    """Track the best global model by training loss during the run, then evaluate its transfer.

    Each round it records ``global-train-loss``, the mean cross-entropy of the global model on
    a fixed random subset of ``transfer-loss-examples`` source training examples (all with
    0). The model with the lowest value is kept. With ``transfer-patience`` p > 0, the choice
    is frozen once p rounds in a row brought no lower value, which is the model early stopping
    would keep.

    NOTE: Flower 1.42's ``Strategy.start`` offers no way to end a run early. The rounds after the
    stop still run, and their models are recorded but never chosen.
    """

    name = "transfer"

    def __init__(self, run_config: dict[str, Any], dataset: Dataset) -> None:
        self.run_config = run_config
        self.source = dataset
        self.target_name = str(run_config["transfer-target"])
        if not self.target_name:
            raise ValueError("The transfer extension needs a target; set transfer-target to a dataset name, such as mnistm-synthetic.")
        self.target_data_dir = str(run_config["transfer-data-dir"])
        self.target = load_dataset(self.target_name, self.target_data_dir or None)
        if self.target.input_shape != dataset.input_shape:
            raise ValueError(
                f"Transfer target {self.target_name!r} has images of shape {self.target.input_shape} but the source "
                f"{dataset.name!r} has {dataset.input_shape}; choose a target of the source's shape (mnist-rgb -> "
                "mnistm-synthetic, mnist -> optdigits-28, cifar10 -> svhn)."
            )

        self.seed = int(run_config["seed"])
        self.patience = int(run_config["transfer-patience"])
        self.settings = ProbeSettings(
            epochs=int(run_config["transfer-epochs"]),
            lr=float(run_config["transfer-lr"]),
            batch_size=PROBE_BATCH_SIZE,
            train_examples=int(run_config["transfer-train-examples"]),
            seed=self.seed,
        )
        self.model = build_run_model(run_config, dataset.input_shape, dataset.num_classes)

        loss_examples = int(run_config["transfer-loss-examples"])
        indices = np.arange(len(dataset.train_y))
        if 0 < loss_examples < len(indices):
            indices = np.sort(np.random.default_rng(self.seed).permutation(len(indices))[:loss_examples])
        self.loss_x = torch.from_numpy(np.array(dataset.train_x[indices]))
        self.loss_y = torch.from_numpy(np.array(dataset.train_y[indices]))

        self.best_loss = math.inf
        self.best_round = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.rounds_without_improvement = 0
        self.stopped_round: int | None = None

    def global_train_loss(self, arrays: ArrayRecord) -> float:
        """Return the mean cross-entropy of the model in ``arrays`` on the source training subset."""
        self.model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        loss, _ = evaluate_model(self.model, self.loss_x, self.loss_y, int(self.run_config["eval-batch-size"]))
        return loss

    def round_metrics(self, server_round: int, arrays: ArrayRecord, strategy: Any) -> dict[str, float]:
        loss = self.global_train_loss(arrays)
        if server_round == 0 or self.stopped_round is not None:
            return {"global-train-loss": loss}

        if loss < self.best_loss:
            self.best_loss = loss
            self.best_round = server_round
            self.best_state = {key: value.clone() for key, value in arrays.to_torch_state_dict().items()}
            self.rounds_without_improvement = 0
        else:
            self.rounds_without_improvement += 1
            if 0 < self.patience <= self.rounds_without_improvement:
                self.stopped_round = server_round
                logger.info(
                    "Early stopping at round %d: no lower global training loss for %d rounds; keeping round %d (%.4f)",
                    server_round,
                    self.patience,
                    self.best_round,
                    self.best_loss,
                )
        return {"global-train-loss": loss, "best-round": float(self.best_round)}

    def finish(self, output_arrays: ArrayRecord, last_arrays: ArrayRecord, strategy: Any) -> dict[str, Any]:
        """Probe the kept model on the target and return the ``transfer`` section of the summary."""
        if self.best_state is None:
            # No round produced a model (every reply rejected): probe what the strategy delivers.
            self.best_state = output_arrays.to_torch_state_dict()
        self.model.load_state_dict(self.best_state, strict=True)
        source_x = torch.from_numpy(np.array(self.source.test_x))
        source_y = torch.from_numpy(np.array(self.source.test_y))
        _, source_accuracy = evaluate_model(self.model, source_x, source_y, int(self.run_config["eval-batch-size"]))

        train_x, train_y, test_x, test_y = _target_split(self.target, self.settings.train_examples, self.seed)
        same_classes = self.target.num_classes == self.source.num_classes
        target_accuracy = fit_linear_probe(
            extract_features(self.model, train_x),
            train_y,
            extract_features(self.model, test_x),
            test_y,
            self.target.num_classes,
            self.settings,
            self.model.classifier if same_classes else None,
        )

        model_name = str(self.run_config["model"])
        references = {
            "random_features_accuracy": random_features_accuracy(
                model_name, self.target_name, self.target_data_dir, self.settings, self.seed
            ),
            "target_only_accuracy": target_only_accuracy(
                model_name,
                self.target_name,
                self.target_data_dir,
                self.settings,
                self.seed,
                int(self.run_config["transfer-target-only-epochs"]),
            ),
        }
        logger.info(
            "Transfer to %s: target accuracy %.4f (source %.4f, random features %.4f, target only %.4f), model of round %d",
            self.target_name,
            target_accuracy,
            source_accuracy,
            references["random_features_accuracy"],
            references["target_only_accuracy"],
            self.best_round,
        )
        return {
            "transfer": {
                "target": self.target_name,
                "target_accuracy": target_accuracy,
                "source_accuracy": source_accuracy,
                **references,
                "best_round": self.best_round,
                "best_global_train_loss": self.best_loss if math.isfinite(self.best_loss) else None,
                "stopped_round": self.stopped_round,
                "probe": {
                    "optimizer": "adam",
                    "epochs": self.settings.epochs,
                    "lr": self.settings.lr,
                    "batch_size": self.settings.batch_size,
                    "train_examples": len(train_y),
                    "test_examples": len(test_y),
                },
                "target_only_epochs": int(self.run_config["transfer-target-only-epochs"]),
            }
        }

