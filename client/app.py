"""Corolla's ClientApp: local training and evaluation on a node's data.

A training message carries the global model under ``arrays`` and a ConfigRecord
under ``config`` with ``server-round`` and the strategy's values (FedProx's
``proximal-mu``, or ``report-initial-loss`` for strategies that weight clients
by their loss at the global model). A reply carries the trained model under
``arrays``, a MetricRecord under ``metrics`` and the node's ``partition-id`` in a
ConfigRecord under ``client``.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.models import build_run_model
from client.node_data import NodeData, load_node_data
from client.regularizers import prepare_client_method, save_client_method_state
from client.training import TrainSettings, client_generator, evaluate_model, train_locally

logger = logging.getLogger(__name__)

app = ClientApp()


def _prepare(message: Message, context: Context) -> tuple[NodeData, torch.nn.Module]:
    threads = int(context.run_config["client-threads"])
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    data = load_node_data(context.run_config, context.node_config)
    model = build_run_model(context.run_config, data.input_shape, data.num_classes)
    state = message.content["arrays"].to_torch_state_dict()
    model.load_state_dict(state, strict=True)
    return data, model


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the received model on the node's training split and send it back."""
    data, model = _prepare(message, context)
    config = message.content["config"]
    server_round = int(config["server-round"])
    run_config = context.run_config

    metrics = {}
    if bool(config.get("report-initial-loss", False)):
        initial_loss, _ = evaluate_model(model, data.train_x, data.train_y, int(run_config["eval-batch-size"]))
        metrics["initial-loss"] = initial_loss

    # FedGTST and FedIIR measure gradient statistics at the received model; FedSR's and their
    # penalties are added to every minibatch loss.
    statistics, regularizer = prepare_client_method(config, run_config, model, data, context.state, server_round)
    metrics.update(statistics)

    settings = TrainSettings.from_run_config(run_config, proximal_mu=float(config.get("proximal-mu", 0.0)))
    generator = client_generator(int(run_config["seed"]), data.partition_id, server_round)
    result = train_locally(model, data.train_x, data.train_y, settings, generator, regularizer=regularizer)
    save_client_method_state(regularizer, context.state)
    logger.debug("Partition %d trained %d steps, loss %.4f", data.partition_id, result.steps, result.mean_loss)

    metrics["num-examples"] = len(data.train_y)
    metrics["train-loss"] = result.mean_loss
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(metrics),
            "client": ConfigRecord({"partition-id": data.partition_id}),
        }
    )
    return Message(content=content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the received model on the node's test split."""
    data, model = _prepare(message, context)
    loss, accuracy = evaluate_model(model, data.test_x, data.test_y, int(context.run_config["eval-batch-size"]))
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": len(data.test_y), "eval-loss": loss, "eval-accuracy": accuracy}),
            "client": ConfigRecord({"partition-id": data.partition_id}),
        }
    )
    return Message(content=content, reply_to=message)
