"""Model builders, chosen by name from the run configuration.

The client trains these models and the server builds the same ones to evaluate
the global model centrally, so both sides import this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


class ModelError(ValueError):
    """Raised for an unknown model name or an input shape a model cannot take."""


class MLP(nn.Module):
    """Two-layer perceptron, 784-200-10 on MNIST (McMahan et al., 2017)."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, hidden: int = 200) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(inputs))


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998) with ReLU and max pooling.

    The first convolution pads by 2, so a 28x28 MNIST digit is seen as the 32x32
    input of the original network.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        if min(height, width) < 12:
            raise ModelError(
                f"lenet5 needs inputs of at least 12x12 pixels, got {height}x{width}; "
                "use model = mlp or cnn for 8x8 digits."
            )
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = _flat_size(self.features, input_shape)
        self.features.append(nn.Linear(flat, 120))
        self.features.append(nn.ReLU())
        self.features.append(nn.Linear(120, 84))
        self.features.append(nn.ReLU())
        self.classifier = nn.Linear(84, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(inputs))


class SmallCNN(nn.Module):
    """Two 3x3 convolution blocks (32 and 64 channels) and a 128-unit dense layer."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = _flat_size(self.features, input_shape)
        self.features.append(nn.Linear(flat, 128))
        self.features.append(nn.ReLU())
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(inputs))


def _flat_size(layers: nn.Module, input_shape: tuple[int, int, int]) -> int:
    with torch.no_grad():
        return int(layers(torch.zeros(1, *input_shape)).shape[1])


MODELS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "mlp": (MLP, "784-200-10 perceptron (input size follows the dataset)"),
    "lenet5": (LeNet5, "LeNet-5, for inputs of 12x12 pixels or more"),
    "cnn": (SmallCNN, "two 3x3 conv blocks and a dense layer"),
}


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int, seed: int | None = None) -> nn.Module:
    """Build the model ``name``; with ``seed`` its initial weights are reproducible.

    Every model has a ``features`` extractor and a linear ``classifier`` head, so
    methods that regularize or re-fit the head find it under one name.
    """
    if name not in MODELS:
        raise ModelError(f"Unknown model {name!r}; choose one of: {', '.join(MODELS)}.")
    builder, _ = MODELS[name]
    if seed is None:
        return builder(input_shape, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(input_shape, num_classes)


def build_run_model(run_config: dict, input_shape: tuple[int, int, int], num_classes: int, seed: int | None = None) -> nn.Module:
    """Build the model a run trains: ``run_config["model"]``, wrapped when the strategy needs it.

    FedSR trains a Gaussian representation on top of the model's features (see
    ``client.fedsr``); the server and every client must build the same architecture.
    """
    model = build_model(str(run_config["model"]), input_shape, num_classes, seed)
    if str(run_config.get("strategy", "")) != "fedsr":
        return model
    from client.fedsr import GaussianRepresentationModel

    if seed is None:
        return GaussianRepresentationModel(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return GaussianRepresentationModel(model)
