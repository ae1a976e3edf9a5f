"""Tests for the Ray engine: federation-config arguments and full runs on Flower's simulation engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from simulations import ray_engine
from simulations.experiments import resolve_run_config
from simulations.ray_engine import RayEngineError, format_federation_config, run_with_ray

APP_DIR = Path(__file__).resolve().parents[1]


def track_run_processes(monkeypatch) -> list:
    """Collect the process trackers that ``run_with_ray`` creates, to check for leftover processes."""
    trackers = []
    tracker_class = ray_engine._RunProcesses

    def make_tracker(engine_id: str):
        tracker = tracker_class(engine_id)
        trackers.append(tracker)
        return tracker

    monkeypatch.setattr(ray_engine, "_RunProcesses", make_tracker)
    return trackers


def test_federation_config_integral_cpus():
    assert format_federation_config(10, 1.0, cpu_count=2) == ["num-supernodes=10", "client-resources-num-cpus=1"]
    assert format_federation_config(4, 2, cpu_count=8) == ["num-supernodes=4", "client-resources-num-cpus=2"]


def test_fractional_cpus_scale_ray_cpus():
    arguments = format_federation_config(10, 0.5, cpu_count=2)

    assert arguments == ["num-supernodes=10", "client-resources-num-cpus=1", "init-args-num-cpus=4"]


def test_fractional_cpus_round_down():
    arguments = format_federation_config(10, 1.5, cpu_count=4)

    assert arguments == ["num-supernodes=10", "client-resources-num-cpus=1", "init-args-num-cpus=2"]


@pytest.mark.parametrize("cpus", [0, -1.0, float("nan"), float("inf")])
def test_invalid_cpus_rejected(cpus):
    with pytest.raises(ValueError, match="num_cpus_per_client"):
        format_federation_config(10, cpus, cpu_count=2)


def test_cpus_beyond_available_rejected():
    with pytest.raises(ValueError, match="exceeds the 2 CPUs"):
        format_federation_config(10, 3.0, cpu_count=2)


def test_missing_num_clients_rejected(tmp_path):
    run_config = resolve_run_config("digits-fedavg", {"out-dir": str(tmp_path)})
    del run_config["num-clients"]

    with pytest.raises(ValueError, match="num-clients"):
        run_with_ray(run_config, APP_DIR)


def test_app_dir_without_pyproject_rejected(tmp_path):
    run_config = resolve_run_config("digits-fedavg", {"out-dir": str(tmp_path / "out")})

    with pytest.raises(ValueError, match="pyproject.toml"):
        run_with_ray(run_config, tmp_path)


@pytest.mark.slow
def test_digits_fedavg_runs_on_ray(tmp_path, monkeypatch):
    trackers = track_run_processes(monkeypatch)
    out_dir = tmp_path / "run"
    run_config = resolve_run_config("digits-fedavg", {"out-dir": str(out_dir)})

    run_with_ray(run_config, APP_DIR, timeout=600)

    summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["status"] == "completed"
    assert summary["rounds"] == 3
    assert math.isfinite(summary["final"]["accuracy"])
    assert sorted(summary["clients"]) == sorted(str(partition) for partition in range(10))
    assert len(trackers) == 1
    assert len(trackers[0].sessions) >= 2
    assert trackers[0].live() == []


@pytest.mark.slow
def test_failed_run_raises_ray_engine_error(tmp_path, monkeypatch):
    trackers = track_run_processes(monkeypatch)
    out_dir = tmp_path / "run"
    # Dataset names are checked only when the ServerApp loads the data.
    run_config = resolve_run_config("digits-fedavg", {"out-dir": str(out_dir), "dataset": "no-such-dataset"})

    with pytest.raises(RayEngineError) as raised:
        run_with_ray(run_config, APP_DIR, timeout=600)

    message = str(raised.value)
    assert "finished:failed" in message
    assert "no-such-dataset" in message
    assert len(trackers) == 1
    assert len(trackers[0].sessions) >= 2
    assert trackers[0].live() == []


@pytest.mark.slow
def test_timeout_stops_every_process(tmp_path, monkeypatch):
    trackers = track_run_processes(monkeypatch)
    # 1000 rounds take far longer than 30 s, so the timeout ends a run that is still going.
    run_config = resolve_run_config("digits-fedavg", {"out-dir": str(tmp_path / "run"), "num-server-rounds": 1000})

    with pytest.raises(RayEngineError, match="timed out"):
        run_with_ray(run_config, APP_DIR, timeout=30)

    assert len(trackers) == 1
    assert len(trackers[0].sessions) >= 2
    assert trackers[0].live() == []
