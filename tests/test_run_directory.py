"""What a run leaves on disk, and how the command reports success and failure."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from corolla.cli import main
from server.results import read_events
from simulations.inprocess import run_inprocess


def test_run_directory_has_every_artifact(digits_config):
    config = digits_config(**{"num-server-rounds": 2})
    run_inprocess(config)
    run_dir = Path(config["out-dir"])

    for name in ("config.toml", "events.jsonl", "summary.json", "final_model.pt", "checkpoint.pt", "metrics.png", "client_accuracy.png"):
        assert (run_dir / name).is_file(), name


def test_config_toml_is_the_resolved_config(digits_config):
    config = digits_config(**{"num-server-rounds": 2, "lr": 0.2})
    run_inprocess(config)
    written = tomllib.loads((Path(config["out-dir"]) / "config.toml").read_text())
    assert written == config


def test_summary_has_required_keys(digits_config):
    config = digits_config(**{"num-server-rounds": 2, "num-clients": 4})
    summary = run_inprocess(config)
    on_disk = json.loads((Path(config["out-dir"]) / "summary.json").read_text())

    assert on_disk == summary
    assert summary["experiment"] == "digits-fedavg"
    assert summary["strategy"] == "fedavg"
    assert summary["rounds"] == 2
    assert set(summary["final"]) == {"accuracy", "loss"}
    assert sorted(summary["clients"]) == ["0", "1", "2", "3"]
    assert 0.0 <= summary["clients"]["2"]["eval-accuracy"] <= 1.0


def test_events_have_one_round_line_per_round_and_client_results(digits_config):
    config = digits_config(**{"num-server-rounds": 2, "num-clients": 3})
    run_inprocess(config)
    events = read_events(Path(config["out-dir"]) / "events.jsonl")
    kinds = [event.WhichOneof("event") for event in events]

    assert kinds[0] == "run_started"
    assert kinds[-1] == "run_finished"
    assert [event.round for event in events if event.WhichOneof("event") == "round_metrics"] == [0, 1, 2]
    assert kinds.count("client_result") == 2 * 3 * 2
    assert events[-1].run_finished.status == "completed"


def test_final_model_matches_last_central_evaluation(digits_config):
    config = digits_config(**{"num-server-rounds": 2})
    summary = run_inprocess(config)
    state = torch.load(Path(config["out-dir"]) / "final_model.pt")
    from client.models import build_model
    from client.training import evaluate_model
    from simulations.datasets import load_dataset

    dataset = load_dataset("digits")
    model = build_model("mlp", dataset.input_shape, dataset.num_classes)
    model.load_state_dict(state)
    loss, accuracy = evaluate_model(model, torch.from_numpy(dataset.test_x.copy()), torch.from_numpy(dataset.test_y.copy()))
    assert accuracy == summary["final"]["accuracy"]
    assert abs(loss - summary["final"]["loss"]) < 1e-9


def test_simulate_command_succeeds_and_prints_progress(tmp_path, capsys):
    out = tmp_path / "cli-run"
    code = main(["simulate", "digits-fedavg", "--set", "num-server-rounds=2", "--out", str(out)])
    printed = capsys.readouterr().out

    assert code == 0
    assert "round   2/2" in printed
    assert "central test accuracy" in printed
    assert (out / "summary.json").is_file()


def test_failed_run_exits_nonzero_with_reason(tmp_path, capsys):
    out = tmp_path / "failed-run"
    code = main(["simulate", "digits-fedavg", "--set", "model=lenet5", "--out", str(out)])
    error = capsys.readouterr().err

    assert code != 0
    assert "lenet5 needs inputs of at least 12x12" in error
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "lenet5" in summary["reason"]


def test_run_ended_by_signal_is_recorded_as_stopped(digits_config, monkeypatch):
    """A run that Flower ends with SystemExit (its SIGTERM handler, as `flwr stop` triggers) is stopped, not failed."""
    from server import app as server_app

    config = digits_config(**{"num-server-rounds": 2})
    real_evaluate = server_app.CentralEvaluation.__call__

    def stop_in_round_one(self, server_round, arrays):
        if server_round == 1:
            raise SystemExit(0)
        return real_evaluate(self, server_round, arrays)

    monkeypatch.setattr(server_app.CentralEvaluation, "__call__", stop_in_round_one)

    try:
        run_inprocess(config)
    except SystemExit:
        pass

    summary = json.loads((Path(config["out-dir"]) / "summary.json").read_text())
    assert summary["status"] == "stopped"
    assert "round 1" in summary["reason"]
    finished = read_events(Path(config["out-dir"]) / "events.jsonl")[-1]
    assert finished.run_finished.status == "stopped"


def test_missing_nodes_fail_run_after_wait_limit(digits_config):
    from server.app import NodeWaitTimeoutError

    config = digits_config(**{"num-clients": 3, "num-server-rounds": 1, "node-wait-timeout": 1.0})

    with pytest.raises(NodeWaitTimeoutError, match="Only 2 of the 3 nodes"):
        run_inprocess(config, num_nodes=2)

    summary = json.loads((Path(config["out-dir"]) / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "raise node-wait-timeout" in summary["reason"]


def test_second_run_into_same_directory_is_rejected(digits_config):
    config = digits_config(**{"num-server-rounds": 1})
    first = run_inprocess(config)

    with pytest.raises(FileExistsError, match="already contains a run"):
        run_inprocess(config)

    summary = json.loads((Path(config["out-dir"]) / "summary.json").read_text())
    assert summary == first


def test_data_directory_nodes_keep_separate_results(tmp_path):
    from server.results import RunRecorder
    from simulations.experiments import resolve_run_config
    from strategies import ClientRecord, RoundReport

    config = resolve_run_config("digits-fedavg", {"out-dir": str(tmp_path / "run")})
    recorder = RunRecorder(tmp_path / "run", config)
    report = RoundReport(
        1,
        client_results=[
            ClientRecord("train", 11, -1, 10, {"train-loss": 0.5}),
            ClientRecord("train", 12, -1, 20, {"train-loss": 0.7}),
            ClientRecord("train", 13, 0, 30, {"train-loss": 0.9}),
        ],
        accepted_train_replies=3,
    )
    recorder.record_round(1, {"accuracy": 0.5, "loss": 1.0}, report)
    recorder.fail("stopped by the test")

    clients = json.loads((tmp_path / "run" / "summary.json").read_text())["clients"]
    assert list(clients) == ["0", "node-11", "node-12"]
    assert clients["node-11"]["train-loss"] == 0.5
    assert clients["node-12"]["train-loss"] == 0.7


def test_unknown_dataset_fails_before_training(tmp_path, capsys):
    code = main(["simulate", "digits-fedavg", "--set", "dataset=cifar1000", "--out", str(tmp_path / "x")])
    assert code != 0
    assert "cifar1000" in capsys.readouterr().err


def test_unknown_override_key_exits_with_usage_error(tmp_path, capsys):
    code = main(["simulate", "digits-fedavg", "--set", "rounds=2", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "Unknown run-config key 'rounds'" in capsys.readouterr().err


def test_out_under_a_file_exits_with_usage_error(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")

    code = main(["simulate", "digits-fedavg", "--out", str(a_file / "run")])

    assert code == 2
    assert f"{a_file} is a file" in capsys.readouterr().err


def test_out_file_exits_with_usage_error(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")

    code = main(["simulate", "digits-fedavg", "--out", str(a_file)])

    assert code == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_setting_for_another_strategy_exits_with_usage_error(tmp_path, capsys):
    code = main(["simulate", "digits-fedavg", "--set", "preference-weights=1,1", "--out", str(tmp_path / "x")])

    assert code == 2
    error = capsys.readouterr().err
    assert "'fedavg' does not use preference-weights" in error
    assert "omd-tch" in error


def test_report_prints_table_and_writes_plot(digits_config, tmp_path, capsys):
    first = digits_config("a", **{"num-server-rounds": 1})
    second = digits_config("b", **{"num-server-rounds": 2, "strategy": "fedprox", "proximal-mu": 0.1})
    run_inprocess(first)
    run_inprocess(second)
    plot = tmp_path / "compare.png"

    code = main(["report", first["out-dir"], second["out-dir"], "--out", str(plot)])
    printed = capsys.readouterr().out

    assert code == 0
    assert "fedprox" in printed
    assert plot.stat().st_size > 0


def test_list_names_presets_strategies_models_and_datasets(capsys):
    assert main(["list"]) == 0
    printed = capsys.readouterr().out
    for name in ("mnist-fedavg", "digits-fedavg", "fedavg", "fedprox", "qfedavg", "mlp", "lenet5", "cnn", "mnist", "digits", "dirichlet"):
        assert name in printed
