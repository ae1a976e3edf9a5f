"""The run directory: configuration, event stream, summary, model and plots.

A run directory holds ``config.toml`` (the resolved run configuration),
``events.jsonl`` (one ``corolla.v1.RunEvent`` per line in protobuf's JSON
mapping), ``summary.json``, ``final_model.pt``, ``checkpoint.pt`` (model and
strategy state after the latest round) and PNG plots.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import tomli_w
import torch
from google.protobuf import json_format

from protos.corolla.v1 import events_pb2
from strategies.base import RoundReport

logger = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "summary.json"


def default_run_directory(experiment: str, root: Path | None = None) -> Path:
    """Return ``runs/<UTC time>-<experiment>`` under ``root`` (the working directory by default)."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return (root or Path.cwd()).resolve() / "runs" / f"{stamp}-{experiment}"


def toml_literal(value: Any) -> str:
    """Render a run-config scalar as a TOML literal (``0.1``, ``"mnist"``, ``true``)."""
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def read_events(path: Path) -> list[events_pb2.RunEvent]:
    """Read an ``events.jsonl`` file back into ``RunEvent`` messages."""
    events = []
    with open(path, encoding="utf-8") as stream:
        for line in stream:
            if line.strip():
                events.append(json_format.Parse(line, events_pb2.RunEvent()))
    return events


def _weighted_means(records: list, phase: str) -> dict[str, float]:
    selected = [record for record in records if record.phase == phase]
    total = sum(record.num_examples for record in selected)
    means: dict[str, float] = {}
    for record in selected:
        for key, value in record.metrics.items():
            means[key] = means.get(key, 0.0) + value * record.num_examples / total
    return means


def client_key(partition_id: int, node_id: int) -> str:
    """Return the key of a client's results: its partition id, or ``node-<id>``.

    A node that serves its own data directory has no partition (partition id -1), so its
    node id distinguishes it from other such nodes.
    """
    return str(partition_id) if partition_id >= 0 else f"node-{node_id}"


def client_sort_key(key: str) -> tuple[int, int, str]:
    """Order client keys with partition ids first, numerically, then node keys."""
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


def existing_run_files(out_dir: Path) -> list[str]:
    """Return the run files (events and summary) in ``out_dir``, which a new run there would overwrite."""
    return [name for name in (EVENTS_FILE, SUMMARY_FILE) if (Path(out_dir) / name).exists()]


class RunRecorder:
    """Write one run's directory as the run goes."""

    def __init__(self, out_dir: Path, run_config: dict[str, Any]) -> None:
        self.out_dir = Path(out_dir).resolve()
        existing = existing_run_files(self.out_dir)
        if existing:
            raise FileExistsError(
                f"Run directory {self.out_dir} already contains a run ({', '.join(existing)}); "
                "choose another out-dir so that its results are kept."
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.run_config = dict(run_config)
        self.started = time.time()
        self.rounds: list[dict[str, Any]] = []
        self.last_clients: dict[str, dict[str, Any]] = {}
        self.first_rejection = ""
        self.finished = False

        (self.out_dir / "config.toml").write_text(tomli_w.dumps(self.run_config), encoding="utf-8")
        self._events = open(self.out_dir / EVENTS_FILE, "w", encoding="utf-8")
        started = events_pb2.RunStarted(
            experiment=str(run_config["experiment"]),
            strategy=str(run_config["strategy"]),
            num_rounds=int(run_config["num-server-rounds"]),
            config={key: toml_literal(value) for key, value in run_config.items()},
        )
        self._write(events_pb2.RunEvent(round=0, run_started=started))
        logger.info("Run directory: %s", self.out_dir)

    def _write(self, event: events_pb2.RunEvent) -> None:
        event.timestamp = time.time()
        line = json.dumps(json_format.MessageToDict(event), separators=(",", ":"))
        self._events.write(line + "\n")
        self._events.flush()

    def record_round(
        self,
        server_round: int,
        central: dict[str, float],
        report: RoundReport | None,
        extension_values: dict[str, float] | None = None,
    ) -> None:
        """Write the events of one round and log a one-line summary of it."""
        report = report or RoundReport(server_round)
        for record in report.client_results:
            self._write(
                events_pb2.RunEvent(
                    round=server_round,
                    client_result=events_pb2.ClientResult(
                        phase=record.phase,
                        node_id=record.node_id,
                        partition_id=record.partition_id,
                        num_examples=record.num_examples,
                        metrics=record.metrics,
                    ),
                )
            )
            client = self.last_clients.setdefault(client_key(record.partition_id, record.node_id), {})
            client[f"{record.phase}-num-examples"] = record.num_examples
            client.update(record.metrics)
        for rejection in report.rejections:
            self._write(
                events_pb2.RunEvent(
                    round=server_round,
                    rejected_reply=events_pb2.RejectedReply(
                        phase=rejection.phase,
                        node_id=rejection.node_id,
                        partition_id=rejection.partition_id,
                        reason=rejection.reason,
                    ),
                )
            )
            if not self.first_rejection:
                self.first_rejection = (
                    f"round {server_round}, {rejection.phase} reply of node {rejection.node_id} "
                    f"(partition {rejection.partition_id}): {rejection.reason}"
                )

        elapsed = time.time() - self.started
        metrics = events_pb2.RoundMetrics(
            train=_weighted_means(report.client_results, "train"),
            evaluate=_weighted_means(report.client_results, "evaluate"),
            central=central,
            accepted_replies=report.accepted_train_replies,
            rejected_replies=len(report.rejections),
            kept_previous_model=report.kept_previous_model,
            elapsed_seconds=elapsed,
            strategy=report.strategy_values,
            bytes_sent=report.bytes_sent,
            bytes_received=report.bytes_received,
            extensions=extension_values or {},
        )
        self._write(events_pb2.RunEvent(round=server_round, round_metrics=metrics))
        self.rounds.append(
            {
                "round": server_round,
                "central": dict(central),
                "train": dict(metrics.train),
                "evaluate": dict(metrics.evaluate),
                "accepted": report.accepted_train_replies,
                "rejected": len(report.rejections),
                "kept_previous_model": report.kept_previous_model,
                "bytes_sent": report.bytes_sent,
                "bytes_received": report.bytes_received,
                "strategy": dict(report.strategy_values),
                "extensions": dict(extension_values or {}),
                "elapsed_seconds": elapsed,
            }
        )
        logger.info(
            "Round %d/%d: central accuracy %.4f, loss %.4f; %d replies accepted, %d rejected (%.1f s)",
            server_round,
            self.run_config["num-server-rounds"],
            central.get("accuracy", math.nan),
            central.get("loss", math.nan),
            report.accepted_train_replies,
            len(report.rejections),
            elapsed,
        )

    def save_checkpoint(self, server_round: int, state_dict: dict[str, torch.Tensor], strategy_state: dict[str, Any]) -> None:
        """Overwrite ``checkpoint.pt`` with the model and strategy state after ``server_round``."""
        path = self.out_dir / "checkpoint.pt"
        torch.save({"round": server_round, "model": state_dict, "strategy": strategy_state}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)

    def finish(self, state_dict: dict[str, torch.Tensor], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the final model, the summary and the plots; return the summary."""
        torch.save(state_dict, self.out_dir / "final_model.pt")
        summary = self._summary("completed", "")
        summary.update(extra or {})
        self._write_summary(summary)
        self._write(events_pb2.RunEvent(run_finished=events_pb2.RunFinished(status="completed", elapsed_seconds=summary["elapsed_seconds"])))
        self._close()

        from server.plots import plot_run  # matplotlib is imported only when plotting

        try:
            plot_run(self.out_dir, summary)
        except Exception:  # A broken plot must not turn a finished run into a failed one.
            logger.exception("Plotting the run in %s failed", self.out_dir)
        return summary

    def fail(self, reason: str, status: str = "failed") -> None:
        """Record that the run ended unfinished, with ``status`` ("failed" or "stopped") and the reason, in the events and the summary."""
        if self.finished:
            return
        summary = self._summary(status, reason)
        self._write_summary(summary)
        self._write(events_pb2.RunEvent(run_finished=events_pb2.RunFinished(status=status, reason=reason, elapsed_seconds=summary["elapsed_seconds"])))
        self._close()

    def _summary(self, status: str, reason: str) -> dict[str, Any]:
        final = self.rounds[-1]["central"] if self.rounds else {}
        return {
            "experiment": self.run_config["experiment"],
            "strategy": self.run_config["strategy"],
            "status": status,
            "reason": reason,
            "rounds": len([entry for entry in self.rounds if entry["round"] > 0]),
            "final": final,
            "clients": {key: self.last_clients[key] for key in sorted(self.last_clients, key=client_sort_key)},
            "communication": {
                "bytes_sent": sum(entry["bytes_sent"] for entry in self.rounds),
                "bytes_received": sum(entry["bytes_received"] for entry in self.rounds),
            },
            "history": self.rounds,
            "elapsed_seconds": time.time() - self.started,
            "run_dir": str(self.out_dir),
        }

    def _write_summary(self, summary: dict[str, Any]) -> None:
        (self.out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    def _close(self) -> None:
        self.finished = True
        self._events.close()
