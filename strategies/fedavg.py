"""FedAvg with Corolla's reply validation (McMahan et al., 2017).

The global model is the example-weighted mean of the client models:
``w_{t+1} = sum_k (n_k / n) w_k``.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from strategies.base import ValidatedStrategy


class FedAvg(ValidatedStrategy, FlowerFedAvg):
    """Flower's FedAvg whose replies go through ``validate_replies`` first."""
