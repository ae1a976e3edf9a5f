"""Local training and evaluation loops shared by the ClientApp and the server.

Minibatches are drawn from tensors held in memory with an explicit
``torch.Generator``, so the data order of a client is a function of the run's
seed, the client's partition and the round, and the same under every engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainSettings:
    """Local training hyperparameters of one round."""

    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    local_epochs: int = 1
    local_steps: int = 0
    batch_size: int = 32
    proximal_mu: float = 0.0

    @classmethod
    def from_run_config(cls, run_config: dict, proximal_mu: float = 0.0) -> TrainSettings:
        """Read the client hyperparameters from a resolved run configuration."""
        return cls(
            optimizer=str(run_config["optimizer"]),
            lr=float(run_config["lr"]),
            momentum=float(run_config["momentum"]),
            weight_decay=float(run_config["weight-decay"]),
            local_epochs=int(run_config["local-epochs"]),
            local_steps=int(run_config["local-steps"]),
            batch_size=int(run_config["batch-size"]),
            proximal_mu=proximal_mu,
        )


@dataclass
class TrainResult:
    """Outcome of one call of ``train_locally``: steps, examples, loss and penalty values."""

    steps: int
    examples_seen: int
    mean_loss: float
    # Value of (mu / 2) * ||w - w_global||^2 at each step; empty when mu = 0.
    proximal_terms: list[float] = field(default_factory=list)
    # Value of the regularizer's penalty at each step; empty without a regularizer.
    penalties: list[float] = field(default_factory=list)


class MinibatchRegularizer:
    """A term a client method adds to the loss of every minibatch in ``train_locally``.

    The default ``objective`` runs the model once and adds ``penalty``, which
    subclasses define and which may differentiate through the loss (double
    backpropagation). A method that needs its own forward pass, such as a
    stochastic representation, overrides ``objective`` instead. Parameters
    that belong to the regularizer and not to the model (kept by the client
    between rounds) are listed by ``parameters`` so the optimizer trains them.
    """

    def objective(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the minibatch's cross-entropy and the penalty added to it."""
        loss = F.cross_entropy(model(inputs), labels)
        return loss, self.penalty(model, inputs, labels, loss)

    def penalty(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """Return the penalty for a minibatch whose cross-entropy, with its graph, is ``loss``."""
        raise NotImplementedError

    def parameters(self) -> list[torch.Tensor]:
        """Return the regularizer's own trainable tensors; none by default."""
        return []


def make_optimizer(parameters, settings: TrainSettings) -> torch.optim.Optimizer:
    """Build the optimizer named in ``settings``."""
    if settings.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    if settings.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    raise ValueError(f"Unknown optimizer {settings.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}.")


def minibatches(num_examples: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield the index tensors of one epoch in a shuffled order.

    ``batch_size`` 0 means one full batch (the data are still permuted, which
    does not change a full-batch gradient but keeps the generator's stream the
    same for every batch size).
    """
    order = torch.randperm(num_examples, generator=generator)
    size = num_examples if batch_size == 0 else batch_size
    for start in range(0, num_examples, size):
        yield order[start : start + size]


def planned_batches(num_examples: int, settings: TrainSettings, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield minibatch indices for ``local_steps`` steps, or ``local_epochs`` epochs."""
    if settings.local_steps > 0:
        taken = 0
        while True:
            for batch in minibatches(num_examples, settings.batch_size, generator):
                yield batch
                taken += 1
                if taken == settings.local_steps:
                    return
    else:
        for _ in range(settings.local_epochs):
            yield from minibatches(num_examples, settings.batch_size, generator)


def train_locally(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    settings: TrainSettings,
    generator: torch.Generator,
    regularizer: MinibatchRegularizer | None = None,
) -> TrainResult:
    """Train ``model`` in place on one client's data.

    With ``proximal_mu`` > 0 this is FedProx's local objective (Li et al., 2020):
    ``CE(w) + (mu / 2) * ||w - w_global||^2``, where ``w_global`` is the model as
    received at the start of the round. With a ``regularizer``, each minibatch's
    objective is ``regularizer.objective`` (its loss plus its penalty) in place
    of the plain cross-entropy; ``mean_loss`` still reports the loss alone.
    """
    if len(labels) == 0:
        raise ValueError("This client has no training examples; check the partition.")
    model.train()
    trainable = list(model.parameters())
    if regularizer is not None:
        trainable += regularizer.parameters()
    optimizer = make_optimizer(trainable, settings)
    global_params = [p.detach().clone() for p in model.parameters()] if settings.proximal_mu > 0 else None

    total_loss = 0.0
    steps = 0
    seen = 0
    proximal_terms: list[float] = []
    penalties: list[float] = []
    for batch in planned_batches(len(labels), settings, generator):
        optimizer.zero_grad(set_to_none=True)
        if regularizer is None:
            loss = F.cross_entropy(model(inputs[batch]), labels[batch])
            objective = loss
        else:
            loss, penalty = regularizer.objective(model, inputs[batch], labels[batch])
            penalties.append(penalty.item())
            objective = loss + penalty

        if global_params is not None:
            squared_distance = sum(
                torch.sum((param - anchor) ** 2) for param, anchor in zip(model.parameters(), global_params)
            )
            proximal = 0.5 * settings.proximal_mu * squared_distance
            proximal_terms.append(proximal.item())
            objective = objective + proximal

        objective.backward()
        optimizer.step()
        total_loss += loss.item() * len(batch)
        seen += len(batch)
        steps += 1
    return TrainResult(
        steps=steps,
        examples_seen=seen,
        mean_loss=total_loss / seen,
        proximal_terms=proximal_terms,
        penalties=penalties,
    )


@torch.no_grad()
def evaluate_model(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """Return the mean cross-entropy and the accuracy of ``model`` on the given data."""
    if len(labels) == 0:
        raise ValueError("Cannot evaluate on zero examples.")
    model.eval()
    total_loss = 0.0
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(inputs[start : start + batch_size])
        target = labels[start : start + batch_size]
        total_loss += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    return total_loss / len(labels), correct / len(labels)


def client_generator(seed: int, partition_id: int, server_round: int) -> torch.Generator:
    """Return the generator of a client's data order in one round."""
    generator = torch.Generator()
    generator.manual_seed(seed * 1_000_003 + (partition_id + 1) * 10_007 + server_round)
    return generator
