"""Communication accounting: bytes per round from serialized messages, totals, FedGTST's overhead."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.results import read_events
from simulations import inprocess
from simulations.inprocess import InProcessGrid, run_inprocess

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# The 3x3-conv model has 52k parameters, so its messages resemble LeNet-5's (62k) in size.
CNN_RUN = {"model": "cnn", "num-clients": 4, "num-server-rounds": 2, "fraction-evaluate": 0.0, "local-steps": 2, "client-statistic-examples": 64}


def round_bytes(summary: dict, server_round: int) -> int:
    entry = summary["history"][server_round]
    return entry["bytes_sent"] + entry["bytes_received"]


def test_round_bytes_are_in_events_and_summary_totals(digits_config, monkeypatch):
    grids: list[InProcessGrid] = []

    class RecordingGrid(InProcessGrid):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            grids.append(self)

    monkeypatch.setattr(inprocess, "InProcessGrid", RecordingGrid)
    config = digits_config(**{"num-clients": 3, "num-server-rounds": 2, "local-steps": 2})
    summary = run_inprocess(config)
    events = read_events(Path(config["out-dir"]) / "events.jsonl")
    round_events = [event.round_metrics for event in events if event.WhichOneof("event") == "round_metrics"]

    assert [metrics.bytes_sent > 0 for metrics in round_events] == [False, True, True]
    assert [metrics.bytes_sent for metrics in round_events] == [entry["bytes_sent"] for entry in summary["history"]]
    assert [metrics.bytes_received for metrics in round_events] == [entry["bytes_received"] for entry in summary["history"]]
    communication = summary["communication"]
    assert communication["bytes_sent"] == sum(metrics.bytes_sent for metrics in round_events)
    assert communication["bytes_received"] == sum(metrics.bytes_received for metrics in round_events)
    # The strategy measures messages before the grid stamps their ids; the wire sizes differ by those bytes.
    assert communication["bytes_sent"] == pytest.approx(grids[0].bytes_sent, rel=0.01)
    assert communication["bytes_received"] == pytest.approx(grids[0].bytes_received, rel=0.01)


def test_fedgtst_scalar_protocol_adds_under_a_thousandth(digits_config):
    fedavg = run_inprocess(digits_config("fedavg", strategy="fedavg", **CNN_RUN))
    fedgtst = run_inprocess(digits_config("fedgtst", strategy="fedgtst", **CNN_RUN))

    # Round 2 carries the whole protocol: the target goes out and the norms come back.
    extra = round_bytes(fedgtst, 2) - round_bytes(fedavg, 2)
    values = fedgtst["history"][2]["strategy"]
    assert 0 < extra < 1e-3 * round_bytes(fedavg, 2)
    assert values["statistic-bytes-sent"] + values["statistic-bytes-received"] == pytest.approx(extra, rel=0.05)


def test_fedgtst_vector_protocol_reports_its_cost(digits_config):
    fedavg = run_inprocess(digits_config("fedavg", strategy="fedavg", **CNN_RUN))
    vector = run_inprocess(digits_config("vector", strategy="fedgtst", **{"fedgtst-protocol": "vector"}, **CNN_RUN))

    extra = round_bytes(vector, 2) - round_bytes(fedavg, 2)
    values = vector["history"][2]["strategy"]
    assert extra > 0.5 * round_bytes(fedavg, 2)
    assert values["statistic-bytes-sent"] + values["statistic-bytes-received"] == pytest.approx(extra, rel=0.05)
