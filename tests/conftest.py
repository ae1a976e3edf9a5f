"""Shared fixtures: small resolved run configurations and an isolated Flower home."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from simulations.experiments import resolve_run_config


@pytest.fixture(autouse=True)
def isolated_flower_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep Flower's configuration, telemetry and dependency installation away from the user's."""
    home = tmp_path_factory.mktemp("flwr-home")
    monkeypatch.setenv("FLWR_HOME", str(home))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    return home


@pytest.fixture
def digits_config(tmp_path: Path):
    """Return a factory of resolved digits-fedavg configs writing under ``tmp_path``."""

    def make(run_name: str = "run", **overrides: Any) -> dict[str, Any]:
        values = {key.replace("_", "-"): value for key, value in overrides.items()}
        values.setdefault("out-dir", str(tmp_path / run_name))
        return resolve_run_config("digits-fedavg", values)

    return make


@pytest.fixture
def single_torch_thread():
    """Run the test with one torch thread, restoring the previous count afterwards.

    On a loaded machine torch's default of one thread per core makes the many small
    backward passes of a short federated run tens of times slower.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
