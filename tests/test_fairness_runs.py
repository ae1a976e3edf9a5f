"""Fairness strategies, the fairness extension, sweeps and reports in real in-process runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from corolla.cli import main
from simulations.experiments import resolve_run_config
from simulations.inprocess import run_inprocess
from simulations.report import plot_client_accuracy
from simulations.sweep import parse_entry, run_sweep, write_sweep_report

NEW_STRATEGIES = ["omd-tch", "adaomd-tch", "afl", "tch", "stch", "qffl", "fedmgda"]
CONVERTING = {"omd-tch", "adaomd-tch"}
METRIC_KEYS = {"average_accuracy", "worst_client_loss", "accuracy_parity", "client_accuracy", "client_loss"}


def fairness_digits(digits_config, run_name: str, **overrides):
    """Three IID digits clients of 479 examples each, 2 rounds, fairness extension on."""
    values = {"num-clients": 3, "num-server-rounds": 2, "partition": "iid", "extensions": "fairness", "client-threads": 1}
    return digits_config(run_name, **{**values, **overrides})


def last_iterate(config) -> dict[str, torch.Tensor]:
    # The checkpoint contains the strategy state with numpy arrays, which weights_only loading rejects.
    return torch.load(Path(config["out-dir"]) / "checkpoint.pt", weights_only=False)["model"]


@pytest.mark.parametrize("strategy", NEW_STRATEGIES)
def test_strategy_run_writes_fairness_summary(digits_config, strategy):
    config = fairness_digits(digits_config, strategy, strategy=strategy)

    summary = run_inprocess(config)

    fairness = summary["fairness"]
    assert summary["status"] == "completed"
    assert METRIC_KEYS <= set(fairness)
    assert METRIC_KEYS <= set(fairness["last_iterate"])
    assert fairness["converted"] == (strategy in CONVERTING)
    assert len(fairness["client_accuracy"]) == 3
    assert 0.0 <= fairness["average_accuracy"] <= 1.0
    assert fairness["worst_client_loss"] == max(fairness["client_loss"])
    assert fairness["accuracy_parity"] == pytest.approx(100 * np.std(fairness["client_accuracy"]))
    assert "fairness/client-2/accuracy" in summary["history"][-1]["extensions"]
    if strategy in CONVERTING:
        assert "fairness/converted/average-accuracy" in summary["history"][-1]["extensions"]
        assert set(summary["final"]) == {"accuracy", "loss"}
        assert set(summary["last_iterate"]) == {"accuracy", "loss"}


def test_omd_tch_without_step_matches_fedavg(digits_config):
    omd = fairness_digits(digits_config, "omd", strategy="omd-tch", **{"eta-lambda": 0.0})
    fedavg = fairness_digits(digits_config, "fedavg", strategy="fedavg")

    run_inprocess(omd)
    run_inprocess(fedavg)

    omd_model, fedavg_model = last_iterate(omd), last_iterate(fedavg)
    for key, value in fedavg_model.items():
        # Flower's FedAvg sums in float32, OMD-TCH in float64: equal up to float32 rounding.
        torch.testing.assert_close(omd_model[key], value, rtol=0, atol=2e-6)


def test_afl_returns_last_iterate_of_omd_euclidean(digits_config):
    afl = fairness_digits(digits_config, "afl", strategy="afl", **{"eta-lambda": 0.5})
    omd = fairness_digits(digits_config, "omd", strategy="omd-tch", **{"eta-lambda": 0.5, "omd-step": "euclidean"})

    afl_summary = run_inprocess(afl)
    omd_summary = run_inprocess(omd)

    afl_final = torch.load(Path(afl["out-dir"]) / "final_model.pt")
    for key, value in last_iterate(omd).items():
        torch.testing.assert_close(afl_final[key], value, rtol=0, atol=0)
    assert afl_summary["fairness"]["average_accuracy"] == omd_summary["fairness"]["last_iterate"]["average_accuracy"]


def test_lambda_weights_are_written_to_round_events(digits_config):
    config = fairness_digits(digits_config, "stch", strategy="stch")

    summary = run_inprocess(config)

    weights = [summary["history"][-1]["strategy"][f"lambda-{client}"] for client in range(3)]
    assert sum(weights) == pytest.approx(1.0)


def test_rotated_mnist_small_two_rounds(tmp_path):
    config = resolve_run_config(
        "fair-rotated-mnist-small",
        {"num-server-rounds": 2, "local-steps": 2, "client-threads": 1, "out-dir": str(tmp_path / "run")},
    )

    summary = run_inprocess(config)

    assert summary["strategy"] == "adaomd-tch"
    assert len(summary["fairness"]["client_accuracy"]) == 10
    assert summary["history"][-1]["strategy"]["kept-iterates"] >= 1


def test_sweep_writes_table_and_resumes(digits_config, tmp_path):
    calls = []

    def runner(config):
        calls.append(config["strategy"])
        return run_inprocess(config)

    entries = [parse_entry("fedavg"), parse_entry("omd-tch:eta-lambda=0.5")]
    overrides = {"num-clients": 3, "num-server-rounds": 1, "partition": "iid", "client-threads": 1}
    out_dir = tmp_path / "sweep"

    outcomes = run_sweep("digits-fedavg", entries, [0, 1], overrides, out_dir, runner=runner)
    table, plot_path = write_sweep_report(outcomes, out_dir, "corolla sweep digits-fedavg")
    run_sweep("digits-fedavg", entries, [0, 1], overrides, out_dir, runner=runner)

    assert len(calls) == 4
    assert plot_path.is_file()
    assert "| omd-tch[eta-lambda=0.5] | converted | 2 |" in table
    assert "| omd-tch[eta-lambda=0.5] | last iterate | 2 |" in table
    assert "| fedavg | last iterate | 2 |" in table
    assert (out_dir / "sweep.md").read_text().startswith("Command: `corolla sweep digits-fedavg`")
    assert len(json.loads((out_dir / "sweep.json").read_text())["runs"]) == 4


def test_sweep_entry_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="Unknown strategy 'nope'"):
        parse_entry("nope:eta-lambda=1")


def test_report_plots_client_accuracy(digits_config, tmp_path, capsys):
    first = fairness_digits(digits_config, "first", strategy="tch")
    second = fairness_digits(digits_config, "second", strategy="fedavg")
    run_inprocess(first)
    run_inprocess(second)

    code = main(["report", first["out-dir"], second["out-dir"], "--out", str(tmp_path / "report.png")])

    assert code == 0
    assert (tmp_path / "report_clients.png").is_file()
    assert "Per-client accuracy plot" in capsys.readouterr().out


def test_client_accuracy_plot_needs_fairness(digits_config, tmp_path):
    config = digits_config("plain", **{"num-server-rounds": 1, "num-clients": 2})
    run_inprocess(config)

    assert plot_client_accuracy([Path(config["out-dir"])], tmp_path / "clients.png") is None
