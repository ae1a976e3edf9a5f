"""Progress output of a running experiment: one line per finished round."""

from __future__ import annotations

import sys
import threading
from pathlib import Path


class ProgressDisplay:
    """Print one line per finished round by following a run's ``events.jsonl``.

    Following the event stream works the same for both engines, because the
    ServerApp writes it whichever process it runs in.
    """

    def __init__(self, events_path: Path, num_rounds: int, stream=None) -> None:
        self.events_path = events_path
        self.num_rounds = num_rounds
        self.stream = stream or sys.stdout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> ProgressDisplay:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _follow(self) -> None:
        from google.protobuf import json_format

        from protos.corolla.v1 import events_pb2

        position = 0
        while True:
            stopping = self._stop.is_set()
            if self.events_path.is_file():
                if self.events_path.stat().st_size < position:
                    position = 0  # A shorter file than before was replaced, so read it from the start.
                with open(self.events_path, encoding="utf-8") as stream:
                    stream.seek(position)
                    while line := stream.readline():
                        if not line.endswith("\n"):
                            break
                        position = stream.tell()
                        try:
                            event = json_format.Parse(line, events_pb2.RunEvent())
                        except json_format.ParseError:
                            continue  # Only the display misses this line; the file keeps it.
                        if event.WhichOneof("event") == "round_metrics":
                            self._print_round(event.round, event.round_metrics)
            if stopping:
                return
            self._stop.wait(0.2)

    def _print_round(self, server_round: int, metrics) -> None:
        width = 20
        filled = round(width * server_round / max(self.num_rounds, 1))
        bar = "#" * filled + "-" * (width - filled)
        parts = [f"round {server_round:>3}/{self.num_rounds} [{bar}]"]
        if "accuracy" in metrics.central:
            parts.append(f"accuracy {metrics.central['accuracy']:.4f}  loss {metrics.central['loss']:.4f}")
        if "train-loss" in metrics.train:
            parts.append(f"train loss {metrics.train['train-loss']:.4f}")
        if server_round > 0:
            parts.append(f"{metrics.accepted_replies} accepted, {metrics.rejected_replies} rejected")
        if metrics.kept_previous_model:
            parts.append("kept previous model")
        parts.append(f"{metrics.elapsed_seconds:6.1f} s")
        print("  ".join(parts), file=self.stream, flush=True)
