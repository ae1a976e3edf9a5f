"""The ``corolla`` command: simulate, list, report, and the deployment commands.

Each subcommand is a thin layer over the library: ``simulate`` drives the
ServerApp and ClientApp on one machine, the deployment commands print and run
Flower's own commands (``flower-superlink``, ``flower-supernode``, ``flwr run``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from corolla.deploy_cli import add_deploy_commands, find_app_directory
from corolla.progress import ProgressDisplay
from simulations.experiments import CONFIG_KEYS, EXPERIMENTS, ConfigError, check_run_config, parse_overrides, resolve_run_config

logger = logging.getLogger(__name__)

ENGINES = ("inprocess", "ray")


def _configure_logging(verbose: bool) -> None:
    from flwr.common.logger import FLOWER_LOGGER  # importing flwr sets its logger's level

    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    FLOWER_LOGGER.setLevel(level)
    # Flower's logger has its own handler; propagating too would print each line twice.
    FLOWER_LOGGER.propagate = False


def _check_run_directory(out_dir: Path) -> None:
    """Raise ConfigError unless ``out_dir`` is an empty directory or can be created as one."""
    existing = next(path for path in (out_dir, *out_dir.parents) if path.exists())
    if not existing.is_dir():
        raise ConfigError(
            f"Invalid output directory {out_dir}: {existing} is a file, not a directory; choose another --out."
        )
    if existing == out_dir and any(out_dir.iterdir()):
        raise ConfigError(f"Output directory {out_dir} is not empty; choose another --out or remove it.")


def simulate(args: argparse.Namespace) -> int:
    """Run an experiment on one machine with the chosen engine."""
    from server.results import default_run_directory

    overrides = parse_overrides(args.set)
    run_config = resolve_run_config(args.experiment, overrides)
    check_run_config(run_config, list(overrides))
    out_dir = Path(args.out).resolve() if args.out else default_run_directory(args.experiment)
    _check_run_directory(out_dir)
    run_config["out-dir"] = str(out_dir)

    print(f"Corolla: {args.experiment} with {run_config['strategy']} on the {args.engine} engine -> {out_dir}", flush=True)
    started = time.perf_counter()
    with ProgressDisplay(out_dir / "events.jsonl", int(run_config["num-server-rounds"])):
        if args.engine == "inprocess":
            from simulations.inprocess import run_inprocess

            summary = run_inprocess(run_config)
        else:
            import json

            from simulations.ray_engine import run_with_ray

            run_with_ray(run_config, find_app_directory())
            summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))

    final = summary["final"]
    print(
        f"Finished {summary['rounds']} rounds in {time.perf_counter() - started:.1f} s: "
        f"central test accuracy {final['accuracy']:.4f}, loss {final['loss']:.4f}. Results in {out_dir}"
    )
    return 0


def list_components(args: argparse.Namespace) -> int:
    """Print experiments, strategies, models, datasets, partitioners and run-config keys."""
    from client.models import MODELS
    from simulations.datasets import DATASETS
    from simulations.partition import PARTITIONERS
    from strategies import STRATEGIES

    sections = [
        ("Experiments", {name: experiment.description for name, experiment in EXPERIMENTS.items()}),
        ("Strategies", {name: description for name, (_, description) in STRATEGIES.items()}),
        ("Models", {name: description for name, (_, description) in MODELS.items()}),
        ("Datasets", dict(DATASETS)),
        ("Partitioners", dict(PARTITIONERS)),
        ("Run-config keys (--set KEY=VALUE)", {key.name: f"{key.help} Default: {key.default!r}." for key in CONFIG_KEYS}),
    ]
    for title, entries in sections:
        print(f"{title}:")
        width = max(len(name) for name in entries)
        for name, description in entries.items():
            print(f"  {name:<{width}}  {description}")
        print()
    return 0


def report(args: argparse.Namespace) -> int:
    """Print a comparison table of runs and write a plot of their accuracy per round."""
    from simulations.report import compare_runs

    table, plot_path = compare_runs([Path(run) for run in args.runs], Path(args.out) if args.out else None)
    print(table)
    print(f"Plot written to {plot_path}")

    from simulations.report import plot_client_accuracy

    client_plot = plot_client_accuracy([Path(run) for run in args.runs], plot_path.with_name(f"{plot_path.stem}_clients.png"))
    if client_plot is not None:
        print(f"Per-client accuracy plot written to {client_plot}")
    return 0


def sweep(args: argparse.Namespace) -> int:
    """Run strategies over seeds in-process and write a fairness comparison table and plot."""
    from simulations.sweep import parse_entries, parse_seeds, run_sweep, write_sweep_report

    entries = parse_entries(args.strategies)
    seeds = parse_seeds(args.seeds)
    overrides = parse_overrides(args.set)
    out_dir = Path(args.out) if args.out else Path.cwd() / "runs" / "sweeps" / args.experiment
    command = " ".join(["corolla", "sweep", args.experiment, "--strategies", args.strategies, "--seeds", args.seeds])
    command += "".join(f" --set {pair}" for pair in args.set)
    if args.out:
        command += f" --out {args.out}"

    print(f"Corolla sweep: {args.experiment}, {len(entries)} strategies x {len(seeds)} seeds -> {out_dir.resolve()}", flush=True)
    outcomes = run_sweep(args.experiment, entries, seeds, overrides, out_dir)
    table, plot_path = write_sweep_report(outcomes, out_dir.resolve(), command)
    print(table)
    print(f"Table written to {out_dir.resolve() / 'sweep.md'}, plot to {plot_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``corolla`` command."""
    parser = argparse.ArgumentParser(prog="corolla", description="Corolla: federated learning methods on Flower, simulated or deployed.")
    parser.add_argument("--verbose", "-v", action="store_true", help="log Flower's and Corolla's INFO messages")
    subparsers = parser.add_subparsers(dest="command", required=True)

    sim = subparsers.add_parser("simulate", help="run an experiment on this machine")
    sim.add_argument("experiment", choices=sorted(EXPERIMENTS), metavar="EXPERIMENT", help="experiment preset (see `corolla list`)")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a run-config value; repeatable")
    sim.add_argument("--out", help="run directory (default: runs/<time>-<experiment>)")
    sim.add_argument("--engine", choices=ENGINES, default="inprocess", help="in-process (default, fast) or Flower's Ray engine")
    sim.set_defaults(handler=simulate)

    lister = subparsers.add_parser("list", help="list experiments, strategies, models, datasets and run-config keys")
    lister.set_defaults(handler=list_components)

    rep = subparsers.add_parser("report", help="compare finished runs: a table and a plot")
    rep.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    rep.add_argument("--out", help="plot file (default: report.png in the working directory)")
    rep.set_defaults(handler=report)

    swp = subparsers.add_parser("sweep", help="run strategies over seeds in-process and compare fairness metrics")
    swp.add_argument("experiment", choices=sorted(EXPERIMENTS), metavar="EXPERIMENT", help="experiment preset (see `corolla list`)")
    swp.add_argument(
        "--strategies",
        required=True,
        metavar="LIST",
        help="comma-separated entries STRATEGY[:KEY=VALUE...], e.g. fedavg,omd-tch:omd-step=euclidean:eta-lambda=0.03",
    )
    swp.add_argument("--seeds", default="0,1,2", metavar="LIST", help="comma-separated seeds (default: 0,1,2)")
    swp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a run-config value for every run; repeatable")
    swp.add_argument("--out", help="sweep directory (default: runs/sweeps/<experiment>)")
    swp.set_defaults(handler=sweep)

    add_deploy_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``corolla`` command and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.handler(args))
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"corolla {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"corolla {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # Any other failure ends the run with its reason and a non-zero code.
        logger.debug("Unhandled error", exc_info=True)
        print(f"corolla {args.command}: failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
