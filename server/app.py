"""Corolla's ServerApp: builds the strategy from the run config and runs it.

The same ``app`` object runs under the in-process engine, Flower's simulation
engine (Ray) and a deployed SuperLink. Results go to the absolute directory in
the run-config key ``out-dir`` because the ServerApp's working directory is
wherever the SuperLink started.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from client.models import build_run_model
from client.training import evaluate_model
from server.extensions import RunExtension, build_extensions
from server.results import RunRecorder, default_run_directory
from simulations.datasets import Dataset, load_dataset
from simulations.experiments import resolve_run_config
from strategies import ValidatedStrategy, build_strategy

logger = logging.getLogger(__name__)

app = ServerApp()


class CentralEvaluation:
    """Evaluate the global model on the server's test set and close each round.

    Flower's ``Strategy.start`` calls this after a round's training and federated
    evaluation, so it is also where the round's events and checkpoint are written.
    """

    def __init__(
        self,
        run_config: dict[str, Any],
        dataset: Dataset,
        strategy: ValidatedStrategy,
        recorder: RunRecorder,
        extensions: list[RunExtension],
    ) -> None:
        self.run_config = run_config
        self.strategy = strategy
        self.recorder = recorder
        self.extensions = extensions
        self.model = build_run_model(run_config, dataset.input_shape, dataset.num_classes)
        self.test_x = torch.from_numpy(dataset.test_x.copy())
        self.test_y = torch.from_numpy(dataset.test_y.copy())
        # The global model after the latest round: Flower's Result keeps no model
        # when every round's replies were rejected.
        self.latest_arrays: ArrayRecord | None = None

    def evaluate(self, arrays: ArrayRecord) -> dict[str, float]:
        """Return the central test loss and accuracy of the model in ``arrays``."""
        self.model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        loss, accuracy = evaluate_model(self.model, self.test_x, self.test_y, int(self.run_config["eval-batch-size"]))
        return {"loss": loss, "accuracy": accuracy}

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        self.latest_arrays = arrays
        central = self.evaluate(arrays)
        extension_values: dict[str, float] = {}
        for extension in self.extensions:
            extension_values.update(extension.round_metrics(server_round, arrays, self.strategy))
        self.recorder.record_round(server_round, central, self.strategy.reports.get(server_round), extension_values)
        if server_round > 0:
            self.recorder.save_checkpoint(server_round, arrays.to_torch_state_dict(), self.strategy.state_dict())
        return MetricRecord(central)


class NodeWaitTimeoutError(RuntimeError):
    """Raised when fewer nodes than the run needs stay connected for longer than ``node-wait-timeout``."""


class LimitedWaitGrid:
    """A grid that ends the run when too few nodes stay connected for too long.

    Flower's strategies wait in a loop, without a time limit, until ``min_available_nodes``
    nodes are connected. A SuperNode that exits mid-run therefore leaves the run waiting
    forever. This wrapper counts how long ``get_node_ids`` has returned fewer than
    ``required`` nodes without a break, and raises NodeWaitTimeoutError once that exceeds
    ``timeout`` seconds (0 disables the limit). Everything else goes to the wrapped grid.
    """

    def __init__(self, grid: Grid, required: int, timeout: float) -> None:
        self._grid = grid
        self._required = required
        self._timeout = timeout
        self._short_since: float | None = None

    def get_node_ids(self) -> list[int]:
        node_ids = list(self._grid.get_node_ids())
        if len(node_ids) >= self._required or self._timeout <= 0:
            self._short_since = None
            return node_ids
        now = time.monotonic()
        if self._short_since is None:
            self._short_since = now
            logger.warning(
                "%d of the %d nodes the run needs (num-clients) are connected; waiting up to %g s.",
                len(node_ids),
                self._required,
                self._timeout,
            )
        elif now - self._short_since > self._timeout:
            raise NodeWaitTimeoutError(
                f"Only {len(node_ids)} of the {self._required} nodes the run needs (num-clients) were connected "
                f"for {self._timeout:g} s. Start the missing SuperNodes, lower num-clients, or raise "
                "node-wait-timeout (0 waits forever)."
            )
        return node_ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def run_server(grid: Grid, context: Context) -> dict[str, Any]:
    """Run one experiment on ``grid`` and return its summary."""
    run_config = resolve_run_config(None, dict(context.run_config))
    out_dir = Path(str(run_config["out-dir"])) if run_config["out-dir"] else default_run_directory(str(run_config["experiment"]))
    run_config["out-dir"] = str(out_dir.resolve())
    recorder = RunRecorder(out_dir, run_config)
    try:
        seed = int(run_config["seed"])
        random.seed(seed)
        torch.manual_seed(seed)

        dataset = load_dataset(str(run_config["dataset"]), str(run_config["data-dir"]) or None)
        strategy = build_strategy(run_config)
        extensions = build_extensions(run_config, dataset)
        evaluation = CentralEvaluation(run_config, dataset, strategy, recorder, extensions)
        initial = build_run_model(run_config, dataset.input_shape, dataset.num_classes, seed=seed)
        num_rounds = int(run_config["num-server-rounds"])
        strategy.start(
            grid=LimitedWaitGrid(grid, int(run_config["num-clients"]), float(run_config["node-wait-timeout"])),
            initial_arrays=ArrayRecord(initial.state_dict()),
            num_rounds=num_rounds,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=evaluation,
        )

        if not any(entry["accepted"] for entry in recorder.rounds if entry["round"] > 0):
            raise RuntimeError(
                f"No training reply was accepted in any of the {num_rounds} rounds, so the model never trained. "
                f"First rejection: {recorder.first_rejection or 'none recorded (no node replied)'}."
            )
        last_arrays = evaluation.latest_arrays
        output = strategy.output_arrays(last_arrays)
        extra: dict[str, Any] = {}
        if output is not last_arrays:
            # The strategy delivers a converted model: it is the run's result,
            # and the last iterate is reported beside it.
            extra["final"] = evaluation.evaluate(output)
            extra["last_iterate"] = recorder.rounds[-1]["central"]
        for extension in extensions:
            extra.update(extension.finish(output, last_arrays, strategy))
        return recorder.finish(output.to_torch_state_dict(), extra)
    except (SystemExit, KeyboardInterrupt) as error:
        # Flower's signal handlers turn SIGTERM (as sent by `flwr stop`) and SIGINT into
        # SystemExit, so the run was stopped from outside rather than failed.
        recorder.fail(f"stopped from outside before round {len(recorder.rounds)} finished ({type(error).__name__})", status="stopped")
        raise
    except BaseException as error:
        recorder.fail(f"{type(error).__name__}: {error}")
        raise


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls with the grid of connected nodes and the run context."""
    run_server(grid, context)
