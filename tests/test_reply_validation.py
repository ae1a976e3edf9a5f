"""Bad client replies are rejected with a reason in a real ServerApp run, never averaged in."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from client import app as corolla_client
from server.results import read_events
from simulations.inprocess import run_inprocess

Corruption = Callable[[int, Message], Message]


def client_app_with(corrupt: Corruption) -> ClientApp:
    """Return a ClientApp that trains like Corolla's and then lets ``corrupt`` edit the reply."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        reply = corolla_client.train(message, context)
        return corrupt(int(context.node_config["partition-id"]), reply)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return corolla_client.evaluate(message, context)

    return app


def replace_array(reply: Message, key: str, value: np.ndarray) -> Message:
    arrays = reply.content["arrays"]
    updated = {name: arrays[name] for name in arrays}
    updated[key] = Array(value)
    reply.content["arrays"] = ArrayRecord(array_dict=updated)
    return reply


def set_metric(reply: Message, key: str, value) -> Message:
    metrics = dict(reply.content["metrics"])
    metrics[key] = value
    reply.content["metrics"] = MetricRecord(metrics)
    return reply


def rejections(run_dir: Path) -> list:
    return [event.rejected_reply for event in read_events(run_dir / "events.jsonl") if event.WhichOneof("event") == "rejected_reply"]


def run(digits_config, corrupt: Corruption, **overrides) -> tuple[dict, Path]:
    config = digits_config(**{"num-clients": 3, "num-server-rounds": 2, **overrides})
    summary = run_inprocess(config, client_app=client_app_with(corrupt))
    return summary, Path(config["out-dir"])


def test_nan_weights_are_rejected(digits_config):
    def corrupt(partition: int, reply: Message) -> Message:
        if partition == 1:
            weight = reply.content["arrays"]["classifier.weight"].numpy().copy()
            weight[0, 0] = np.nan
            return replace_array(reply, "classifier.weight", weight)
        return reply

    summary, run_dir = run(digits_config, corrupt)
    rejected = rejections(run_dir)
    assert [r.partition_id for r in rejected] == [1, 1]
    assert "non-finite" in rejected[0].reason
    assert np.isfinite(summary["final"]["loss"])
    assert summary["history"][-1]["accepted"] == 2


def test_wrong_shape_is_rejected(digits_config):
    def corrupt(partition: int, reply: Message) -> Message:
        if partition == 0:
            return replace_array(reply, "classifier.bias", np.zeros(11, dtype=np.float32))
        return reply

    summary, run_dir = run(digits_config, corrupt)
    rejected = rejections(run_dir)
    assert len(rejected) == 2
    assert "has shape (11,), expected (10,)" in rejected[0].reason
    assert summary["status"] == "completed"


def test_wrong_dtype_is_rejected(digits_config):
    def corrupt(partition: int, reply: Message) -> Message:
        if partition == 2:
            bias = reply.content["arrays"]["classifier.bias"].numpy().astype(np.float64)
            return replace_array(reply, "classifier.bias", bias)
        return reply

    _, run_dir = run(digits_config, corrupt)
    assert "dtype float64, expected float32" in rejections(run_dir)[0].reason


def test_extra_metric_key_is_rejected(digits_config):
    def corrupt(partition: int, reply: Message) -> Message:
        return set_metric(reply, "surprise", 1.0) if partition == 2 else reply

    summary, run_dir = run(digits_config, corrupt)
    rejected = rejections(run_dir)
    assert len(rejected) == 2
    assert "unexpected metric keys ['surprise']" in rejected[0].reason
    assert summary["history"][-1]["accepted"] == 2


def test_missing_array_is_rejected(digits_config):
    def corrupt(partition: int, reply: Message) -> Message:
        if partition == 0:
            arrays = reply.content["arrays"]
            reply.content["arrays"] = ArrayRecord(array_dict={k: arrays[k] for k in arrays if k != "classifier.bias"})
        return reply

    _, run_dir = run(digits_config, corrupt)
    assert "missing arrays ['classifier.bias']" in rejections(run_dir)[0].reason


def run_all_rejected(digits_config) -> Path:
    """Run 2 rounds in which every client reports num-examples = 0; return the run directory."""
    config = digits_config(**{"num-clients": 3, "num-server-rounds": 2})
    corrupt = client_app_with(lambda partition, reply: set_metric(reply, "num-examples", 0))
    with pytest.raises(RuntimeError, match="No training reply was accepted in any of the 2 rounds"):
        run_inprocess(config, client_app=corrupt)
    return Path(config["out-dir"])


def test_all_zero_example_counts_keep_previous_model(digits_config):
    run_dir = run_all_rejected(digits_config)
    summary = json.loads((run_dir / "summary.json").read_text())

    rejected = rejections(run_dir)
    assert len(rejected) == 6
    assert all("num-examples must be positive, got 0" in r.reason for r in rejected)
    assert all(entry["kept_previous_model"] for entry in summary["history"][1:])
    initial_accuracy = summary["history"][0]["central"]["accuracy"]
    assert summary["final"]["accuracy"] == initial_accuracy


def test_run_with_no_accepted_reply_fails_with_reason(digits_config):
    run_dir = run_all_rejected(digits_config)
    summary = json.loads((run_dir / "summary.json").read_text())

    assert summary["status"] == "failed"
    assert "round 1, train reply of node" in summary["reason"]
    assert "num-examples must be positive, got 0" in summary["reason"]
    assert not (run_dir / "final_model.pt").exists()


def test_client_exception_is_rejected_with_its_message(digits_config):
    def corrupt(partition: int, reply: Message) -> Message:
        if partition == 0:
            raise RuntimeError("disk on fire")
        return reply

    summary, run_dir = run(digits_config, corrupt)
    rejected = rejections(run_dir)
    assert "disk on fire" in rejected[0].reason
    assert summary["history"][-1]["accepted"] == 2


def test_rejections_are_in_summary_history(digits_config):
    def corrupt(partition: int, reply: Message) -> Message:
        return set_metric(reply, "train-loss", float("inf")) if partition == 0 else reply

    summary, run_dir = run(digits_config, corrupt)
    assert summary["history"][1]["rejected"] == 1
    assert "metric 'train-loss' is not finite" in rejections(run_dir)[0].reason
    assert json.loads((run_dir / "summary.json").read_text())["history"][2]["rejected"] == 1


@pytest.mark.parametrize("strategy", ["fedprox", "qfedavg"])
def test_every_strategy_rejects_nan_weights(digits_config, strategy):
    def corrupt(partition: int, reply: Message) -> Message:
        if partition == 1:
            weight = reply.content["arrays"]["classifier.weight"].numpy().copy()
            weight[:] = np.nan
            return replace_array(reply, "classifier.weight", weight)
        return reply

    summary, run_dir = run(digits_config, corrupt, strategy=strategy, **{"proximal-mu": 0.01})
    assert len(rejections(run_dir)) == 2
    assert np.isfinite(summary["final"]["loss"])
