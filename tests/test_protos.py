"""The corolla.v1 event schema: the committed module is current and events parse back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf import json_format

from protos.corolla.v1 import events_pb2

ROOT = Path(__file__).resolve().parent.parent


def test_generated_module_is_current(tmp_path: Path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", f"--python_out={tmp_path}", "protos/corolla/v1/events.proto"],
        cwd=ROOT,
        check=True,
    )
    regenerated = (tmp_path / "corolla" / "v1" / "events_pb2.py").read_text()
    committed = (ROOT / "protos" / "corolla" / "v1" / "events_pb2.py").read_text()
    assert regenerated == committed, "protos/corolla/v1/events_pb2.py is stale; regenerate it with the command in events.proto"


def test_event_json_round_trip():
    event = events_pb2.RunEvent(
        round=3,
        rejected_reply=events_pb2.RejectedReply(phase="train", node_id=2**60, partition_id=4, reason="array 'w' has 1 non-finite values"),
    )
    line = json_format.MessageToJson(event, indent=None)
    parsed = json_format.Parse(line, events_pb2.RunEvent())
    assert parsed == event
    assert '"rejectedReply"' in line
