"""Wall time and peak memory of one seeded experiment on each engine, and on a plain loop.

Usage (from the repository root, with the project installed):

    python benchmarks/engines.py mnist-fedavg digits-fedavg --set num-server-rounds=3

Each measurement runs in a fresh Python process. Peak memory is the largest sum
of the resident set sizes of that process and all its descendants (Ray starts
several), sampled from /proc every 0.1 s. The plain loop is the floor: the same
partitions, models, data order, local training, aggregation and evaluations,
written as ordinary PyTorch with no Flower. Results are printed as a Markdown
table and saved to benchmarks/results/engines-<experiment>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("plain", "inprocess", "ray")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(children.get(current, []))
    return found


def _tree_rss_bytes(pid: int) -> int:
    total = 0
    for process in _descendants(pid):
        try:
            with open(f"/proc/{process}/statm", encoding="ascii") as statm:
                total += int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


def measure(mode: str, experiment: str, overrides: list[str], threads: int = 0) -> dict:
    """Run one mode in a child process; return its wall time, peak memory and result.

    ``threads`` > 0 limits torch's intra-op threads in the child (OMP_NUM_THREADS).
    """
    with tempfile.TemporaryDirectory() as scratch:
        result_file = Path(scratch) / "result.json"
        command = [sys.executable, __file__, "--child", mode, experiment, "--result", str(result_file), "--out", str(Path(scratch) / "run")]
        for override in overrides:
            command += ["--set", override]
        started = time.perf_counter()
        environment = dict(os.environ)
        if threads > 0:
            environment["OMP_NUM_THREADS"] = str(threads)
            environment["MKL_NUM_THREADS"] = str(threads)
        process = subprocess.Popen(command, cwd=ROOT, env=environment)
        peak = 0
        while process.poll() is None:
            peak = max(peak, _tree_rss_bytes(process.pid))
            time.sleep(0.1)
        wall = time.perf_counter() - started
        if process.returncode != 0:
            raise RuntimeError(f"{mode} run of {experiment} failed with exit code {process.returncode}")
        outcome = json.loads(result_file.read_text())
    return {"mode": mode, "wall_seconds": wall, "peak_rss_mib": peak / 2**20, **outcome}


def _run_plain(run_config: dict) -> dict:
    """Train and evaluate like the federated run, as one plain PyTorch loop."""
    import torch
    from torch.nn import functional as F

    from client.models import build_model
    from client.training import client_generator
    from simulations.datasets import load_dataset
    from simulations.partition import make_partitions

    dataset = load_dataset(str(run_config["dataset"]))
    splits = make_partitions(
        dataset, str(run_config["partition"]), int(run_config["num-clients"]), int(run_config["seed"]),
        alpha=float(run_config["alpha"]), classes_per_client=int(run_config["classes-per-client"]),
    )
    clients = [
        (
            torch.from_numpy(dataset.train_x[train]), torch.from_numpy(dataset.train_y[train]),
            torch.from_numpy(dataset.test_x[test]), torch.from_numpy(dataset.test_y[test]),
        )
        for train, test in zip(splits.train, splits.test)
    ]
    test_x, test_y = torch.from_numpy(dataset.test_x.copy()), torch.from_numpy(dataset.test_y.copy())
    seed, batch_size, epochs = int(run_config["seed"]), int(run_config["batch-size"]), int(run_config["local-epochs"])
    global_model = build_model(str(run_config["model"]), dataset.input_shape, dataset.num_classes, seed=seed)
    local_model = build_model(str(run_config["model"]), dataset.input_shape, dataset.num_classes)

    def evaluate(model, inputs, labels):
        model.eval()
        with torch.no_grad():
            logits = model(inputs)
            return float(F.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())

    evaluate(global_model, test_x, test_y)
    for server_round in range(1, int(run_config["num-server-rounds"]) + 1):
        total = sum(len(labels) for _, labels, _, _ in clients)
        average = {key: torch.zeros_like(value, dtype=torch.float32) for key, value in global_model.state_dict().items()}
        for partition, (inputs, labels, _, _) in enumerate(clients):
            local_model.load_state_dict(global_model.state_dict())
            local_model.train()
            optimizer = torch.optim.SGD(local_model.parameters(), lr=float(run_config["lr"]), momentum=float(run_config["momentum"]))
            generator = client_generator(seed, partition, server_round)
            for _ in range(epochs):
                order = torch.randperm(len(labels), generator=generator)
                for start in range(0, len(labels), batch_size):
                    batch = order[start : start + batch_size]
                    optimizer.zero_grad()
                    F.cross_entropy(local_model(inputs[batch]), labels[batch]).backward()
                    optimizer.step()
            for key, value in local_model.state_dict().items():
                average[key] += value * (len(labels) / total)
        global_model.load_state_dict(average)
        for _, _, client_x, client_y in clients:
            evaluate(global_model, client_x, client_y)
        loss, accuracy = evaluate(global_model, test_x, test_y)
    return {"accuracy": accuracy, "loss": loss}


def _child(mode: str, experiment: str, overrides: list[str], out: str, result_path: str) -> None:
    sys.path.insert(0, str(ROOT))
    import logging

    from flwr.common.logger import FLOWER_LOGGER

    FLOWER_LOGGER.setLevel(logging.WARNING)
    from simulations.experiments import parse_override, resolve_run_config

    run_config = resolve_run_config(experiment, dict(parse_override(item) for item in overrides))
    run_config["out-dir"] = out
    if mode == "plain":
        outcome = _run_plain(run_config)
    elif mode == "inprocess":
        from simulations.inprocess import run_inprocess

        outcome = run_inprocess(run_config)["final"]
    else:
        from simulations.ray_engine import run_with_ray

        run_with_ray(run_config, ROOT)
        outcome = json.loads((Path(out) / "summary.json").read_text())["final"]
    Path(result_path).write_text(json.dumps({"accuracy": outcome["accuracy"], "loss": outcome["loss"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of plain,inprocess,ray")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        _child(args.child, args.experiments[0], args.set, args.out, args.result)
        return

    results_dir = ROOT / "benchmarks" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, load average {load:.2f}, threads {args.threads or 'default'}")
    print("| experiment | engine | wall time (s) | peak memory (MiB) | final accuracy | ratio to plain loop |")
    print("| --- | --- | --- | --- | --- | --- |")
    for experiment in args.experiments:
        rows = [measure(mode, experiment, args.set, args.threads) for mode in args.modes.split(",")]
        floor = next((row["wall_seconds"] for row in rows if row["mode"] == "plain"), None)
        for row in rows:
            ratio = f"{row['wall_seconds'] / floor:.2f}" if floor else "-"
            print(f"| {experiment} | {row['mode']} | {row['wall_seconds']:.1f} | {row['peak_rss_mib']:.0f} | {row['accuracy']:.4f} | {ratio} |", flush=True)
        (results_dir / f"engines-{experiment}.json").write_text(json.dumps({"overrides": args.set, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
