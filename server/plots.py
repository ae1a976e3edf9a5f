"""PNG plots of a run directory: metrics per round and per-client accuracy."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from server.results import EVENTS_FILE, client_key, client_sort_key, read_events  # noqa: E402


def client_accuracy_by_round(run_dir: Path) -> dict[str, dict[int, float]]:
    """Return ``{client key: {round: federated-evaluation accuracy}}`` from the events (see ``client_key``)."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for event in read_events(run_dir / EVENTS_FILE):
        if event.WhichOneof("event") != "client_result":
            continue
        result = event.client_result
        if result.phase == "evaluate" and "eval-accuracy" in result.metrics:
            series[client_key(result.partition_id, result.node_id)][event.round] = result.metrics["eval-accuracy"]
    return {key: series[key] for key in sorted(series, key=client_sort_key)}


def plot_run(run_dir: Path, summary: dict[str, Any]) -> list[Path]:
    """Write ``metrics.png`` and, when clients evaluated, ``client_accuracy.png``."""
    history = summary["history"]
    rounds = [entry["round"] for entry in history]
    written = []

    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(10, 4))
    accuracy_axis.plot(rounds, [entry["central"].get("accuracy") for entry in history], marker="o", label="central test")
    loss_axis.plot(rounds, [entry["central"].get("loss") for entry in history], marker="o", label="central test")
    federated = [entry for entry in history if entry["evaluate"]]
    if federated:
        federated_rounds = [entry["round"] for entry in federated]
        accuracy_axis.plot(federated_rounds, [entry["evaluate"].get("eval-accuracy") for entry in federated], marker="s", label="clients' test (weighted)")
        loss_axis.plot(federated_rounds, [entry["evaluate"].get("eval-loss") for entry in federated], marker="s", label="clients' test (weighted)")
    trained = [entry for entry in history if entry["train"]]
    if trained:
        loss_axis.plot([entry["round"] for entry in trained], [entry["train"].get("train-loss") for entry in trained], marker="^", label="clients' training")
    accuracy_axis.set(xlabel="round", ylabel="accuracy", title=f"{summary['experiment']} ({summary['strategy']})")
    loss_axis.set(xlabel="round", ylabel="cross-entropy", title="loss")
    for axis in (accuracy_axis, loss_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    path = run_dir / "metrics.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    written.append(path)

    per_client = client_accuracy_by_round(run_dir)
    if per_client:
        figure, axis = plt.subplots(figsize=(7, 4))
        for key, series in per_client.items():
            axis.plot(list(series), list(series.values()), marker=".", label=f"client {key}")
        axis.set(xlabel="round", ylabel="accuracy on the client's test split", title="per-client accuracy")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small", ncol=2)
        figure.tight_layout()
        path = run_dir / "client_accuracy.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written
