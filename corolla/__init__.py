"""Corolla: federated and multi-party learning methods on Flower."""

__version__ = "0.1.0"
