"""Experiments, datasets, partitioners, simulation engines and run reports."""
