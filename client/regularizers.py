"""Client side of the gradient-statistics methods FedGTST and FedIIR, and the round protocol.

Before local training, a client measures a gradient statistic at the global model it received
and reports it with its reply. The server combines the statistics of the accepted replies and
sends the result back with the next round's model. During local training, the client adds a
penalty built from that result to every minibatch loss (see ``MinibatchRegularizer``).

| method  | client reports (metric key)                          | server sends (config key)     | minibatch penalty                          |
| ------- | ---------------------------------------------------- | ----------------------------- | ------------------------------------------ |
| FedGTST | ``grad-norm``: E_B ‖∇_θ CE(θ_t; B)‖₂ or ‖∇_θ L_k(θ_t)‖₂ | ``fedgtst-target`` γ          | ξ (γ − ‖∇_θ CE(θ; B)‖₂)²                   |
| FedGTST, vector protocol | also ``gradient`` = ∇_θ L_k(θ_t)    | ``fedgtst-target-gradient`` v | ξ ‖v − ∇_θ CE(θ; B)‖₂²                     |
| FedIIR  | ``classifier-gradient`` = ∇_w L_k(θ_t)               | ``fediir-mean-gradient`` ḡ    | γ ‖∇_w CE(θ; B) − ḡ‖₂² (w: the linear head) |

FedGTST is from Ma et al., "FedGTST: Boosting Global Transferability of Federated Models via
Statistics Tuning", NeurIPS 2024 (arXiv 2410.13045); FedIIR from Guo et al., "Out-of-Distribution
Generalization of Federated Learning via Implicit Invariant Relationships", ICML 2023. FedSR,
whose client keeps its own state between rounds, is in ``client.fedsr``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from flwr.app import RecordDict
from torch import nn
from torch.nn import functional as F

from client.fedsr import FEDSR_L2_COEFF, FedSRRegularizer, fedsr_regularizer
from client.node_data import NodeData
from client.training import MinibatchRegularizer

# Config keys the server sends with the model.
FEDGTST_XI = "fedgtst-xi"
FEDGTST_PROTOCOL = "fedgtst-protocol"
FEDGTST_NORM = "fedgtst-norm"
FEDGTST_TARGET_NORM = "fedgtst-target"
FEDGTST_TARGET_GRADIENT = "fedgtst-target-gradient"
FEDIIR_PENALTY = "fediir-penalty"
FEDIIR_MEAN_GRADIENT = "fediir-mean-gradient"

# Metric keys a client adds to its training reply.
GRAD_NORM = "grad-norm"
GRADIENT = "gradient"
CLASSIFIER_GRADIENT = "classifier-gradient"

FEDGTST_PROTOCOLS = ("scalar", "vector")
FEDGTST_NORMS = ("minibatch", "full")

# Examples per forward pass when a statistic is computed over many examples.
STATISTIC_CHUNK = 512


def flat_gradient(loss: torch.Tensor, parameters: Sequence[torch.Tensor], create_graph: bool = False) -> torch.Tensor:
    """Return ∇ loss with respect to ``parameters``, concatenated into one vector."""
    gradients = torch.autograd.grad(loss, list(parameters), create_graph=create_graph)
    return torch.cat([gradient.reshape(-1) for gradient in gradients])


def local_gradient(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    parameters: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Return ∇ of the mean cross-entropy of ``model`` over all given examples, as one vector.

    The examples are processed in chunks of ``STATISTIC_CHUNK``, so the gradient is exact for
    any number of examples. No ``.grad`` attribute is written, so the model's optimizer state
    and later training are unaffected.
    """
    if len(labels) == 0:
        raise ValueError("Cannot compute a gradient statistic on zero examples.")
    total = None
    for start in range(0, len(labels), STATISTIC_CHUNK):
        chunk = slice(start, start + STATISTIC_CHUNK)
        loss_sum = F.cross_entropy(model(inputs[chunk]), labels[chunk], reduction="sum")
        gradient = flat_gradient(loss_sum, parameters)
        total = gradient if total is None else total + gradient
    return (total / len(labels)).detach()


def mean_minibatch_gradient_norm(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    parameters: Sequence[torch.Tensor],
    batch_size: int,
) -> float:
    """Return the mean of ‖∇_θ CE(θ; B)‖₂ over consecutive minibatches B of the given examples.

    This is the quantity FedGTST's penalty acts on, estimated at the received model; the
    norm of the full-data gradient is smaller by the minibatch noise. ``batch_size`` 0 means
    one batch of all examples. A last batch smaller than ``batch_size`` is left out unless it
    is the only one.
    """
    size = len(labels) if batch_size <= 0 else min(batch_size, len(labels))
    norms = []
    for start in range(0, len(labels) - size + 1, size):
        chunk = slice(start, start + size)
        loss = F.cross_entropy(model(inputs[chunk]), labels[chunk])
        norms.append(float(torch.linalg.vector_norm(flat_gradient(loss, parameters))))
    return sum(norms) / len(norms)


def statistic_seed(seed: int, partition_id: int, server_round: int) -> int:
    """Return the seed of a client's statistic subset in one round.

    It differs from the seed of ``client.training.client_generator``, so the draws made for a
    client method never change the data order of local training.
    """
    return (seed * 1_000_003 + (partition_id + 1) * 10_007 + server_round) ^ 0x5EED_57A7


def statistic_indices(num_examples: int, max_examples: int, seed: int, partition_id: int, server_round: int) -> torch.Tensor:
    """Return the indices, in a random order, of the local examples on which a round's statistic is computed.

    ``max_examples`` 0 (or at least ``num_examples``) selects every example. Otherwise a fresh
    random subset of that size is drawn each round.
    """
    generator = torch.Generator()
    generator.manual_seed(statistic_seed(seed, partition_id, server_round))
    order = torch.randperm(num_examples, generator=generator)
    if max_examples <= 0 or max_examples >= num_examples:
        return order
    return order[:max_examples]


def _as_vector(values: Sequence[float], size: int, name: str, like: torch.Tensor) -> torch.Tensor:
    if len(values) != size:
        raise ValueError(f"{name} has {len(values)} values but the model has {size} matching parameters.")
    return torch.tensor(list(values), dtype=like.dtype, device=like.device)


# ---------------------------------------------------------------------------------------------
# Penalties


class GradientNormPenalty(MinibatchRegularizer):
    """FedGTST's local regularizer, ξ (γ − ‖∇_θ CE(θ; B)‖₂)² (Ma et al., NeurIPS 2024).

    θ is every trainable parameter of the model and γ the target norm the server built from
    the clients' reported norms. Its gradient needs the derivative of a gradient norm, so the
    minibatch gradient is taken with ``create_graph=True`` (double backpropagation).
    """

    def __init__(self, xi: float, target_norm: float) -> None:
        self.xi = float(xi)
        self.target_norm = float(target_norm)

    def penalty(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        gradient = flat_gradient(loss, parameters, create_graph=True)
        # vector_norm's backward is 0, not NaN, at a zero gradient.
        return self.xi * (self.target_norm - torch.linalg.vector_norm(gradient)) ** 2


class GradientMatchingPenalty(MinibatchRegularizer):
    """Penalty ``coefficient · Σ_p ‖∇_p CE(θ; B) − v_p‖₂²`` over a chosen set of parameters p.

    FedGTST's vector protocol uses it over every parameter with v the server's mean gradient
    direction rescaled to the largest reported norm. FedIIR (Guo et al., ICML 2023) uses it
    over the linear head with v the server's running mean of the clients' head gradients.
    """

    def __init__(self, coefficient: float, target: torch.Tensor, head_only: bool) -> None:
        self.coefficient = float(coefficient)
        self.target = target
        self.head_only = head_only

    def penalty(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        parameters = matched_parameters(model, self.head_only)
        gradient = flat_gradient(loss, parameters, create_graph=True)
        return self.coefficient * torch.sum((gradient - self.target.to(gradient.dtype)) ** 2)


def matched_parameters(model: nn.Module, head_only: bool) -> list[torch.Tensor]:
    """Return the parameters a gradient statistic covers: the linear head's, or all of them."""
    module = model.classifier if head_only else model
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


# ---------------------------------------------------------------------------------------------
# The round protocol, called by the ClientApp


def _method(config: Any) -> str | None:
    methods = [name for name, key in (("fedgtst", FEDGTST_XI), ("fediir", FEDIIR_PENALTY)) if key in config]
    if len(methods) > 1:
        raise ValueError(f"The training config names several client methods {methods}; a round uses one.")
    return methods[0] if methods else None


def client_statistics(
    config: Any,
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
) -> dict[str, float | list[float]]:
    """Return the gradient statistics the round's method reports, measured at the received model.

    Call this before local training: FedGTST and FedIIR report statistics of the global model
    θ_t. FedGTST's ``grad-norm`` is the mean minibatch gradient norm (batches of
    ``batch_size``) when the config's ``fedgtst-norm`` is ``minibatch``, the norm of the
    gradient over all given examples when it is ``full``. Returns an empty dict when the round
    uses neither method.
    """
    method = _method(config)
    if method is None:
        return {}

    if method == "fediir":
        gradient = local_gradient(model, inputs, labels, matched_parameters(model, head_only=True))
        return {CLASSIFIER_GRADIENT: gradient.tolist()}

    parameters = matched_parameters(model, head_only=False)
    norm_kind = str(config.get(FEDGTST_NORM, "minibatch"))
    if norm_kind not in FEDGTST_NORMS:
        raise ValueError(f"Unknown {FEDGTST_NORM} {norm_kind!r}; expected one of {FEDGTST_NORMS}.")
    vector = str(config.get(FEDGTST_PROTOCOL, "scalar")) == "vector"

    statistics: dict[str, float | list[float]] = {}
    gradient = local_gradient(model, inputs, labels, parameters) if vector or norm_kind == "full" else None
    if norm_kind == "full":
        statistics[GRAD_NORM] = float(torch.linalg.vector_norm(gradient))
    else:
        statistics[GRAD_NORM] = mean_minibatch_gradient_norm(model, inputs, labels, parameters, batch_size)
    if vector:
        statistics[GRADIENT] = gradient.tolist()
    return statistics


def regularizer_from_config(config: Any, model: nn.Module) -> MinibatchRegularizer | None:
    """Build the round's FedGTST or FedIIR penalty from the server's config, or return None.

    Returns None (plain local training) when the round uses neither method, when the
    coefficient is 0, or in the first round, before the server has a target to send.
    """
    method = _method(config)
    if method is None:
        return None
    reference = next(model.parameters())

    if method == "fediir":
        coefficient = float(config[FEDIIR_PENALTY])
        if coefficient == 0.0 or FEDIIR_MEAN_GRADIENT not in config:
            return None
        head = matched_parameters(model, head_only=True)
        target = _as_vector(config[FEDIIR_MEAN_GRADIENT], sum(p.numel() for p in head), FEDIIR_MEAN_GRADIENT, reference)
        return GradientMatchingPenalty(coefficient, target, head_only=True)

    xi = float(config[FEDGTST_XI])
    protocol = str(config.get(FEDGTST_PROTOCOL, "scalar"))
    if protocol not in FEDGTST_PROTOCOLS:
        raise ValueError(f"Unknown {FEDGTST_PROTOCOL} {protocol!r}; expected one of {FEDGTST_PROTOCOLS}.")
    if xi == 0.0:
        return None
    if protocol == "scalar":
        if FEDGTST_TARGET_NORM not in config:
            return None
        return GradientNormPenalty(xi, float(config[FEDGTST_TARGET_NORM]))
    if FEDGTST_TARGET_GRADIENT not in config:
        return None
    parameters = matched_parameters(model, head_only=False)
    target = _as_vector(config[FEDGTST_TARGET_GRADIENT], sum(p.numel() for p in parameters), FEDGTST_TARGET_GRADIENT, reference)
    return GradientMatchingPenalty(xi, target, head_only=False)


def prepare_client_method(
    config: Any,
    run_config: dict,
    model: nn.Module,
    data: NodeData,
    state: RecordDict,
    server_round: int,
) -> tuple[dict[str, float | list[float]], MinibatchRegularizer | None]:
    """Return the statistics to report and the regularizer of the client method the config names.

    The statistics are measured at the received model on at most ``client-statistic-examples``
    local training examples. FedSR reports nothing and trains with its own stochastic
    representation, whose reference distribution lives in the node's ``state``. Other
    strategies get no statistics and no regularizer.
    """
    seed = int(run_config["seed"])
    if FEDSR_L2_COEFF in config:
        noise_seed = statistic_seed(seed, data.partition_id, server_round) + 1
        return {}, fedsr_regularizer(config, model, data.num_classes, state, noise_seed)
    if _method(config) is None:
        return {}, None

    indices = statistic_indices(
        len(data.train_y), int(run_config["client-statistic-examples"]), seed, data.partition_id, server_round
    )
    statistics = client_statistics(config, model, data.train_x[indices], data.train_y[indices], int(run_config["batch-size"]))
    return statistics, regularizer_from_config(config, model)


def save_client_method_state(regularizer: MinibatchRegularizer | None, state: RecordDict) -> None:
    """Store what a client method keeps between rounds (FedSR's reference distribution) in ``state``."""
    if isinstance(regularizer, FedSRRegularizer):
        regularizer.save(state)
