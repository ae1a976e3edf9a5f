"""Corolla's ClientApp, models, local training loops and node data."""
