"""Compare finished runs: a text table and a plot of central accuracy per round."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.figure import Figure  # noqa: E402

logger = logging.getLogger(__name__)


def load_summary(run_dir: Path) -> dict[str, Any]:
    """Read a run directory's summary.json, with a clear error when it is missing."""
    path = run_dir / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no summary.json; pass a run directory written by `corolla simulate` or `corolla run`.")
    return json.loads(path.read_text(encoding="utf-8"))


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Label each run by the fewest trailing path components that no other run given ends in.

    Runs of a sweep all end in ``seed-<seed>``, so they get labels such as
    ``qffl[q=0.1]/seed-0``. Raises ValueError when a directory is given twice.
    """
    paths = [run_dir.resolve() for run_dir in run_dirs]
    first_given: dict[Path, Path] = {}
    for run_dir, path in zip(run_dirs, paths):
        if path in first_given:
            raise ValueError(f"Run directory {path} is given twice (as {first_given[path]} and {run_dir}); pass each run once.")
        first_given[path] = run_dir

    labels = []
    for path in paths:
        # The full resolved paths differ, so at the latest the whole path is unique.
        for length in range(1, len(path.parts) + 1):
            tail = path.parts[-length:]
            if all(other.parts[-length:] != tail for other in paths if other != path):
                break
        labels.append(str(Path(*tail)))
    return labels


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """Render rows as a left-aligned plain-text table."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(f"{cell:<{width}}" for cell, width in zip(header, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines.extend("  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths)) for row in rows)
    return "\n".join(lines)


def accuracy_figure(labels: list[str], summaries: list[dict[str, Any]]) -> Figure:
    """Draw the central test accuracy per round of each run, with ``labels`` in the legend."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for label, summary in zip(labels, summaries):
        history = summary["history"]
        axis.plot(
            [entry["round"] for entry in history],
            [entry["central"].get("accuracy") for entry in history],
            marker=".",
            label=f"{label} ({summary['strategy']})",
        )
    axis.set(xlabel="round", ylabel="central test accuracy", title="run comparison")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


def compare_runs(run_dirs: list[Path], plot_path: Path | None = None) -> tuple[str, Path]:
    """Return a comparison table of ``run_dirs`` and the path of the plot written."""
    labels = run_labels(run_dirs)
    summaries = [load_summary(run_dir) for run_dir in run_dirs]
    header = ["run", "experiment", "strategy", "status", "rounds", "accuracy", "loss", "best accuracy", "seconds"]
    rows = []
    for label, summary in zip(labels, summaries):
        accuracies = [entry["central"].get("accuracy", float("nan")) for entry in summary["history"]]
        final = summary.get("final", {})
        rows.append(
            [
                label,
                summary["experiment"],
                summary["strategy"],
                summary.get("status", "?"),
                str(summary["rounds"]),
                f"{final.get('accuracy', float('nan')):.4f}",
                f"{final.get('loss', float('nan')):.4f}",
                f"{max(accuracies, default=float('nan')):.4f}",
                f"{summary.get('elapsed_seconds', float('nan')):.1f}",
            ]
        )

    figure = accuracy_figure(labels, summaries)
    plot_path = (plot_path or Path.cwd() / "report.png").resolve()
    figure.savefig(plot_path, dpi=100)
    plt.close(figure)
    return format_table(rows, header), plot_path


def client_accuracy_figure(labels: list[str], summaries: list[dict[str, Any]]) -> Figure:
    """Draw the test accuracy of each client per run from the runs' ``fairness`` sections."""
    figure, axis = plt.subplots(figsize=(8, 4))
    for label, summary in zip(labels, summaries):
        accuracies = [100.0 * value for value in summary["fairness"]["client_accuracy"]]
        axis.plot(range(len(accuracies)), accuracies, marker="o", label=f"{label} ({summary['strategy']})")
        axis.set_xticks(range(len(accuracies)))
    axis.set(xlabel="client (partition id)", ylabel="test accuracy (%)", title="accuracy per client of the returned model")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


def plot_client_accuracy(run_dirs: list[Path], plot_path: Path) -> Path | None:
    """Write the test accuracy of each client per run, from the runs' ``fairness`` sections.

    Returns None, writing nothing, when no run has a ``fairness`` section (the fairness run
    extension was off). When only some runs have one, logs a warning that names the others.
    """
    labels = run_labels(run_dirs)
    summaries = [load_summary(run_dir) for run_dir in run_dirs]
    with_fairness = [(label, summary) for label, summary in zip(labels, summaries) if "fairness" in summary]
    if not with_fairness:
        return None
    left_out = [label for label, summary in zip(labels, summaries) if "fairness" not in summary]
    if left_out:
        logger.warning(
            "The per-client accuracy plot leaves out %s: no fairness section in summary.json. "
            "Run with --set extensions=fairness to record one.",
            ", ".join(left_out),
        )

    figure = client_accuracy_figure([label for label, _ in with_fairness], [summary for _, summary in with_fairness])
    plot_path = plot_path.resolve()
    figure.savefig(plot_path, dpi=100)
    plt.close(figure)
    return plot_path
