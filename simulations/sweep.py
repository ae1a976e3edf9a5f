"""Sweeps: run several strategies over several seeds in-process and compare their fairness metrics.

``corolla sweep EXPERIMENT --strategies fedavg,omd-tch:omd-step=euclidean --seeds 0,1,2``
runs each (entry, seed) pair into ``OUT/<entry>/seed-<seed>``, with the ``fairness``
extension switched on, and writes to OUT:

- ``sweep.md``: a Markdown table of mean ± standard deviation over seeds (sample standard
  deviation, ddof = 1) of the average accuracy, the worst-client test loss and the accuracy
  parity, for the model each strategy returns and, where that is a converted model, also for
  its last iterate;
- ``sweep.json``: the per-run values behind the table;
- ``sweep.png``: worst-client loss against average accuracy, and accuracy per client.

``<entry>`` is the entry's label, such as ``qffl[q=0.1]``, with every character that is unsafe
in a file name replaced by ``_`` (see ``run_directory_name``). Before the first run trains, the
sweep resolves and checks the run config of every run, so an invalid, empty or repeated entry
or seed fails at once.

A run whose directory already contains a completed ``summary.json`` with the same configuration
is reused, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simulations.experiments import DEFAULTS, ConfigError, Scalar, check_component_names, check_run_config, parse_override, resolve_run_config

logger = logging.getLogger(__name__)

FAIRNESS_EXTENSION = "fairness"
METRICS = ("average_accuracy", "worst_client_loss", "accuracy_parity")


@dataclass(frozen=True)
class SweepEntry:
    """One column of a sweep: a strategy with its own run-config overrides.

    ``text`` is the entry as given on the command line, which error messages quote.
    """

    label: str
    strategy: str
    overrides: dict[str, Scalar] = field(default_factory=dict)
    text: str = ""


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


@dataclass
class PlannedRun:
    """One (entry, seed) run of a sweep with its resolved run config.

    ``finished`` is the summary of a completed run with this config in ``run_dir``, which the
    sweep reuses, or None when the run still has to train.
    """

    entry: SweepEntry
    seed: int
    run_dir: Path
    config: dict[str, Any]
    finished: dict[str, Any] | None


# Run-config keys that the sweep sets for every run, so neither an entry nor --set may set them,
# with where to give each one instead.
SWEEP_KEYS = {
    "strategy": "name each strategy in --strategies, as the first part of an entry such as tch:stch-mu=0.5",
    "seed": "list the seeds with --seeds, such as --seeds 0,1,2",
    "experiment": "the EXPERIMENT argument selects the preset of every run, so start another sweep for another experiment",
    "out-dir": "the sweep writes each run to OUT/<entry>/seed-<seed>, so choose OUT with --out",
}

# Characters allowed in a run-directory name. run_directory_name replaces every other one with '_'.
_UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._=,+\[\]-]")
# Maximum file-name length, in bytes, that Linux file systems such as ext4 accept.
_MAX_NAME_BYTES = 255


def parse_entry(text: str) -> SweepEntry:
    """Parse ``STRATEGY[:KEY=VALUE...]``, for example ``omd-tch:omd-step=euclidean:eta-lambda=0.03``.

    Raises ConfigError for an unknown strategy, an empty part, a key given twice or a key in
    ``SWEEP_KEYS``.
    """
    from strategies import STRATEGIES

    parts = [part.strip() for part in text.split(":")]
    strategy = parts[0]
    if not strategy:
        raise ConfigError(f"Invalid sweep entry {text!r}: the strategy name is missing; start the entry with a strategy such as fedavg.")
    if strategy not in STRATEGIES:
        raise ConfigError(f"Unknown strategy {strategy!r} in sweep entry {text!r}; choose one of: {', '.join(STRATEGIES)}.")

    overrides: dict[str, Scalar] = {}
    for position, part in enumerate(parts[1:], start=1):
        if not part:
            raise ConfigError(
                f"Invalid sweep entry {text!r}: the part after colon {position} is empty; remove that colon or add KEY=VALUE after it."
            )
        key, value = parse_override(part)
        if key in overrides:
            raise ConfigError(f"Invalid sweep entry {text!r}: it sets {key} twice; keep one {key}=VALUE.")
        overrides[key] = value
    for key in overrides:
        if key in SWEEP_KEYS:
            raise ConfigError(f"Invalid sweep entry {text!r}: the sweep sets {key} for every run itself; {SWEEP_KEYS[key]}.")

    label = strategy if not overrides else f"{strategy}[{','.join(f'{key}={value}' for key, value in overrides.items())}]"
    return SweepEntry(label, strategy, overrides, text)


def parse_entries(text: str) -> list[SweepEntry]:
    """Parse the comma-separated ``--strategies`` list.

    Raises ConfigError for an empty list or an empty entry.
    """
    if not text.strip():
        raise ConfigError(f"Invalid --strategies {text!r}: it is empty; give at least one entry, such as --strategies fedavg,tch.")
    entries = []
    for position, part in enumerate(text.split(","), start=1):
        if not part.strip():
            raise ConfigError(f"Invalid --strategies {text!r}: entry {position} is empty; remove the extra comma.")
        entries.append(parse_entry(part))
    return entries


def parse_seeds(text: str) -> list[int]:
    """Parse a comma-separated list of distinct non-negative integer seeds."""
    if not text.strip():
        raise ConfigError(f"Invalid --seeds {text!r}: it is empty; give at least one integer >= 0, such as --seeds 0,1,2.")
    seeds = []
    for position, part in enumerate(text.split(","), start=1):
        if not part.strip():
            raise ConfigError(f"Invalid --seeds {text!r}: item {position} is empty; remove the extra comma.")
        try:
            seeds.append(int(part))
        except ValueError:
            raise ConfigError(f"Invalid --seeds {text!r}: {part.strip()!r} is not an integer; give integers such as 0,1,2.") from None
    check_seeds(seeds, f"--seeds {text!r}")
    return seeds


def check_seeds(seeds: Sequence[int], source: str = "seeds") -> None:
    """Raise ConfigError unless ``seeds`` is a non-empty list of distinct integers >= 0.

    ``source`` names the seeds in the message, such as ``--seeds '0,0'``.
    """
    if not seeds:
        raise ConfigError(f"Invalid {source}: no seeds; give at least one integer >= 0, such as --seeds 0,1,2.")
    for seed in seeds:
        if seed < 0:
            raise ConfigError(f"Invalid {source}: seed {seed} is negative; give integers >= 0.")
    repeated = sorted({seed for seed in seeds if list(seeds).count(seed) > 1})
    if repeated:
        listed = ", ".join(str(seed) for seed in repeated)
        raise ConfigError(
            f"Invalid {source}: repeated seed {listed}; the sweep would average a run with itself, so list each seed once."
        )


def run_directory_name(label: str) -> str:
    """Return the name of the directory that contains an entry's runs, made from its label.

    Every character outside A-Z, a-z, 0-9 and ``. _ = , + - [ ]`` becomes ``_``, so the name is
    one path component and never ``.`` or ``..``. Different labels can give the same name,
    which ``plan_sweep`` rejects.
    """
    name = _UNSAFE_NAME_CHARACTERS.sub("_", label)
    if not name.strip("."):
        name = name.replace(".", "_") or "_"
    return name


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


def _describe(entries: Sequence[SweepEntry], index: int) -> str:
    """Return ``entries[index]`` as the message names it: its position and its text."""
    entry = entries[index]
    return f"{index + 1} ({entry.text or entry.label!r})"


def _resolve_entry(experiment: str, entry: SweepEntry, overrides: dict[str, Any], seed: int, run_dir: Path) -> dict[str, Any]:
    values = {**overrides, **entry.overrides, "strategy": entry.strategy, "seed": seed, "out-dir": str(run_dir)}
    config = resolve_run_config(experiment, values)
    config["extensions"] = _with_fairness(str(config["extensions"]))
    return config


def _check_sweep_settings(experiment: str, entries: Sequence[SweepEntry], seeds: Sequence[int], overrides: dict[str, Any]) -> None:
    """Raise ConfigError for no entries, invalid seeds or an invalid ``--set`` value."""
    if not entries:
        raise ConfigError("The sweep has no entries; give at least one strategy, such as --strategies fedavg.")
    check_seeds(seeds)
    for key, value in overrides.items():
        if key in SWEEP_KEYS:
            raise ConfigError(f"Invalid --set {key}={value}: the sweep sets {key} for every run itself; {SWEEP_KEYS[key]}.")
    try:
        shared = resolve_run_config(experiment, overrides)
        shared["extensions"] = _with_fairness(str(shared["extensions"]))
        check_component_names(shared)
    except ConfigError as error:
        raise ConfigError(f"Invalid --set value: {error}") from None


def _entry_directory_name(entries: Sequence[SweepEntry], index: int) -> str:
    name = run_directory_name(entries[index].label)
    size = len(name.encode("utf-8"))
    if size > _MAX_NAME_BYTES:
        raise ConfigError(
            f"Sweep entry {_describe(entries, index)} gives a run directory name of {size} bytes, "
            f"more than the {_MAX_NAME_BYTES} that file systems allow; move values shared by every entry to --set."
        )
    return name


def _check_entry(experiment: str, entries: Sequence[SweepEntry], index: int, overrides: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Resolve ``entries[index]`` with seed 0 and make the checks a run makes before training."""
    try:
        config = _resolve_entry(experiment, entries[index], overrides, 0, run_dir)
        check_run_config(config, list(entries[index].overrides))
    except ValueError as error:
        raise ConfigError(f"Invalid sweep entry {_describe(entries, index)}: {error}") from None
    return config


def _check_distinct(entries: Sequence[SweepEntry], names: list[str], configs: list[dict[str, Any]], out_dir: Path) -> None:
    """Raise ConfigError when two entries have the same run config or the same run directory."""
    # Two entries are the same when their configs match in every key but the run directory,
    # so q=0.1 and q=1e-1, or q=1 and q=1.0, are one entry.
    compared = [{key: value for key, value in config.items() if key != "out-dir"} for config in configs]
    for index in range(len(entries)):
        for other in range(index):
            if compared[other] == compared[index]:
                raise ConfigError(
                    f"Sweep entries {_describe(entries, other)} and {_describe(entries, index)} give the same run config, "
                    "so the sweep would run and average the same runs twice; remove one of them."
                )
            # Case-insensitive file systems (macOS and Windows by default) treat names that
            # differ only in case as one directory.
            if names[other].casefold() == names[index].casefold():
                if names[other] == names[index]:
                    directories = f"the same run directory {out_dir / names[index]}"
                else:
                    directories = (
                        f"run directories {names[other]!r} and {names[index]!r}, which are one directory on case-insensitive file systems"
                    )
                raise ConfigError(
                    f"Sweep entries {_describe(entries, other)} and {_describe(entries, index)} map to {directories}; "
                    "change a value in one of them."
                )


def plan_sweep(
    experiment: str,
    entries: Sequence[SweepEntry],
    seeds: Sequence[int],
    overrides: dict[str, Any],
    out_dir: Path,
) -> list[PlannedRun]:
    """Resolve and check the run config of every (entry, seed) pair before any run trains.

    Raises ConfigError, naming the entry or value, for no entries, invalid or repeated seeds,
    a --set key in ``SWEEP_KEYS`` or an invalid run config or strategy setting. It also raises
    for two entries with the same run config or run directory, and for a finished run whose
    config differs from its planned config.
    """
    _check_sweep_settings(experiment, entries, seeds, overrides)
    out_dir = out_dir.resolve()
    names = [_entry_directory_name(entries, index) for index in range(len(entries))]
    configs = [_check_entry(experiment, entries, index, overrides, out_dir / names[index] / "seed-0") for index in range(len(entries))]
    _check_distinct(entries, names, configs, out_dir)

    planned = []
    for entry, name in zip(entries, names):
        for seed in seeds:
            run_dir = out_dir / name / f"seed-{seed}"
            config = _resolve_entry(experiment, entry, overrides, seed, run_dir)
            planned.append(PlannedRun(entry, seed, run_dir, config, _finished_summary(run_dir, config)))
    return planned


def run_sweep(
    experiment: str,
    entries: Sequence[SweepEntry],
    seeds: Sequence[int],
    overrides: dict[str, Any],
    out_dir: Path,
    runner: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> list[RunOutcome]:
    """Run every entry with every seed (or reuse finished runs) and return their fairness metrics.

    ``plan_sweep`` checks every run first, so invalid input fails before the first run trains.
    """
    if runner is None:
        from simulations.inprocess import run_inprocess as runner
    outcomes = []
    for run in plan_sweep(experiment, entries, seeds, overrides, out_dir):
        label, seed, run_dir = run.entry.label, run.seed, run.run_dir
        summary = run.finished
        if summary is None:
            if run_dir.exists():
                # An interrupted run of this sweep: start it again from scratch.
                shutil.rmtree(run_dir)
            logger.info("Sweep: running %s with seed %d into %s", label, seed, run_dir)
            started = time.perf_counter()
            summary = runner(run.config)
            logger.info("Sweep: %s seed %d finished in %.1f s", label, seed, time.perf_counter() - started)
        else:
            logger.info("Sweep: reusing the finished run in %s", run_dir)

        fairness = summary["fairness"]
        outcomes.append(
            RunOutcome(
                label=label,
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
