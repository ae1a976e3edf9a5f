"""Build the ``flower-supernode`` command that serves Corolla's ClientApp on one node.

A node's data assignment travels in Flower's node config: ``partition-id`` and
``num-partitions`` for a share of the run's dataset, or ``data-dir`` for a
directory with the node's own files (see ``client.node_data``). The SuperNode
connects to the SuperLink over TLS and, when the SuperLink enables node
authentication, signs its requests with the node's private key.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from pathlib import Path

from server.launch import flower_executable
from simulations.flower_run_config import format_run_config

# In Flower 1.42 a SuperNode serves the runtime API that its ClientApp processes
# call on --host/--port, 127.0.0.1:9094 by default. Flower 1.42 rejects the older
# --clientappio-api-address option.
DEFAULT_RUNTIME_PORT = 9094


def parse_partition(text: str) -> tuple[int, int]:
    """Parse ``I/N`` into ``(partition_id, num_partitions)`` with ``0 <= I < N``.

    Raises ValueError with the expected form when the text is malformed or out of range.
    """
    parts = text.strip().split("/")
    if len(parts) != 2:
        raise ValueError(f"Invalid partition {text!r}: expected I/N, for example 0/2 for the first of two nodes.")
    try:
        partition_id, num_partitions = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(
            f"Invalid partition {text!r}: I and N in I/N must be integers, for example 1/4."
        ) from None
    if num_partitions < 1:
        raise ValueError(f"Invalid partition {text!r}: the number of partitions N must be at least 1.")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"Invalid partition {text!r}: the partition id I must be in 0..{num_partitions - 1} "
            f"for N = {num_partitions} (ids count from 0)."
        )
    return partition_id, num_partitions


def node_config_string(partition: tuple[int, int] | None = None, data_dir: Path | None = None) -> str:
    """Return the ``--node-config`` value for exactly one of ``partition`` or ``data_dir``.

    ``data_dir`` is made absolute, because the ClientApp runs in its own
    process whose working directory is not the caller's. Flower 1.42 reads
    each value as TOML, so the path is written as a quoted TOML string with
    quotes and control characters escaped (see ``simulations.flower_run_config``).
    """
    if (partition is None) == (data_dir is None):
        raise ValueError("Give exactly one of a partition (I/N) or a data directory.")
    if partition is not None:
        partition_id, num_partitions = partition
        if not 0 <= partition_id < num_partitions:
            raise ValueError(f"Invalid partition {partition_id}/{num_partitions}: need 0 <= I < N.")
        return f"partition-id={partition_id} num-partitions={num_partitions}"

    path = str(Path(data_dir).expanduser().resolve())
    return " ".join(format_run_config({"data-dir": path}))


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free when this function checked it.

    NOTE: another process may take the port before the SuperNode binds it, in
    which case the SuperNode exits with an address-in-use error.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def supernode_command(
    server: str,
    root_certificates: Path,
    private_key: Path | None,
    partition: tuple[int, int] | None = None,
    data_dir: Path | None = None,
    *,
    runtime_port: int = DEFAULT_RUNTIME_PORT,
    runtime_host: str = "127.0.0.1",
    max_retries: int | None = None,
    max_wait_time: float | None = None,
    executable: str | None = None,
) -> list[str]:
    """Build the ``flower-supernode`` command for one node.

    ``server`` is the SuperLink's ``host:port``, verified against the CA
    certificate ``root_certificates``. ``private_key`` is the node's OpenSSH
    EC key, required when the SuperLink runs with ``--enable-supernode-auth``.
    ``runtime_port`` binds the SuperNode's local runtime API, which its
    ClientApp processes call; two SuperNodes on one machine need two ports.
    Flower 1.42's SuperNode never installs app dependencies unless
    ``--allow-runtime-dependency-installation`` is given, and this command never gives it.
    ``max_retries`` and ``max_wait_time`` (seconds) limit how long the node retries
    a SuperLink it cannot reach before it exits with an error; without them it
    retries forever. ``executable`` defaults to :func:`flower_executable`'s
    ``flower-supernode``.
    """
    if not (1 <= runtime_port <= 65535):
        raise ValueError(f"Invalid runtime port {runtime_port}: it must be in 1..65535.")
    check_server_address(server)
    if max_retries is not None and max_retries < 0:
        raise ValueError(f"Invalid max_retries = {max_retries}: it must be 0 or more.")
    if max_wait_time is not None and not (math.isfinite(max_wait_time) and max_wait_time > 0):
        raise ValueError(f"Invalid max_wait_time = {max_wait_time}: it must be a positive number of seconds.")
    root_certificates = Path(root_certificates).expanduser().resolve()
    if not root_certificates.is_file():
        raise FileNotFoundError(f"CA certificate {root_certificates} not found; copy ca.crt from the server's certificate directory.")

    command = [
        executable or flower_executable("flower-supernode"),
        "--superlink", server,
        "--root-certificates", str(root_certificates),
    ]
    if private_key is not None:
        private_key = Path(private_key).expanduser().resolve()
        if not private_key.is_file():
            raise FileNotFoundError(f"Node private key {private_key} not found.")
        command += ["--auth-supernode-private-key", str(private_key)]
    command += [
        "--node-config", node_config_string(partition, data_dir),
        "--host", runtime_host,
        "--port", str(runtime_port),
    ]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        command += ["--max-wait-time", str(max_wait_time)]
    return command


def check_server_address(server: str) -> None:
    """Raise ValueError unless ``server`` is a SuperLink address ``HOST:PORT`` as Flower reads it.

    An IPv6 host needs brackets, as in ``[::1]:8000``, and the address has no
    scheme, because the SuperNode always connects over TLS.
    """
    example = "for example 127.0.0.1:8000 or [::1]:8000"
    if "://" in server:
        without_scheme = server.split("://", 1)[1]
        try:
            check_server_address(without_scheme)
            suggestion = f"here {without_scheme!r}"
        except ValueError:
            suggestion = example
        raise ValueError(f"Invalid SuperLink address {server!r}: give HOST:PORT without a scheme, {suggestion}.")
    host, separator, port = server.rpartition(":")
    if not separator or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"Invalid SuperLink address {server!r}: expected HOST:PORT with a port in 1..65535, {example}.")
    if host.startswith("[") or host.endswith("]"):
        inner = host[1:-1] if host.startswith("[") and host.endswith("]") else ""
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(
                f"Invalid SuperLink address {server!r}: brackets must contain an IPv6 address, {example}."
            ) from None
    elif ":" in host:
        raise ValueError(
            f"Invalid SuperLink address {server!r}: put an IPv6 address in brackets, here [{host}]:{port}."
        )
    elif any(character.isspace() for character in host):
        raise ValueError(f"Invalid SuperLink address {server!r}: the host contains white space; give HOST:PORT, {example}.")
