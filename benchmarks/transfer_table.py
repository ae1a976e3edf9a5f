"""Run a transfer experiment for several strategies and seeds in-process, and tabulate the results.

    python benchmarks/transfer_table.py transfer-mnist-mnistm \\
        --strategies fedavg,fedsr,fediir,fedgtst --seeds 0,1,2 --out runs/transfer-table/mnistm

Each (strategy, seed) run goes to ``OUT/<label>/seed-<seed>``; a finished run with the same
configuration is reused, so an interrupted table resumes. A strategy may carry its own
overrides, as in ``fedgtst:fedgtst-xi=0.003``. The script writes ``OUT/transfer.md`` (mean ±
sample standard deviation over seeds of the target and source accuracy, the references, the
bytes per round and the CPU time per run) and ``OUT/transfer.json`` (every run's values).
``corolla sweep`` runs strategies over seeds too, but it tabulates fairness metrics only.

Torch runs on one thread, so the CPU seconds are the cost of a run on one core.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simulations.experiments import parse_override, resolve_run_config
from simulations.inprocess import run_inprocess

logger = logging.getLogger(__name__)

ACCURACIES = ("target_accuracy", "source_accuracy", "random_features_accuracy", "target_only_accuracy")


@dataclass(frozen=True)
class Entry:
    """One row of the table: a strategy with its own run-config overrides."""

    label: str
    strategy: str
    overrides: dict[str, Any]


def parse_entry(text: str) -> Entry:
    """Parse ``STRATEGY[:KEY=VALUE...]``, for example ``fedgtst:fedgtst-xi=0.003``."""
    strategy, *pairs = (part.strip() for part in text.split(":"))
    overrides = dict(parse_override(pair) for pair in pairs if pair)
    label = strategy if not overrides else f"{strategy}[{','.join(f'{key}={value}' for key, value in overrides.items())}]"
    return Entry(label, strategy, overrides)


def finished_run(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """Return the summary of a completed transfer run in ``run_dir`` with this configuration, or None."""
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.toml"
    if not summary_path.is_file() or not config_path.is_file():
        return None
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    if summary.get("status") != "completed" or "transfer" not in summary:
        return None
    if tomllib.loads(config_path.read_text(encoding="utf-8")) != config:
        raise SystemExit(f"{run_dir} contains a finished run with another configuration; choose another --out or remove that directory.")
    return summary


def run_table(
    experiment: str, entries: list[Entry], seeds: list[int], overrides: dict[str, Any], out_dir: Path
) -> list[dict[str, Any]]:
    """Run (or reuse) every entry with every seed and return one record per run."""
    records = []
    for entry in entries:
        for seed in seeds:
            run_dir = (out_dir / entry.label / f"seed-{seed}").resolve()
            values = {**overrides, **entry.overrides, "strategy": entry.strategy, "seed": seed, "out-dir": str(run_dir)}
            config = resolve_run_config(experiment, values)
            summary = finished_run(run_dir, config)
            cpu_seconds = None
            if summary is None:
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                print(f"running {entry.label} seed {seed} -> {run_dir}", flush=True)
                started = time.process_time()
                summary = run_inprocess(config)
                cpu_seconds = time.process_time() - started
                (run_dir / "cpu_seconds.txt").write_text(f"{cpu_seconds:.1f}\n", encoding="utf-8")
            elif (run_dir / "cpu_seconds.txt").is_file():
                cpu_seconds = float((run_dir / "cpu_seconds.txt").read_text(encoding="utf-8"))

            rounds = max(int(summary["rounds"]), 1)
            communication = summary["communication"]
            transfer = summary["transfer"]
            records.append(
                {
                    "label": entry.label,
                    "seed": seed,
                    "run_dir": str(run_dir),
                    **{key: float(transfer[key]) for key in ACCURACIES},
                    "best_round": int(transfer["best_round"]),
                    "bytes_per_round": (communication["bytes_sent"] + communication["bytes_received"]) / rounds,
                    "statistic_bytes_per_round": statistic_bytes_per_round(summary),
                    "cpu_seconds": cpu_seconds,
                    "wall_seconds": float(summary["elapsed_seconds"]),
                }
            )
            print(
                f"{entry.label} seed {seed}: target {transfer['target_accuracy']:.4f}, source {transfer['source_accuracy']:.4f}",
                flush=True,
            )
    return records


def statistic_bytes_per_round(summary: dict[str, Any]) -> float:
    """Return the mean over rounds of the strategy's own protocol bytes (0 for plain FedAvg)."""
    rounds = [entry for entry in summary["history"] if entry["round"] > 0]
    total = sum(entry["strategy"].get("statistic-bytes-sent", 0.0) + entry["strategy"].get("statistic-bytes-received", 0.0) for entry in rounds)
    return total / max(len(rounds), 1)


def mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """Format ``mean ± sample standard deviation`` of the scaled values."""
    array = scale * np.asarray(values, dtype=np.float64)
    spread = array.std(ddof=1) if array.size > 1 else 0.0
    return f"{array.mean():.{digits}f} ± {spread:.{digits}f}"


def paired_difference(runs: list[dict[str, Any]], baseline: dict[int, float]) -> str:
    """Format the mean ± std over seeds of a run's target accuracy minus the baseline's on the same seed."""
    differences = [run["target_accuracy"] - baseline[run["seed"]] for run in runs if run["seed"] in baseline]
    return mean_std(differences) if differences else ""


def format_table(records: list[dict[str, Any]], baseline_label: str = "fedavg") -> str:
    """Render the records as Markdown: one row per method, then the two references.

    The column "vs fedavg" is the difference of target accuracy to FedAvg on the same seed,
    which removes the part of the spread that the seed (partition, initialization) causes.
    """
    lines = [
        f"| method | seeds | target accuracy (%) | vs {baseline_label} (points) | source accuracy (%) | kept round | "
        "bytes per round | protocol bytes per round | CPU s per run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    baseline = {record["seed"]: record["target_accuracy"] for record in records if record["label"] == baseline_label}
    labels = list(dict.fromkeys(record["label"] for record in records))
    for label in labels:
        runs = [record for record in records if record["label"] == label]
        cpu = [run["cpu_seconds"] for run in runs if run["cpu_seconds"] is not None]
        lines.append(
            f"| {label} | {len(runs)} | {mean_std([run['target_accuracy'] for run in runs])} | "
            f"{paired_difference(runs, baseline) if label != baseline_label else ''} | "
            f"{mean_std([run['source_accuracy'] for run in runs])} | "
            f"{np.mean([run['best_round'] for run in runs]):.1f} | {np.mean([run['bytes_per_round'] for run in runs]):,.0f} | "
            f"{np.mean([run['statistic_bytes_per_round'] for run in runs]):,.0f} | {np.mean(cpu) if cpu else float('nan'):.0f} |"
        )
    by_seed = {record["seed"]: record for record in records}
    for key, name in (("random_features_accuracy", "random features (probe)"), ("target_only_accuracy", "target only")):
        references = list(by_seed.values())
        lines.append(
            f"| {name} | {len(references)} | {mean_std([record[key] for record in references])} | "
            f"{paired_difference([{**record, 'target_accuracy': record[key]} for record in references], baseline)} | | | | | |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", help="a transfer experiment, such as transfer-mnist-mnistm")
    parser.add_argument("--strategies", default="fedavg,fedsr,fediir,fedgtst", help="comma-separated STRATEGY[:KEY=VALUE...] entries")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override for every run")
    parser.add_argument("--out", required=True, help="directory of the runs and the table")
    args = parser.parse_args(argv)

    from flwr.common.logger import FLOWER_LOGGER

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Flower's logger prints every round at INFO through its own handler; keep warnings only, once.
    FLOWER_LOGGER.setLevel(logging.WARNING)
    FLOWER_LOGGER.propagate = False
    torch.set_num_threads(1)
    entries = [parse_entry(text) for text in args.strategies.split(",") if text.strip()]
    seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    overrides = dict(parse_override(pair) for pair in args.set)
    out_dir = Path(args.out)

    records = run_table(args.experiment, entries, seeds, overrides, out_dir)
    command = " ".join(["python", "benchmarks/transfer_table.py", *(argv if argv is not None else sys.argv[1:])])
    table = format_table(records)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "transfer.md").write_text(f"Command: `{command}`\n\n{table}\n", encoding="utf-8")
    (out_dir / "transfer.json").write_text(json.dumps({"command": command, "runs": records}, indent=2) + "\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
