"""Sweeps: run several strategies over several seeds in-process and compare their fairness metrics.

``corolla sweep EXPERIMENT --strategies fedavg,omd-tch:omd-step=euclidean --seeds 0,1,2``
runs each (entry, seed) pair into ``OUT/<label>/seed-<seed>``, with the ``fairness``
extension switched on, and writes to OUT:

- ``sweep.md``: a Markdown table of mean ± standard deviation over seeds (sample standard
  deviation, ddof = 1) of the average accuracy, the worst-client test loss and the accuracy
  parity, for the model each strategy returns and, where that is a converted model, also for
  its last iterate;
- ``sweep.json``: the per-run values behind the table;
- ``sweep.png``: worst-client loss against average accuracy, and accuracy per client.

A run whose directory already contains a completed ``summary.json`` with the same configuration
is reused, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simulations.experiments import DEFAULTS, ConfigError, Scalar, parse_override, resolve_run_config

logger = logging.getLogger(__name__)

FAIRNESS_EXTENSION = "fairness"
METRICS = ("average_accuracy", "worst_client_loss", "accuracy_parity")


@dataclass(frozen=True)
class SweepEntry:
    """One column of a sweep: a strategy with its own run-config overrides."""

    label: str
    strategy: str
    overrides: dict[str, Scalar] = field(default_factory=dict)


@dataclass
class RunOutcome:
    """The fairness metrics of one finished run."""

    label: str
    seed: int
    run_dir: str
    converted: bool
    returned: dict[str, Any]
    last_iterate: dict[str, Any]
    elapsed_seconds: float


def parse_entry(text: str) -> SweepEntry:
    """Parse ``STRATEGY[:KEY=VALUE...]``, for example ``omd-tch:omd-step=euclidean:eta-lambda=0.03``."""
    from strategies import STRATEGIES

    parts = [part.strip() for part in text.split(":")]
    strategy = parts[0]
    if strategy not in STRATEGIES:
        raise ConfigError(f"Unknown strategy {strategy!r} in sweep entry {text!r}; choose one of: {', '.join(STRATEGIES)}.")
    overrides = dict(parse_override(part) for part in parts[1:] if part)
    if "strategy" in overrides or "seed" in overrides:
        raise ConfigError(f"Sweep entry {text!r} sets strategy or seed; name the strategy first and use --seeds for seeds.")
    label = strategy if not overrides else f"{strategy}[{','.join(f'{key}={value}' for key, value in overrides.items())}]"
    return SweepEntry(label, strategy, overrides)


def parse_seeds(text: str) -> list[int]:
    """Parse a comma-separated list of non-negative integer seeds."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"Invalid --seeds {text!r}: expected comma-separated integers such as 0,1,2.") from None
    if not seeds or any(seed < 0 for seed in seeds):
        raise ConfigError(f"Invalid --seeds {text!r}: give at least one integer >= 0.")
    return seeds


def _with_fairness(extensions: str) -> str:
    names = [name.strip() for name in extensions.split(",") if name.strip()]
    return ",".join(names if FAIRNESS_EXTENSION in names else [*names, FAIRNESS_EXTENSION])


def _same_config(recorded: dict[str, Any], config: dict[str, Any]) -> bool:
    """Return True when a recorded run configuration equals ``config``.

    A key added to Corolla after the run was recorded matches when ``config`` leaves it at
    its default, which is how the older code behaved.
    """
    for key in recorded.keys() | config.keys():
        if key in recorded and key in config:
            if recorded[key] != config[key]:
                return False
        elif key not in config or config[key] != DEFAULTS.get(key):
            return False
    return True


def _finished_summary(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """Return the summary of a completed run in ``run_dir`` with this configuration, or None."""
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.toml"
    if not summary_path.is_file() or not config_path.is_file():
        return None
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    if summary.get("status") != "completed" or "fairness" not in summary:
        return None
    if not _same_config(tomllib.loads(config_path.read_text(encoding="utf-8")), config):
        raise ConfigError(
            f"{run_dir} contains a finished run with another configuration; choose another --out or remove that directory."
        )
    return summary


def run_sweep(
    experiment: str,
    entries: Sequence[SweepEntry],
    seeds: Sequence[int],
    overrides: dict[str, Any],
    out_dir: Path,
    runner: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> list[RunOutcome]:
    """Run every entry with every seed (or reuse finished runs) and return their fairness metrics."""
    if runner is None:
        from simulations.inprocess import run_inprocess as runner
    out_dir = out_dir.resolve()
    outcomes = []
    for entry in entries:
        for seed in seeds:
            run_dir = out_dir / entry.label / f"seed-{seed}"
            values = {**overrides, **entry.overrides, "strategy": entry.strategy, "seed": seed, "out-dir": str(run_dir)}
            config = resolve_run_config(experiment, values)
            config["extensions"] = _with_fairness(str(config["extensions"]))

            summary = _finished_summary(run_dir, config)
            if summary is None:
                if run_dir.exists():
                    # An interrupted run of this sweep: start it again from scratch.
                    shutil.rmtree(run_dir)
                logger.info("Sweep: running %s with seed %d into %s", entry.label, seed, run_dir)
                started = time.perf_counter()
                summary = runner(config)
                logger.info("Sweep: %s seed %d finished in %.1f s", entry.label, seed, time.perf_counter() - started)
            else:
                logger.info("Sweep: reusing the finished run in %s", run_dir)

            fairness = summary["fairness"]
            outcomes.append(
                RunOutcome(
                    label=entry.label,
                    seed=seed,
                    run_dir=str(run_dir),
                    converted=bool(fairness["converted"]),
                    returned={key: value for key, value in fairness.items() if key not in ("converted", "last_iterate")},
                    last_iterate=dict(fairness["last_iterate"]),
                    elapsed_seconds=float(summary["elapsed_seconds"]),
                )
            )
    return outcomes


def _mean_std(values: list[float], scale: float, digits: int) -> str:
    array = scale * np.asarray(values, dtype=np.float64)
    spread = array.std(ddof=1) if array.size > 1 else 0.0
    return f"{array.mean():.{digits}f} ± {spread:.{digits}f}"


def summary_rows(outcomes: Sequence[RunOutcome]) -> list[dict[str, Any]]:
    """Return one row per (entry, model): mean and std of each metric over seeds."""
    rows = []
    labels = list(dict.fromkeys(outcome.label for outcome in outcomes))
    for label in labels:
        runs = [outcome for outcome in outcomes if outcome.label == label]
        converted = any(run.converted for run in runs)
        models = [("converted" if converted else "last iterate", "returned")]
        if converted:
            models.append(("last iterate", "last_iterate"))
        for model_name, attribute in models:
            metrics = [getattr(run, attribute) for run in runs]
            rows.append(
                {
                    "label": label,
                    "model": model_name,
                    "returned": attribute == "returned",
                    "runs": len(runs),
                    "seeds": [run.seed for run in runs],
                    **{name: [values[name] for values in metrics] for name in METRICS},
                    "client_accuracy": np.mean([values["client_accuracy"] for values in metrics], axis=0).tolist(),
                    "seconds": float(np.mean([run.elapsed_seconds for run in runs])),
                }
            )
    return rows


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Render the sweep rows as a Markdown table (accuracy and parity in %)."""
    lines = [
        "| method | model | seeds | average accuracy (%) | worst-client loss | accuracy parity (%) | seconds per run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['model']} | {row['runs']} | {_mean_std(row['average_accuracy'], 100.0, 2)} | "
            f"{_mean_std(row['worst_client_loss'], 1.0, 3)} | {_mean_std(row['accuracy_parity'], 1.0, 2)} | {row['seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot_sweep(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write worst-client loss against average accuracy, and the mean accuracy of each client, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(row["label"] for row in rows))
    figure, (trade_off, per_client) = plt.subplots(1, 2, figsize=(13, 5 + 0.25 * len(labels)))
    # tab20 gives each of up to 20 methods its own color; the default cycle repeats after 10.
    colors = [plt.get_cmap("tab20")(index % 20) for index in range(len(labels))]
    for row in rows:
        color = colors[labels.index(row["label"]) % len(colors)]
        returned = row["returned"]
        accuracy = 100.0 * np.asarray(row["average_accuracy"])
        loss = np.asarray(row["worst_client_loss"])
        trade_off.errorbar(
            loss.mean(),
            accuracy.mean(),
            xerr=loss.std(ddof=1) if loss.size > 1 else 0.0,
            yerr=accuracy.std(ddof=1) if accuracy.size > 1 else 0.0,
            fmt="o" if returned else "s",
            color=color,
            markerfacecolor=color if returned else "none",
            label=row["label"] if returned else f"{row['label']} (last iterate)",
        )
        if returned:
            clients = np.arange(len(row["client_accuracy"]))
            per_client.plot(clients, 100.0 * np.asarray(row["client_accuracy"]), marker="o", color=color, label=row["label"])
            per_client.set_xticks(clients)
    trade_off.set(xlabel="worst-client test loss", ylabel="average test accuracy (%)", title="fairness trade-off (mean ± std over seeds)")
    per_client.set(xlabel="client", ylabel="test accuracy (%)", title="accuracy per client (mean over seeds)")
    for axis in (trade_off, per_client):
        axis.grid(alpha=0.3)
        # Below the axes, so the legend hides no point.
        axis.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_sweep_report(outcomes: Sequence[RunOutcome], out_dir: Path, command: str = "") -> tuple[str, Path]:
    """Write ``sweep.md``, ``sweep.json`` and ``sweep.png`` under ``out_dir``; return the table and the plot path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(outcomes)
    table = format_markdown(rows)
    header = f"Command: `{command}`\n\n" if command else ""
    (out_dir / "sweep.md").write_text(header + table + "\n", encoding="utf-8")
    (out_dir / "sweep.json").write_text(
        json.dumps({"command": command, "rows": rows, "runs": [vars(outcome) for outcome in outcomes]}, indent=2) + "\n",
        encoding="utf-8",
    )
    return table, plot_sweep(rows, out_dir / "sweep.png")
