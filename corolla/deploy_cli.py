"""The ``corolla`` deployment commands: ``certs``, ``server``, ``client`` and ``run``.

Each command prints the Flower command it runs (``$ flower-superlink ...``,
``$ flwr run ...``) before running it, so a deployment can be repeated by hand.

A federation is set up in four steps, on Flower 1.42:

1. ``corolla certs --out certs --nodes 2`` writes a CA, the SuperLink's TLS
   certificate and one key pair per node (``node-0``, ``node-1``).
2. ``corolla server --certs certs`` starts a SuperLink with TLS and SuperNode
   authentication and, once it responds, stores a SuperLink connection
   (default name ``corolla``) in ``$FLWR_HOME/config.toml``.
3. Each node's public key is registered with the running SuperLink, from any
   machine that has this connection: ``flwr supernode register certs/node-0.pub corolla``.
   The SuperLink accepts no SuperNode before its key is registered, and without
   ``--database`` it forgets registrations when it stops.
4. ``corolla client --server HOST:PORT --partition 0/2 --certs certs
   --node-key certs/node-0.key`` starts a node, and
   ``corolla run EXPERIMENT --superlink corolla`` submits a run and waits for it.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from client.launch import DEFAULT_RUNTIME_PORT, find_free_port, parse_partition, supernode_command
from corolla.progress import ProgressDisplay
from server.launch import (
    DEFAULT_CONNECTION,
    DEFAULT_SERVER_HOSTS,
    DEFAULT_SUPERLINK_PORT,
    FlowerCommandError,
    certificate_paths,
    check_bind_address,
    check_connection_name,
    check_superlink_certificate,
    fetch_run_log,
    find_certificates,
    flower_environment,
    flower_executable,
    flwr_home,
    remove_stale_node_keys,
    submit_run,
    superlink_address,
    superlink_command,
    superlink_host,
    superlink_is_healthy,
    validate_server_hosts,
    wait_for_run,
    write_certificates,
    write_connection,
)
from simulations.experiments import EXPERIMENTS, ConfigError, check_run_config, parse_overrides, resolve_run_config

# Exit codes of `corolla run` besides 0 (completed) and 2 (invalid arguments).
EXIT_RUN_FAILED = 1
EXIT_RUN_TIMED_OUT = 3

_LOG_LINES_ON_FAILURE = 40

# A SuperNode that cannot reach its SuperLink for this long exits with an error.
DEFAULT_MAX_WAIT_TIME_S = 600.0
# `corolla server` prints a notice when the SuperLink has not responded to /health after this long.
_HEALTH_NOTICE_AFTER_S = 30.0
_HEALTH_POLL_INTERVAL_S = 0.5


def add_deploy_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``certs``, ``server``, ``client`` and ``run`` on the ``corolla`` subparsers.

    Each command sets ``handler``, which takes the parsed arguments and returns an exit code.
    """
    _add_certs_command(subparsers)
    _add_server_command(subparsers)
    _add_client_command(subparsers)
    _add_run_command(subparsers)


def print_command(command: Sequence[str]) -> None:
    """Print a command as a copyable shell line, prefixed with ``$``."""
    print(f"$ {shlex.join(command)}", flush=True)


def positive_seconds(text: str) -> float:
    """Parse an argparse value that must be a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a number of seconds, for example 600") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give a positive, finite number of seconds")
    return value


# ---------------------------------------------------------------------------
# corolla certs
# ---------------------------------------------------------------------------


def _add_certs_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "certs",
        help="write a CA, the SuperLink's TLS certificate and SuperNode key pairs",
        description=(
            "Write ca.crt/ca.key, server.pem/server.key and NAME.key/NAME.pub per node into "
            "one directory. Give the SuperLink the server files, every node and `flwr` user "
            "ca.crt, and each node only its own NAME.key. Private keys are mode 0600."
        ),
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory to write the files into")
    nodes = parser.add_mutually_exclusive_group(required=True)
    nodes.add_argument("--nodes", type=int, metavar="N", help="write key pairs for N nodes named node-0 .. node-(N-1)")
    nodes.add_argument("--node", action="append", metavar="NAME", help="write a key pair for the node NAME; repeatable")
    parser.add_argument(
        "--server-host",
        action="append",
        metavar="HOST",
        help=(
            "host name or IP address that nodes and `flwr` use to reach the SuperLink, added to "
            f"the server certificate; repeatable (default: {', '.join(DEFAULT_SERVER_HOSTS)})"
        ),
    )
    parser.add_argument("--overwrite", action="store_true", help="replace files that already exist")
    parser.set_defaults(handler=run_certs_command)


def run_certs_command(args: argparse.Namespace) -> int:
    """Write the certificates and node keys, then print each file written.

    Every host and node name is checked before any file is written. With
    ``--overwrite``, ``node-N`` key pairs that the new set does not include are deleted.
    """
    if args.nodes is not None:
        if args.nodes < 1:
            raise ValueError(f"Invalid --nodes {args.nodes}: give at least 1.")
        node_names = [f"node-{index}" for index in range(args.nodes)]
    else:
        node_names = list(args.node)
    hosts = tuple(args.server_host) if args.server_host is not None else DEFAULT_SERVER_HOSTS
    validate_server_hosts(hosts)
    _check_certificate_directory(args.out, node_names, args.overwrite)

    try:
        paths = write_certificates(args.out, node_names, hosts, overwrite=args.overwrite)
    except FileExistsError as error:
        raise ValueError(str(error)) from None
    except NotADirectoryError as error:
        raise ValueError(
            f"Invalid --out {args.out}: part of {error.filename} is a file, not a directory; choose another --out."
        ) from None
    except PermissionError as error:
        raise ValueError(
            f"Cannot write {error.filename}: permission denied. Choose another --out, "
            "or change the permissions of that directory."
        ) from None
    removed = remove_stale_node_keys(paths) if args.overwrite else []

    print(f"Wrote to {paths.directory}:")
    print(f"  {paths.ca_certificate.name:<14} CA certificate: give it to every node and `flwr` user")
    print(f"  {paths.ca_key.name:<14} CA private key: keep it off the servers")
    print(f"  {paths.server_certificate.name:<14} SuperLink certificate for {', '.join(hosts)}")
    print(f"  {paths.server_key.name:<14} SuperLink private key")
    for node in paths.nodes:
        print(f"  {node.private_key.name:<14} private key of {node.name}: give it to that node only")
        print(f"  {node.public_key.name:<14} public key of {node.name}: register it with `flwr supernode register`")
    if removed:
        print(f"Removed key files of nodes that this set does not include: {', '.join(path.name for path in removed)}")
    current = {node.public_key.name for node in paths.nodes}
    others = sorted(path.name for path in paths.directory.glob("*.pub") if path.name not in current)
    if others:
        print(
            f"Kept other public keys: {', '.join(others)}. `corolla server` lists every NAME.pub in "
            "this directory, so delete those that no node uses."
        )
    return 0


def _check_certificate_directory(out_dir: Path, node_names: Sequence[str], overwrite: bool) -> None:
    """Raise ValueError when ``out_dir`` cannot be a directory, or contains files to write and ``overwrite`` is false."""
    existing = next(path for path in (out_dir, *out_dir.parents) if path.exists())
    if not existing.is_dir():
        raise ValueError(f"Invalid --out {out_dir}: {existing} is a file, not a directory; choose another --out.")
    if overwrite or existing != out_dir:
        return
    paths = certificate_paths(out_dir, node_names)
    targets = [paths.ca_certificate, paths.ca_key, paths.server_certificate, paths.server_key]
    targets += [path for node in paths.nodes for path in (node.private_key, node.public_key)]
    found = [path.name for path in targets if path.exists()]
    if found:
        raise ValueError(
            f"{out_dir} already has {', '.join(found)}. Choose another --out, or pass --overwrite "
            "to replace them (every node then needs the new ca.crt and a newly registered key)."
        )


# ---------------------------------------------------------------------------
# corolla server
# ---------------------------------------------------------------------------


def _add_server_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "server",
        help="start a Flower SuperLink with TLS and SuperNode authentication",
        description=(
            "Start flower-superlink in the foreground with TLS and SuperNode authentication, "
            "and store a SuperLink connection for `flwr` and `corolla run`. It registers no "
            "node: register each node's public key with "
            "`flwr supernode register NODE.pub CONNECTION` once the SuperLink is up."
        ),
    )
    parser.add_argument("--certs", required=True, type=Path, metavar="DIR", help="directory written by `corolla certs`")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind; 0.0.0.0 or :: accept other machines (default: 127.0.0.1)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_SUPERLINK_PORT,
        help=(
            "HTTPS port for SuperNodes, `flwr` and the ServerApp; Flower 1.42 serves its "
            f"Fleet, Control and runtime APIs on this one port (default: {DEFAULT_SUPERLINK_PORT})"
        ),
    )
    parser.add_argument(
        "--connection",
        default=DEFAULT_CONNECTION,
        metavar="NAME",
        help=f"SuperLink connection to write to $FLWR_HOME/config.toml (default: {DEFAULT_CONNECTION})",
    )
    parser.add_argument(
        "--database",
        type=Path,
        metavar="FILE",
        help="SQLite file for the SuperLink's state, so registered nodes survive a restart (default: in memory)",
    )
    parser.set_defaults(handler=run_server_command)


def run_server_command(args: argparse.Namespace) -> int:
    """Check the setup, run the SuperLink until it exits, and write the connection once it is up.

    The connection is written only after the SuperLink responds to ``/health``, so a
    SuperLink that fails to start leaves an existing connection of that name unchanged.
    """
    certificates = find_certificates(args.certs)
    check_connection_name(args.connection)
    check_superlink_certificate(certificates, superlink_host(args.host))
    check_bind_address(args.host, args.port)
    command = superlink_command(certificates, host=args.host, port=args.port, database=args.database)
    address = superlink_address(args.host, args.port)
    register_command = [flower_executable("flwr"), "supernode", "register"]

    def on_start(process: subprocess.Popen) -> None:
        if not _wait_until_healthy(process, address, certificates.ca_certificate):
            print(
                f"The SuperLink exited before it responded at https://{address}/health; the connection "
                f"{args.connection!r} in {flwr_home() / 'config.toml'} was not changed.",
                file=sys.stderr,
                flush=True,
            )
            return
        config_path = write_connection(args.connection, address, certificates.ca_certificate)
        print(f"SuperLink is up at {address}; connection {args.connection!r} written to {config_path}", flush=True)
        if certificates.nodes:
            print("Register the nodes' public keys:")
            for node in certificates.nodes:
                print(f"  {shlex.join([*register_command, str(node.public_key), args.connection])}")
            sys.stdout.flush()

    print_command(command)
    return _run_foreground(command, on_start)


def _wait_until_healthy(process: subprocess.Popen, address: str, root_certificates: Path) -> bool:
    """Poll the SuperLink's ``/health`` until it responds (True) or the process exits (False)."""
    started = time.monotonic()
    notice_printed = False
    while process.poll() is None:
        if superlink_is_healthy(address, root_certificates):
            # Check the process again, because another server could respond on this address.
            return process.poll() is None
        if not notice_printed and time.monotonic() - started > _HEALTH_NOTICE_AFTER_S:
            print(
                f"The SuperLink has not responded at https://{address}/health for {_HEALTH_NOTICE_AFTER_S:g} s; "
                "the connection is written once it does.",
                file=sys.stderr,
                flush=True,
            )
            notice_printed = True
        time.sleep(_HEALTH_POLL_INTERVAL_S)
    return False


# ---------------------------------------------------------------------------
# corolla client
# ---------------------------------------------------------------------------


def _add_client_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "client",
        help="start a Flower SuperNode that serves Corolla's ClientApp on local data",
        description=(
            "Start flower-supernode in the foreground. The node connects to the SuperLink over "
            "TLS and authenticates with its private key, whose public key must be registered "
            "with the SuperLink first (`flwr supernode register NODE.pub CONNECTION`)."
        ),
    )
    parser.add_argument("--server", required=True, metavar="HOST:PORT", help="SuperLink address, for example 127.0.0.1:8000")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--partition",
        metavar="I/N",
        help="serve partition I of N of the run's dataset (0 <= I < N; N must equal the run's num-clients)",
    )
    data.add_argument("--data", type=Path, metavar="DIR", help="serve this node's own dataset files from DIR")
    parser.add_argument("--certs", required=True, type=Path, metavar="DIR", help="directory holding the CA certificate ca.crt")
    parser.add_argument("--node-key", required=True, type=Path, metavar="PATH", help="this node's private key (NAME.key from `corolla certs`)")
    parser.add_argument(
        "--runtime-port",
        type=int,
        default=0,
        metavar="PORT",
        help=(
            "local port of the SuperNode's runtime API, which its ClientApp processes call; "
            f"nodes on one machine need distinct ports (default: a free port; Flower's own default is {DEFAULT_RUNTIME_PORT})"
        ),
    )
    parser.add_argument(
        "--max-wait-time",
        type=positive_seconds,
        default=DEFAULT_MAX_WAIT_TIME_S,
        metavar="SECONDS",
        help=(
            "how long the node keeps retrying a SuperLink it cannot reach, when it starts or "
            f"later, before it exits with an error (default: {DEFAULT_MAX_WAIT_TIME_S:g})"
        ),
    )
    parser.set_defaults(handler=run_client_command)


def run_client_command(args: argparse.Namespace) -> int:
    """Build the SuperNode command from the arguments and run it until it exits."""
    partition = parse_partition(args.partition) if args.partition is not None else None
    data_dir = args.data
    if data_dir is not None:
        if data_dir.is_file():
            raise ValueError(
                f"Invalid --data {data_dir}: it is a file, not a directory; give the directory that contains the node's dataset files."
            )
        if not data_dir.is_dir():
            raise FileNotFoundError(f"Data directory {data_dir} not found.")
    root_certificates = args.certs / "ca.crt"
    runtime_port = args.runtime_port or find_free_port()

    command = supernode_command(
        args.server,
        root_certificates,
        args.node_key,
        partition,
        data_dir,
        runtime_port=runtime_port,
        max_wait_time=args.max_wait_time,
    )
    print(
        f"Connecting to the SuperLink at {args.server}; the node exits if it cannot reach it "
        f"for {args.max_wait_time:g} s (--max-wait-time).",
        flush=True,
    )
    print_command(command)
    return _run_foreground(command)


# ---------------------------------------------------------------------------
# corolla run
# ---------------------------------------------------------------------------


def _add_run_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="submit an experiment to a deployed SuperLink and wait for it",
        description=(
            "Submit Corolla's Flower App with the experiment's run config to a SuperLink "
            "connection and wait until the run finishes. Exits 0 when the run completed, "
            f"{EXIT_RUN_FAILED} when it failed or was stopped, {EXIT_RUN_TIMED_OUT} on timeout."
        ),
    )
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS), metavar="EXPERIMENT", help="experiment preset (see `corolla list`)")
    parser.add_argument(
        "--superlink",
        "--federation",
        dest="superlink",
        default=DEFAULT_CONNECTION,
        metavar="NAME",
        help=(
            "SuperLink connection in $FLWR_HOME/config.toml, as written by `corolla server` "
            f"(default: {DEFAULT_CONNECTION}); --federation is an alias"
        ),
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a run-config value; repeatable")
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help=(
            "run directory on the SuperLink's machine, made absolute here "
            "(default: runs/<time>-<experiment> under the working directory)"
        ),
    )
    parser.add_argument(
        "--timeout", type=positive_seconds, default=3600.0, metavar="SECONDS", help="how long to wait for the run (default: 3600)"
    )
    parser.add_argument(
        "--app",
        type=Path,
        metavar="DIR",
        help="Flower App directory to submit (default: the Corolla source checkout, else the working directory)",
    )
    parser.set_defaults(handler=run_run_command)


def find_app_directory(working_directory: Path | None = None) -> Path:
    """Return the directory of Corolla's Flower App.

    That is the parent of the imported ``server`` package when its
    pyproject.toml names Flower App components (a source checkout or an
    editable install), else ``working_directory`` (default: the current one)
    when its pyproject.toml does. A wheel install has no pyproject.toml next
    to the packages, so it needs the working directory or ``--app``.
    """
    import server

    candidates = [Path(server.__file__).resolve().parent.parent, (working_directory or Path.cwd()).resolve()]
    for candidate in candidates:
        if _is_flower_app(candidate):
            return candidate
    raise FileNotFoundError(
        "No Flower App found: neither "
        + " nor ".join(str(candidate) for candidate in candidates)
        + " has a pyproject.toml with [tool.flwr.app.components]; run from the Corolla checkout or pass --app."
    )


def _is_flower_app(directory: Path) -> bool:
    pyproject = directory / "pyproject.toml"
    if not pyproject.is_file():
        return False
    with pyproject.open("rb") as file:
        project = tomllib.load(file)
    return bool(project.get("tool", {}).get("flwr", {}).get("app", {}).get("components"))


def check_run_directory_unused(out_dir: Path) -> None:
    """Raise ConfigError when ``out_dir`` exists here and contains a run, which a new run would overwrite.

    The run directory is on the SuperLink's machine, so only a directory that
    this machine can see is checked.
    """
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConfigError(f"Invalid run directory {out_dir}: it is a file, not a directory; choose another --out.")
    from server.results import existing_run_files

    existing = existing_run_files(out_dir)
    if existing:
        raise ConfigError(
            f"Run directory {out_dir} already contains a run ({', '.join(existing)}), which this run would overwrite; "
            "choose another --out or remove that directory."
        )


def run_run_command(args: argparse.Namespace) -> int:
    """Submit the experiment, wait for the run, and print its status and final accuracy."""
    overrides = parse_overrides(args.set)
    if args.out is not None:
        if "out-dir" in overrides:
            raise ConfigError(
                f"--out {args.out} and --set out-dir={overrides['out-dir']} both set the run directory; keep one of them."
            )
        overrides["out-dir"] = str(args.out.expanduser().resolve())
    run_config = resolve_run_config(args.experiment, overrides)
    check_run_config(run_config, [key for key in overrides if key != "out-dir"])
    if not run_config["out-dir"]:
        from server.results import default_run_directory

        run_config["out-dir"] = str(default_run_directory(args.experiment))
    elif not Path(str(run_config["out-dir"])).is_absolute():
        run_config["out-dir"] = str(Path(str(run_config["out-dir"])).expanduser().resolve())
    check_run_directory_unused(Path(str(run_config["out-dir"])))
    app_dir = args.app.resolve() if args.app is not None else find_app_directory()

    run_id = submit_run(app_dir, args.superlink, run_config, echo=print_command)
    print(f"Run {run_id} submitted; results go to {run_config['out-dir']} on the SuperLink's machine.")
    # When the SuperLink runs on this machine, the run's events file is readable here and
    # each finished round prints a line. Otherwise the command stays quiet until the run ends.
    events_path = Path(str(run_config["out-dir"])) / "events.jsonl"
    try:
        with ProgressDisplay(events_path, int(run_config["num-server-rounds"])):
            status = wait_for_run(run_id, args.superlink, args.timeout, check=False, echo=print_command)
    except TimeoutError as error:
        print(f"Timed out: {error}", file=sys.stderr)
        _print_run_log_tail(run_id, args.superlink)
        return EXIT_RUN_TIMED_OUT

    details = f" ({status.details})" if status.details else ""
    print(f"Run {run_id}: {status.status}{details}")
    if not status.succeeded:
        _print_run_log_tail(run_id, args.superlink)
        return EXIT_RUN_FAILED

    summary_path = Path(str(run_config["out-dir"])) / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        accuracy = summary.get("final", {}).get("accuracy")
        if accuracy is not None:
            print(f"Final central accuracy: {accuracy:.4f} ({summary_path})")
    else:
        print(f"No {summary_path} on this machine; the ServerApp wrote it on the SuperLink's machine.")
    return 0


def _print_run_log_tail(run_id: int, connection: str) -> None:
    try:
        log_text = fetch_run_log(run_id, connection, echo=print_command)
    except FlowerCommandError as error:
        print(f"Could not fetch the run's log: {error}", file=sys.stderr)
        return
    lines = log_text.strip().splitlines()[-_LOG_LINES_ON_FAILURE:]
    print(f"Last {len(lines)} lines of the run's log:", file=sys.stderr)
    for line in lines:
        print(f"  {line}", file=sys.stderr)


# ---------------------------------------------------------------------------
# Foreground processes
# ---------------------------------------------------------------------------


def _run_foreground(
    command: list[str], on_start: Callable[[subprocess.Popen], None] | None = None
) -> int:
    """Run a Flower server process until it exits, and return its exit code.

    ``on_start`` runs with the started process, before the wait. If it raises,
    the process is stopped and the error propagates. Ctrl-C reaches the child
    through the terminal's process group, and SIGTERM to this process is passed
    on. A child still running 10 s after Ctrl-C is killed.
    """
    process = subprocess.Popen(command, env=flower_environment())

    def forward_sigterm(signum: int, frame: object) -> None:
        process.terminate()

    previous_handler = signal.signal(signal.SIGTERM, forward_sigterm)
    try:
        if on_start is not None:
            on_start(process)
        return process.wait()
    except KeyboardInterrupt:
        return _wait_or_kill(process)
    except BaseException:
        process.terminate()
        _wait_or_kill(process)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _wait_or_kill(process: subprocess.Popen, timeout: float = 10.0) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()
