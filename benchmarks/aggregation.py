"""Server-side cost of one round's aggregation for each fairness strategy.

Usage (from the repository root, with the project installed):

    python benchmarks/aggregation.py --clients 10,1000 --write docs/benchmarks.md

Replies are built directly (``simulations.synthetic_replies``) for the 784-200-10 MLP
(159,010 parameters): each client's model is the global model plus Gaussian noise, with a
random value in [0.1, 1.1) for each metric the strategy expects (``train-loss``,
``initial-loss``). Every strategy runs ``--rounds`` consecutive rounds
from ``configure_train`` to ``aggregate_train`` (so the adaptive conversion accumulates
iterates as in a run), and the time of ``aggregate_train`` plus ``output_arrays`` (the converted
model, which the fairness extension evaluates every round) is recorded per round. The
replies are rebuilt before every round, outside the timing, because Flower's ``QFedAvg`` consumes
the arrays of the replies it aggregates. The time includes Corolla's reply validation and
the deserialization of the client models, which every strategy pays; FedAvg's row is that
shared floor. With ``--write``, the table replaces its own section of the Markdown file (or is
appended), leaving the file's other sections as they are.
"""

from __future__ import annotations

import os

# One BLAS and one torch thread, set before numpy loads: on a shared machine a second
# spinning thread made numpy's dot products slower, not faster.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client.models import build_model  # noqa: E402
from markdown_section import machine_description, publish_section  # noqa: E402
from simulations.experiments import resolve_run_config  # noqa: E402
from simulations.inprocess import InProcessGrid  # noqa: E402
from simulations.synthetic_replies import make_train_reply, task_identity  # noqa: E402
from strategies import build_strategy  # noqa: E402

SECTION_TITLE = "## Server-side aggregation cost of the fairness strategies"
# Label -> run-config overrides of the strategy measured.
STRATEGY_CASES = {
    "fedavg": {"strategy": "fedavg"},
    "qfedavg (Flower)": {"strategy": "qfedavg", "q": 1.0},
    "qffl": {"strategy": "qffl", "q": 1.0},
    "omd-tch (entropic)": {"strategy": "omd-tch", "omd-step": "entropic"},
    "omd-tch (euclidean)": {"strategy": "omd-tch", "omd-step": "euclidean"},
    "adaomd-tch (entropic)": {"strategy": "adaomd-tch", "omd-step": "entropic"},
    "afl": {"strategy": "afl"},
    "tch": {"strategy": "tch"},
    "stch": {"strategy": "stch"},
    "fedmgda": {"strategy": "fedmgda"},
}
# Strategies measured only up to a client count, and why.
CLIENT_LIMITS = {
    "qfedavg (Flower)": (
        100,
        "Flower 1.42's QFedAvg converts each reply with ArrayRecord.to_numpy_ndarrays(keep_input=False), "
        "which runs gc.collect() once per reply; those calls dominate its time",
    ),
}


def client_replies(global_model: dict[str, np.ndarray], metric_keys: frozenset[str], num_clients: int, generator: np.random.Generator) -> list:
    """Return one reply per client: the global model plus noise, and a random value in [0.1, 1.1) per metric key."""
    replies = []
    for client in range(num_clients):
        model = {key: (value + 0.01 * generator.standard_normal(value.shape)).astype(value.dtype) for key, value in global_model.items()}
        metrics = {"num-examples": 100, **{key: float(0.1 + generator.random()) for key in sorted(metric_keys)}}
        replies.append(make_train_reply(model, metrics, client, 10_000 + client))
    return replies


def measure(label: str, overrides: dict, num_clients: int, rounds: int) -> dict:
    """Return the per-round times (seconds) of ``aggregate_train`` and ``output_arrays`` of one strategy."""
    config = resolve_run_config(None, {**overrides, "num-clients": num_clients, "fraction-evaluate": 0.0})
    strategy = build_strategy(config)
    network = build_model("mlp", (1, 28, 28), 10, seed=0)
    global_model = {key: value.numpy().copy() for key, value in network.state_dict().items()}
    generator = np.random.default_rng(0)
    times = []
    with task_identity():
        grid = InProcessGrid(ClientApp(), config, num_clients)
        for server_round in range(1, rounds + 1):
            list(strategy.configure_train(server_round, ArrayRecord(network.state_dict()), ConfigRecord(), grid))
            replies = client_replies(global_model, strategy.train_metric_keys, num_clients, generator)
            gc.collect()
            started = time.perf_counter()
            arrays, _ = strategy.aggregate_train(server_round, replies)
            if arrays is not None:
                # The fairness extension evaluates the converted model every round.
                strategy.output_arrays(arrays)
            times.append(time.perf_counter() - started)
            del replies
            if arrays is None:
                raise RuntimeError(f"{label}: every reply was rejected; {strategy.report(server_round).rejections[:1]}")
    kept = getattr(getattr(strategy.state, "adaptive", None), "iterates", None)
    return {"label": label, "clients": num_clients, "times": times, "kept_iterates": None if kept is None else len(kept)}


def format_section(results: list[dict], client_counts: list[int], rounds: dict[int, int], command: str) -> str:
    header = "| strategy | " + " | ".join(f"{count} clients (ms per round)" for count in client_counts) + " |"
    lines = [SECTION_TITLE, "", f"Command: `{command}`", "", header, "| --- |" + " --- |" * len(client_counts)]
    for label in STRATEGY_CASES:
        cells = []
        for count in client_counts:
            result = next((item for item in results if item["label"] == label and item["clients"] == count), None)
            if result is None:
                cells.append("not measured (see below)")
                continue
            cell = f"{1000 * statistics.median(result['times']):.1f}"
            if result["kept_iterates"] is not None:
                cell += f" ({result['kept_iterates']} iterates kept)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    rounds_text = ", ".join(f"{rounds[count]} rounds for {count} clients" for count in client_counts)
    lines += [
        "",
        f"Median time of `aggregate_train` plus `output_arrays` (the converted model) over consecutive rounds ({rounds_text}) on the 784-200-10 MLP "
        "(159,010 float32 parameters), replies built in memory, one BLAS and one torch thread. FedAvg's row is the cost every strategy shares "
        "(validating the replies, counting their bytes, deserializing the models); the other rows add each "
        "strategy's own arithmetic. The adaptive conversion's cost grows with the iterates it keeps; with random "
        "client losses few iterates dominate one another, which is the worst case for its memory.",
        *(
            f"\n{label} is measured up to {limit} clients: {reason}."
            for label, (limit, reason) in CLIENT_LIMITS.items()
            if any(count > limit for count in client_counts)
        ),
        "",
        "Machine (`lscpu | head`):",
        "",
        machine_description(f"torch {torch.__version__}, numpy {np.__version__}"),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,1000", help="comma-separated client counts (default: 10,1000)")
    parser.add_argument("--rounds", default="10:20,1000:3", help="rounds per client count, COUNT:ROUNDS pairs (default: 10:20,1000:3)")
    parser.add_argument("--write", help="Markdown file whose aggregation section is replaced (created if absent)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)

    client_counts = [int(count) for count in args.clients.split(",")]
    rounds = {int(count): int(value) for count, value in (pair.split(":") for pair in args.rounds.split(","))}
    results = []
    for count in client_counts:
        for label, overrides in STRATEGY_CASES.items():
            if count > CLIENT_LIMITS.get(label, (count, ""))[0]:
                continue
            result = measure(label, overrides, count, rounds.get(count, 3))
            results.append(result)
            print(f"{label:<24} {count:>5} clients: {1000 * statistics.median(result['times']):9.1f} ms per round", flush=True)

    command = "python benchmarks/aggregation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = format_section(results, client_counts, rounds, command.strip())
    print()
    publish_section(section, SECTION_TITLE, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
