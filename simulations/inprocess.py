"""In-process simulation engine: the ServerApp and N ClientApps in one Python process.

``InProcessGrid`` implements Flower's ``Grid`` by calling the ClientApp directly
for each message. Messages still cross a serialization boundary (Flower's
protobuf form, as on the wire), so a ClientApp never shares objects with the
server and the transported bytes are counted. Flower's Ray engine costs about
10 s of start-up and orchestration on two cores, which this engine avoids.
``tests/test_engines.py`` checks that both give the same results for one seed.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

logger = logging.getLogger(__name__)

SERVER_NODE_ID = 1
# Flower's error code for an exception raised inside a ClientApp.
CLIENT_APP_RAISED_EXCEPTION = 1


def _transport(message: Message) -> tuple[Message, int]:
    """Return a copy of ``message`` made through its wire form, and the wire size in bytes."""
    payload = message_to_proto(message).SerializeToString()
    proto = ProtoMessage()
    proto.ParseFromString(payload)
    return message_from_proto(proto), len(payload)


class InProcessGrid(Grid):
    """A ``Grid`` whose nodes are ClientApp calls in this process.

    Node ``i`` gets the node config ``partition-id = i`` and
    ``num-partitions = N``, as Flower's simulation engine gives its nodes.
    """

    def __init__(self, client_app: ClientApp, run_config: dict[str, Any], num_nodes: int, run_id: int = 1) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes = {num_nodes}: an in-process simulation needs at least one node.")
        self.client_app = client_app
        node_ids = random.Random(f"corolla-nodes-{run_id}").sample(range(2, 2**53), num_nodes)
        self.contexts: dict[int, Context] = {
            node_id: Context(
                run_id=run_id,
                node_id=node_id,
                node_config={"partition-id": index, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for index, node_id in enumerate(node_ids)
        }
        self._run = Run.create_empty(run_id)
        self._pending: dict[str, Message] = {}
        self.bytes_sent = 0
        self.bytes_received = 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        message_ids = []
        for message in messages:
            if message.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"Message addressed to unknown node {message.metadata.dst_node_id}.")
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            self._pending[message_id] = message
            message_ids.append(message_id)
        return message_ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for message_id in message_ids:
            message = self._pending.pop(message_id, None)
            if message is not None:
                replies.append(self._deliver(message))
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, message: Message) -> Message:
        """Run the ClientApp of the message's destination node and return its reply."""
        received, size = _transport(message)
        self.bytes_sent += size
        node_id = received.metadata.dst_node_id
        TaskIdentity.node_id = node_id
        try:
            reply = self.client_app(received, self.contexts[node_id])
        except Exception as error:  # A failing client is a rejected reply, as under Flower's engines.
            logger.exception("ClientApp on node %d raised", node_id)
            reply = Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(error).__name__}: {error}"), reply_to=received)
        finally:
            TaskIdentity.node_id = SERVER_NODE_ID
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        delivered, size = _transport(reply)
        self.bytes_received += size
        return delivered


def run_inprocess(
    run_config: dict[str, Any],
    server_app: ServerApp | None = None,
    client_app: ClientApp | None = None,
    num_nodes: int | None = None,
) -> dict[str, Any]:
    """Run one experiment in this process and return its ``summary.json`` content.

    ``run_config`` must be resolved and carry an absolute ``out-dir``. The
    ServerApp and ClientApp default to Corolla's own ``server.app.app`` and
    ``client.app.app``, the objects Flower loads from the app's pyproject.toml.
    ``num_nodes`` is the number of simulated nodes, ``num-clients`` by default;
    fewer nodes behave like SuperNodes that never connected.
    """
    if server_app is None:
        from server.app import app as server_app
    if client_app is None:
        from client.app import app as client_app
    out_dir = Path(str(run_config["out-dir"]))
    if not out_dir.is_absolute():
        raise ValueError(f"out-dir = {str(out_dir)!r} must be an absolute path.")

    run_id = 1
    num_nodes = int(run_config["num-clients"]) if num_nodes is None else num_nodes
    grid = InProcessGrid(client_app, run_config, num_nodes, run_id=run_id)
    context = Context(run_id=run_id, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(), run_config=dict(run_config))
    previous = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SERVER_NODE_ID
    started = time.perf_counter()
    try:
        server_app(grid, context)
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = previous
    logger.info(
        "In-process run finished in %.1f s; %d bytes sent to clients, %d bytes received",
        time.perf_counter() - started,
        grid.bytes_sent,
        grid.bytes_received,
    )
    return json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
