"""Compare finished runs: a text table and a plot of central accuracy per round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def load_summary(run_dir: Path) -> dict[str, Any]:
    """Read a run directory's summary.json, with a clear error when it is missing."""
    path = run_dir / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no summary.json; pass a run directory written by `corolla simulate` or `corolla run`.")
    return json.loads(path.read_text(encoding="utf-8"))


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """Render rows as a left-aligned plain-text table."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(f"{cell:<{width}}" for cell, width in zip(header, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines.extend("  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths)) for row in rows)
    return "\n".join(lines)


def compare_runs(run_dirs: list[Path], plot_path: Path | None = None) -> tuple[str, Path]:
    """Return a comparison table of ``run_dirs`` and the path of the plot written."""
    summaries = [load_summary(run_dir) for run_dir in run_dirs]
    header = ["run", "experiment", "strategy", "status", "rounds", "accuracy", "loss", "best accuracy", "seconds"]
    rows = []
    for run_dir, summary in zip(run_dirs, summaries):
        accuracies = [entry["central"].get("accuracy", float("nan")) for entry in summary["history"]]
        final = summary.get("final", {})
        rows.append(
            [
                run_dir.name,
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

    figure, axis = plt.subplots(figsize=(7, 4))
    for run_dir, summary in zip(run_dirs, summaries):
        history = summary["history"]
        axis.plot([entry["round"] for entry in history], [entry["central"].get("accuracy") for entry in history], marker=".", label=f"{run_dir.name} ({summary['strategy']})")
    axis.set(xlabel="round", ylabel="central test accuracy", title="run comparison")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    plot_path = (plot_path or Path.cwd() / "report.png").resolve()
    figure.savefig(plot_path, dpi=100)
    plt.close(figure)
    return format_table(rows, header), plot_path


def plot_client_accuracy(run_dirs: list[Path], plot_path: Path) -> Path | None:
    """Write the test accuracy of each client per run, from the runs' ``fairness`` sections.

    Returns None, writing nothing, when no run has a ``fairness`` section (the fairness run
    extension was off).
    """
    summaries = [(run_dir, load_summary(run_dir)) for run_dir in run_dirs]
    with_fairness = [(run_dir, summary) for run_dir, summary in summaries if "fairness" in summary]
    if not with_fairness:
        return None

    figure, axis = plt.subplots(figsize=(8, 4))
    for run_dir, summary in with_fairness:
        accuracies = [100.0 * value for value in summary["fairness"]["client_accuracy"]]
        axis.plot(range(len(accuracies)), accuracies, marker="o", label=f"{run_dir.name} ({summary['strategy']})")
        axis.set_xticks(range(len(accuracies)))
    axis.set(xlabel="client (partition id)", ylabel="test accuracy (%)", title="accuracy per client of the returned model")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    plot_path = plot_path.resolve()
    figure.savefig(plot_path, dpi=100)
    plt.close(figure)
    return plot_path
