"""Run extensions: extra evaluations a ServerApp run performs besides central accuracy.

An experiment names its extensions in the run-config key ``extensions``
(comma-separated). Each extension may add values to every round's events and
a section to ``summary.json`` when the run ends, for example per-client
fairness metrics or a transfer-learning evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord

from simulations.datasets import Dataset


class RunExtension:
    """Base class of an extension; both hooks do nothing by default."""

    name = "extension"

    def round_metrics(self, server_round: int, arrays: ArrayRecord, strategy: Any) -> dict[str, float]:
        """Return values to record with round ``server_round`` for the global model ``arrays``."""
        return {}

    def finish(self, output_arrays: ArrayRecord, last_arrays: ArrayRecord, strategy: Any) -> dict[str, Any]:
        """Return sections to add to ``summary.json``.

        ``output_arrays`` is the model the strategy delivers (a converted model
        for strategies that average their iterates) and ``last_arrays`` the
        last global model.
        """
        return {}


ExtensionBuilder = Callable[[dict[str, Any], Dataset], RunExtension]

# Extension name -> builder; modules that define extensions register them here.
EXTENSIONS: dict[str, ExtensionBuilder] = {}


def _build_fairness(run_config: dict[str, Any], dataset: Dataset) -> RunExtension:
    from server.fairness import FairnessExtension  # imported here because server.fairness imports this module

    return FairnessExtension(run_config, dataset)


EXTENSIONS["fairness"] = _build_fairness


def _build_transfer(run_config: dict[str, Any], dataset: Dataset) -> RunExtension:
    from server.transfer import TransferEvaluation  # imported here because server.transfer imports this module

    return TransferEvaluation(run_config, dataset)


EXTENSIONS["transfer"] = _build_transfer


def build_extensions(run_config: dict[str, Any], dataset: Dataset) -> list[RunExtension]:
    """Build the extensions listed in ``run_config["extensions"]``."""
    names = [name.strip() for name in str(run_config["extensions"]).split(",") if name.strip()]
    unknown = [name for name in names if name not in EXTENSIONS]
    if unknown:
        raise ValueError(f"Unknown run extensions {unknown}; choose from: {', '.join(sorted(EXTENSIONS)) or 'none registered'}.")
    return [EXTENSIONS[name](run_config, dataset) for name in names]
