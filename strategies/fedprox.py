"""FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks").

The server aggregates like FedAvg and sends ``proximal-mu``; each client
minimizes ``F_k(w) + (mu / 2) * ||w - w_t||^2`` from the global model ``w_t``
(the proximal term is computed in ``client.training.train_locally``).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedProx as FlowerFedProx

from strategies.base import ValidatedStrategy


class FedProx(ValidatedStrategy, FlowerFedProx):
    """Flower's FedProx whose replies go through ``validate_replies`` first."""
