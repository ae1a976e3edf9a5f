"""Both simulation engines run the same apps and give the same results for one seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.experiments import resolve_run_config
from simulations.inprocess import run_inprocess
from simulations.ray_engine import run_with_ray

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_inprocess_and_ray_engines_agree(tmp_path: Path):
    overrides = {"num-clients": 10, "num-server-rounds": 3, "seed": 3, "client-threads": 1}
    inprocess_config = resolve_run_config("digits-fedavg", {**overrides, "out-dir": str(tmp_path / "inprocess")})
    ray_config = resolve_run_config("digits-fedavg", {**overrides, "out-dir": str(tmp_path / "ray")})

    inprocess = run_inprocess(inprocess_config)
    run_with_ray(ray_config, ROOT)
    ray = json.loads((tmp_path / "ray" / "summary.json").read_text())

    assert ray["status"] == "completed"
    assert ray["rounds"] == inprocess["rounds"] == 3
    assert abs(ray["final"]["accuracy"] - inprocess["final"]["accuracy"]) <= 1e-6
    assert abs(ray["final"]["loss"] - inprocess["final"]["loss"]) <= 1e-6
    for ray_round, inprocess_round in zip(ray["history"], inprocess["history"]):
        assert abs(ray_round["central"]["loss"] - inprocess_round["central"]["loss"]) <= 1e-6
