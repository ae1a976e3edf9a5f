"""FedSR's client side: a Gaussian representation and its two regularizers.

FedSR (Nguyen, Torr and Lim, "FedSR: A Simple and Effective Domain Generalization Method for
Federated Learning", NeurIPS 2022) learns a stochastic representation z ~ p(z|x) =
N(μ(x), diag σ(x)²), classifies the sample z, and adds two terms to the client loss:

    CE(classifier(z), y) + α_L2R · E‖z‖₂² + α_CMI · E KL(p(z|x) ‖ r(z|y))

The KL term bounds the conditional mutual information I(x; z | y) through a reference
distribution r(z|y) = N(r_μ[y], diag softplus(r_σ[y])²). As in the authors' public code
(``atuannguyen/FedSR``, ``src/methods/FedSR.py``), the reference parameters and a scalar C that
rescales (μ, σ) inside the KL term belong to the client: they are trained locally, kept between
rounds and never averaged. Only the network is sent to the server.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from torch import nn
from torch.nn import functional as F

from client.training import MinibatchRegularizer

FEDSR_L2_COEFF = "fedsr-l2-coeff"
FEDSR_CMI_COEFF = "fedsr-cmi-coeff"

# Key of the node-state ArrayRecord that keeps the reference distribution between rounds.
REFERENCE_STATE_KEY = "fedsr-reference"


class GaussianRepresentationModel(nn.Module):
    """A Corolla model whose representation is Gaussian: μ(x) = features(x), σ(x) = softplus(scale(μ(x))).

    ``features`` and ``classifier`` are the wrapped model's own modules, so a transfer probe
    reads the mean representation μ(x) as it reads any model's features, and ``forward``
    classifies μ(x) without sampling. Only FedSR's training objective samples z.

    NOTE: FedSR's encoder outputs μ and the pre-softplus σ from one final layer. Here σ comes
    from an extra linear layer on μ, so that the feature extractor has the same architecture
    (and, for one seed, the same initial weights) as under every other strategy.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not hasattr(base, "features") or not isinstance(getattr(base, "classifier", None), nn.Linear):
            raise TypeError(f"{type(base).__name__} has no `features` module and linear `classifier`; FedSR needs both.")
        self.features = base.features
        dimension = base.classifier.in_features
        self.scale = nn.Linear(dimension, dimension)
        self.classifier = base.classifier

    @property
    def representation_dim(self) -> int:
        """Dimension of z."""
        return self.classifier.in_features

    def distribution(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the mean μ(x) and standard deviation σ(x) of p(z|x)."""
        mean = self.features(inputs)
        return mean, F.softplus(self.scale(mean))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(inputs))


def l2_representation_penalty(z: torch.Tensor) -> torch.Tensor:
    """Return FedSR's L2R term, the batch mean of ‖z‖₂² over samples z of shape (n, d).

    NOTE: the authors' public code penalizes the unsquared norm ‖z‖₂ instead.
    """
    return torch.sum(z**2, dim=1).mean()


def cmi_penalty(
    mean: torch.Tensor,
    std: torch.Tensor,
    labels: torch.Tensor,
    reference_mean: torch.Tensor,
    reference_raw_std: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Return FedSR's CMI term, the batch mean of KL(N(C μ, (C σ)²) ‖ N(r_μ[y], softplus(r_σ[y])²)).

    Per dimension the KL divergence between two Gaussians is
    ``log(s_r / s) + (s² + (m − m_r)²) / (2 s_r²) − 1/2``; dimensions are summed. It is 0
    exactly when C μ(x) = r_μ[y] and C σ(x) = softplus(r_σ[y]). C enters as |C|, so the
    logarithm stays defined if the optimizer drives C below zero.
    """
    reference_std = F.softplus(reference_raw_std)[labels]
    reference_location = reference_mean[labels]
    scaled_mean = mean * scale
    scaled_std = std * torch.abs(scale)
    divergence = (
        torch.log(reference_std)
        - torch.log(scaled_std)
        + (scaled_std**2 + (scaled_mean - reference_location) ** 2) / (2 * reference_std**2)
        - 0.5
    )
    return divergence.sum(dim=1).mean()


class FedSRRegularizer(MinibatchRegularizer):
    """FedSR's minibatch objective: classify a sample z of p(z|x) and add the L2R and CMI terms.

    The noise of z comes from a generator seeded per client and round, so a run is reproducible
    under every engine.
    """

    def __init__(
        self,
        l2_coeff: float,
        cmi_coeff: float,
        num_classes: int,
        dimension: int,
        generator: torch.Generator,
        reference: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.l2_coeff = float(l2_coeff)
        self.cmi_coeff = float(cmi_coeff)
        self.generator = generator
        if reference is None:
            # The authors' initial values: r_μ = 0, r_σ = 1 before softplus, C = 1.
            reference = {
                "mean": np.zeros((num_classes, dimension), dtype=np.float32),
                "raw-std": np.ones((num_classes, dimension), dtype=np.float32),
                "scale": np.ones((), dtype=np.float32),
            }
        expected = {"mean": (num_classes, dimension), "raw-std": (num_classes, dimension), "scale": ()}
        for key, shape in expected.items():
            if key not in reference or tuple(reference[key].shape) != shape:
                raise ValueError(f"FedSR reference distribution: {key!r} must have shape {shape}.")
        self.reference_mean = nn.Parameter(torch.from_numpy(np.array(reference["mean"], dtype=np.float32)))
        self.reference_raw_std = nn.Parameter(torch.from_numpy(np.array(reference["raw-std"], dtype=np.float32)))
        self.scale = nn.Parameter(torch.from_numpy(np.array(reference["scale"], dtype=np.float32)))

    def parameters(self) -> list[torch.Tensor]:
        return [self.reference_mean, self.reference_raw_std, self.scale]

    def objective(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(model, GaussianRepresentationModel):
            raise TypeError("FedSR trains a GaussianRepresentationModel; build the model with build_run_model.")
        mean, std = model.distribution(inputs)
        noise = torch.randn(mean.shape, generator=self.generator, dtype=mean.dtype)
        z = mean + std * noise
        loss = F.cross_entropy(model.classifier(z), labels)

        penalty = torch.zeros((), dtype=loss.dtype)
        if self.l2_coeff != 0.0:
            penalty = penalty + self.l2_coeff * l2_representation_penalty(z)
        if self.cmi_coeff != 0.0:
            penalty = penalty + self.cmi_coeff * cmi_penalty(
                mean, std, labels, self.reference_mean, self.reference_raw_std, self.scale
            )
        return loss, penalty

    def save(self, state: RecordDict) -> None:
        """Store the reference distribution in the node's state for the next round."""
        state[REFERENCE_STATE_KEY] = ArrayRecord(
            {
                "mean": Array(self.reference_mean.detach().numpy().copy()),
                "raw-std": Array(self.reference_raw_std.detach().numpy().copy()),
                "scale": Array(self.scale.detach().numpy().copy()),
            }
        )


def fedsr_regularizer(config: Any, model: nn.Module, num_classes: int, state: RecordDict, noise_seed: int) -> FedSRRegularizer:
    """Build the FedSR objective of one round from the server's config and the node's state."""
    if not isinstance(model, GaussianRepresentationModel):
        raise TypeError("Strategy fedsr needs the Gaussian representation model; build it with build_run_model.")
    reference = None
    if REFERENCE_STATE_KEY in state.array_records:
        record = state.array_records[REFERENCE_STATE_KEY]
        reference = {key: record[key].numpy() for key in record}
    generator = torch.Generator()
    generator.manual_seed(noise_seed)
    return FedSRRegularizer(
        float(config[FEDSR_L2_COEFF]),
        float(config.get(FEDSR_CMI_COEFF, 0.0)),
        num_classes,
        model.representation_dim,
        generator,
        reference,
    )
