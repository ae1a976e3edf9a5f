"""Tests of the deployment layer: certificates, Flower commands and a real TLS federation.

The slow test starts a SuperLink and SuperNodes on loopback through the
``corolla`` CLI, with ``FLWR_HOME`` in a temporary directory, and stops every
process it started.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.verification import PolicyBuilder, Store

from client.launch import node_config_string, parse_partition, supernode_command
from corolla.deploy_cli import add_deploy_commands, find_app_directory
from server import launch
from server.launch import (
    RunFailedError,
    RunStatus,
    find_certificates,
    register_node,
    run_config_overrides,
    superlink_address,
    superlink_command,
    wait_for_run,
    write_certificates,
    write_connection,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> launch.CertificatePaths:
    return write_certificates(tmp_path_factory.mktemp("certs"), ["node-0", "node-1"])


def _load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# ---------------------------------------------------------------------------
# Certificates and node keys
# ---------------------------------------------------------------------------


def test_server_certificate_verifies_against_ca(certificates: launch.CertificatePaths) -> None:
    ca = _load_certificate(certificates.ca_certificate)
    server = _load_certificate(certificates.server_certificate)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("localhost"))

    chain = verifier.verify(server, [])

    assert chain[0] == server
    assert chain[-1] == ca


def test_server_certificate_names_loopback_hosts(certificates: launch.CertificatePaths) -> None:
    server = _load_certificate(certificates.server_certificate)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("::1") in names.get_values_for_type(x509.IPAddress)
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" not in names.get_values_for_type(x509.DNSName)


def test_server_certificate_verifies_for_ip_address(certificates: launch.CertificatePaths) -> None:
    ca = _load_certificate(certificates.ca_certificate)
    server = _load_certificate(certificates.server_certificate)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(
        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    )

    assert verifier.verify(server, [])[-1] == ca


def test_server_certificate_rejects_other_host(certificates: launch.CertificatePaths) -> None:
    ca = _load_certificate(certificates.ca_certificate)
    server = _load_certificate(certificates.server_certificate)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("example.org"))

    with pytest.raises(x509.verification.VerificationError):
        verifier.verify(server, [])


def test_node_public_key_is_openssh_p384(certificates: launch.CertificatePaths) -> None:
    node = certificates.node("node-0")
    text = node.public_key.read_text()

    public_key = load_ssh_public_key(node.public_key.read_bytes())

    assert text.startswith("ecdsa-sha2-nistp384 ")
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP384R1)


def test_node_private_key_matches_public_key(certificates: launch.CertificatePaths) -> None:
    node = certificates.node("node-1")

    private_key = load_ssh_private_key(node.private_key.read_bytes(), None)
    public_key = load_ssh_public_key(node.public_key.read_bytes())

    assert isinstance(private_key, ec.EllipticCurvePrivateKey)
    assert private_key.public_key().public_numbers() == public_key.public_numbers()


def test_node_public_key_accepted_by_flower(certificates: launch.CertificatePaths) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    assert try_load_public_key(certificates.node("node-0").public_key)


def test_private_keys_have_mode_0600(certificates: launch.CertificatePaths) -> None:
    private_files = [certificates.ca_key, certificates.server_key] + [node.private_key for node in certificates.nodes]

    for path in private_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_write_certificates_keeps_existing_files(tmp_path: Path) -> None:
    write_certificates(tmp_path, ["node-0"])
    before = (tmp_path / "ca.crt").read_bytes()

    with pytest.raises(FileExistsError, match="ca.crt"):
        write_certificates(tmp_path, ["node-0"])

    assert (tmp_path / "ca.crt").read_bytes() == before


def test_write_certificates_overwrites_when_asked(tmp_path: Path) -> None:
    write_certificates(tmp_path, ["node-0"])
    before = (tmp_path / "node-0.pub").read_bytes()

    write_certificates(tmp_path, ["node-0"], overwrite=True)

    assert (tmp_path / "node-0.pub").read_bytes() != before
    assert stat.S_IMODE((tmp_path / "node-0.key").stat().st_mode) == 0o600


@pytest.mark.parametrize("names", [["bad/name"], ["server"], ["ca"], ["a", "a"], [""], ["-x"]])
def test_write_certificates_rejects_node_name(tmp_path: Path, names: list[str]) -> None:
    with pytest.raises(ValueError):
        write_certificates(tmp_path, names)

    assert not (tmp_path / "ca.crt").exists()


def test_find_certificates_lists_nodes(certificates: launch.CertificatePaths) -> None:
    found = find_certificates(certificates.directory)

    assert [node.name for node in found.nodes] == ["node-0", "node-1"]
    assert found.server_key == certificates.server_key


def test_find_certificates_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="corolla certs"):
        find_certificates(tmp_path)


# ---------------------------------------------------------------------------
# Command builders
# ---------------------------------------------------------------------------


def test_superlink_command_enables_tls_and_auth(certificates: launch.CertificatePaths) -> None:
    command = superlink_command(certificates, port=9123)

    assert command[0] == str(Path(sys.executable).parent / "flower-superlink")
    assert command[command.index("--ssl-ca-certfile") + 1] == str(certificates.ca_certificate)
    assert command[command.index("--ssl-certfile") + 1] == str(certificates.server_certificate)
    assert command[command.index("--ssl-keyfile") + 1] == str(certificates.server_key)
    assert "--enable-supernode-auth" in command
    assert "--disable-runtime-dependency-installation" in command
    assert "--insecure" not in command
    assert command[command.index("--port") + 1] == "9123"


def test_superlink_command_accepted_by_flower(certificates: launch.CertificatePaths) -> None:
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

    command = superlink_command(certificates, database=certificates.directory / "state.db")
    args = _parse_args_run_superlink().parse_args(command[1:])

    assert args.enable_supernode_auth
    assert args.runtime_dependency_install is False
    assert args.ssl_certfile == str(certificates.server_certificate)


def test_superlink_address_for_bind_all_hosts() -> None:
    assert superlink_address("0.0.0.0", 8000) == "127.0.0.1:8000"
    assert superlink_address("::", 8000) == "[::1]:8000"
    assert superlink_address("example.org", 9092) == "example.org:9092"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2/2", "must be in 0..1"),
        ("-1/2", "must be in 0..1"),
        ("a/2", "must be integers"),
        ("1", "expected I/N"),
        ("1/2/3", "expected I/N"),
        ("0/0", "at least 1"),
        ("", "expected I/N"),
    ],
)
def test_parse_partition_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_partition(text)


def test_parse_partition_accepts_valid() -> None:
    assert parse_partition("0/2") == (0, 2)
    assert parse_partition(" 3/4 ") == (3, 4)


def test_supernode_command_with_partition(certificates: launch.CertificatePaths) -> None:
    node = certificates.node("node-0")

    command = supernode_command("127.0.0.1:9092", certificates.ca_certificate, node.private_key, (1, 2), runtime_port=9301)

    assert command[0] == str(Path(sys.executable).parent / "flower-supernode")
    assert command[command.index("--superlink") + 1] == "127.0.0.1:9092"
    assert command[command.index("--root-certificates") + 1] == str(certificates.ca_certificate)
    assert command[command.index("--auth-supernode-private-key") + 1] == str(node.private_key)
    assert command[command.index("--node-config") + 1] == "partition-id=1 num-partitions=2"
    assert command[command.index("--port") + 1] == "9301"
    assert "--insecure" not in command
    assert "--allow-runtime-dependency-installation" not in command


def test_supernode_command_accepted_by_flower(certificates: launch.CertificatePaths, tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    data_dir = tmp_path / "node data's"
    command = supernode_command("[::1]:9092", certificates.ca_certificate, None, data_dir=data_dir)
    args = _parse_args_run_supernode().parse_args(command[1:])

    assert parse_config_args([args.node_config]) == {"data-dir": str(data_dir)}
    assert args.runtime_dependency_install is False


def test_node_config_passes_any_data_directory(tmp_path: Path) -> None:
    """A data directory whose name has both quote characters reaches the SuperNode intact."""
    from flwr.common.config import parse_config_args

    data_dir = tmp_path / "it's \"odd\" data"

    assert parse_config_args([node_config_string(data_dir=data_dir)]) == {"data-dir": str(data_dir)}


def test_supernode_command_rejects_bad_address(certificates: launch.CertificatePaths) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        supernode_command("https://127.0.0.1", certificates.ca_certificate, None, (0, 1))


def test_node_config_requires_one_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        node_config_string(None, None)
    with pytest.raises(ValueError, match="exactly one"):
        node_config_string((0, 1), tmp_path)


def _write_app(directory: Path, config: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(
        "[tool.flwr.app.components]\nserverapp = 'a:app'\nclientapp = 'b:app'\n"
        f"[tool.flwr.app.config]\n{config}\n",
        encoding="utf-8",
    )
    return directory


def test_run_config_overrides_keep_differences(tmp_path: Path) -> None:
    app = _write_app(tmp_path, "num-server-rounds = 3\nlr = 0.1\nout-dir = ''\nalpha = 1")

    overrides = run_config_overrides(app, {"num-server-rounds": 3, "lr": 0.2, "out-dir": "/x", "alpha": 1.0})

    assert overrides == {"lr": 0.2, "out-dir": "/x", "alpha": 1.0}


def test_run_config_overrides_reject_undeclared_key(tmp_path: Path) -> None:
    app = _write_app(tmp_path, "lr = 0.1")

    with pytest.raises(ValueError, match="num-server-rounds"):
        run_config_overrides(app, {"lr": 0.1, "num-server-rounds": 2})


def test_write_connection_readable_by_flower(tmp_path: Path, certificates: launch.CertificatePaths, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')

    write_connection("corolla-test", "127.0.0.1:9555", certificates.ca_certificate)
    connection = read_superlink_connection("corolla-test")

    assert connection.address == "127.0.0.1:9555"
    assert connection.root_certificates == str(certificates.ca_certificate)
    assert not connection.insecure
    assert read_superlink_connection("local").address == ":local:"
    assert read_superlink_connection(None).name == "local"


def test_wait_for_run_raises_on_failed_run(monkeypatch: pytest.MonkeyPatch) -> None:
    states = iter(["starting", "running", "finished:failed"])
    monkeypatch.setattr(launch, "get_run_status", lambda run_id, connection, echo=None: RunStatus(run_id, next(states), "boom"))

    with pytest.raises(RunFailedError, match="finished:failed") as error:
        wait_for_run(7, "corolla", timeout=10, poll_interval=0.01)

    assert error.value.status.details == "boom"


def test_wait_for_run_returns_failed_status_unchecked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "get_run_status", lambda run_id, connection, echo=None: RunStatus(run_id, "finished:stopped"))

    status = wait_for_run(7, "corolla", timeout=10, poll_interval=0.01, check=False)

    assert status.finished
    assert not status.succeeded


def test_wait_for_run_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "get_run_status", lambda run_id, connection, echo=None: RunStatus(run_id, "running"))

    with pytest.raises(TimeoutError, match="flwr stop 7 corolla"):
        wait_for_run(7, "corolla", timeout=0.05, poll_interval=0.01)


def test_certs_command_writes_named_nodes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="corolla")
    add_deploy_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["certs", "--out", str(tmp_path), "--node", "alice", "--node", "bob"])

    assert args.handler(args) == 0

    assert (tmp_path / "alice.pub").is_file()
    assert (tmp_path / "bob.key").is_file()
    assert "server.pem" in capsys.readouterr().out


def test_find_app_directory_is_repository_root() -> None:
    assert find_app_directory() == REPO_ROOT


# ---------------------------------------------------------------------------
# A deployed federation on loopback
# ---------------------------------------------------------------------------

# The two-round run of the slow test took about 30 s on a 2-core VM, and its whole
# test about 60 s, because each SuperNode polls every 3 s and starts a ClientApp
# process per message.
RUN_TIMEOUT_S = 100
STARTUP_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _port_is_free(port: int) -> bool:
    """Return whether nothing listens on ``port``. TIME_WAIT leftovers of closed connections do not count."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _processes_with_marker(marker: str) -> list[int]:
    """Return the ids of live processes whose environment contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environment = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in environment.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


@dataclass
class Federation:
    """Processes and paths of one loopback federation. ``stop`` ends every process."""

    root: Path
    environment: dict[str, str]
    marker: str
    port: int
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, arguments: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        process = subprocess.Popen(
            [sys.executable, "-m", "corolla", *arguments],
            cwd=self.root,
            env=self.environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches Flower's children
        )
        log.close()
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def flwr(self, *arguments: str) -> dict:
        completed = subprocess.run(
            [launch.flower_executable("flwr"), *arguments, "--format", "json"],
            env=self.environment,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return json.loads(completed.stdout)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        # Flower detaches the SuperLink's SuperExec into its own session. It exits
        # when its parent does, so give it a moment before killing leftovers.
        deadline = time.monotonic() + 10
        while _processes_with_marker(self.marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in _processes_with_marker(self.marker):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def federation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Federation:
    if not Path("/proc/self/environ").exists():
        pytest.skip("finding leftover processes needs Linux /proc")
    home = tmp_path / "flwr-home"
    home.mkdir()
    # Set in this process too, for the `flwr` commands that server.launch runs. PATH
    # lacks the interpreter's directory, as when the virtual environment is not
    # activated, so every Flower command must be found next to the interpreter.
    scripts_dir = Path(sys.executable).parent
    path_entries = [entry for entry in os.environ.get("PATH", "").split(os.pathsep) if entry and Path(entry) != scripts_dir]
    flower_settings = {
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": os.pathsep.join(path_entries),
    }
    for name, value in flower_settings.items():
        monkeypatch.setenv(name, value)
    environment = dict(os.environ)
    environment.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        COROLLA_TEST_MARKER=str(tmp_path),
    )
    running = Federation(tmp_path, environment, f"COROLLA_TEST_MARKER={tmp_path}", _free_port())
    yield running
    running.stop()

    assert _processes_with_marker(running.marker) == []
    assert _port_is_free(running.port), f"SuperLink port {running.port} still bound"
    for name in running.processes:
        for port in re.findall(r"--port (\d+)", running.log(name)):
            assert _port_is_free(int(port)), f"port {port} of {name} still bound"


def _wait_for(condition, timeout: float, describe: str, federation: Federation) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {name}\n{federation.log(name)[-3000:]}" for name in federation.processes)
            raise AssertionError(f"Timed out after {timeout} s waiting for {describe}\n{logs}")
        time.sleep(0.5)


def _round_accuracies(events_path: Path) -> dict[int, float]:
    """Return central accuracy by round from an ``events.jsonl`` in protobuf's JSON mapping."""
    accuracies = {}
    for line in events_path.read_text().splitlines():
        event = json.loads(line)
        if "roundMetrics" in event and "accuracy" in event["roundMetrics"].get("central", {}):
            accuracies[int(event.get("round", 0))] = event["roundMetrics"]["central"]["accuracy"]
    return accuracies


def _start_superlink(federation: Federation, certs: Path) -> None:
    """Start `corolla server` and wait until it has written the connection, which it does once the SuperLink is up."""
    config_path = Path(federation.environment["FLWR_HOME"]) / "config.toml"

    def connection_written() -> bool:
        return config_path.is_file() and "loopback" in tomllib.loads(config_path.read_text()).get("superlink", {})

    federation.start("superlink", ["server", "--certs", str(certs), "--port", str(federation.port), "--connection", "loopback"])
    _wait_for(connection_written, STARTUP_TIMEOUT_S, "the SuperLink connection", federation)
    assert not _port_is_free(federation.port)


def _corolla_run(federation: Federation, out_dir: Path, *settings: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "corolla", "run", "digits-fedavg", "--superlink", "loopback"]
    for setting in settings:
        command += ["--set", setting]
    command += ["--out", str(out_dir), "--timeout", str(RUN_TIMEOUT_S)]
    return subprocess.run(
        command,
        cwd=federation.root,
        env=federation.environment,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S + 60,
    )


@pytest.mark.slow
def test_tls_federation_trains_and_rejects_unknown_node(federation: Federation) -> None:
    certs = federation.root / "certs"
    out_dir = federation.root / "run"
    address = f"127.0.0.1:{federation.port}"
    write_certificates(certs, ["node-0", "node-1", "intruder"])

    _start_superlink(federation, certs)
    node_ids = [register_node(certs / f"{name}.pub", "loopback") for name in ("node-0", "node-1")]
    assert len(set(node_ids)) == 2

    for index in (0, 1):
        federation.start(
            f"node-{index}",
            ["client", "--server", address, "--partition", f"{index}/2", "--certs", str(certs), "--node-key", str(certs / f"node-{index}.key")],
        )
    intruder = federation.start(
        "intruder",
        ["client", "--server", address, "--partition", "0/2", "--certs", str(certs), "--node-key", str(certs / "intruder.key")],
    )

    def both_nodes_online() -> bool:
        nodes = federation.flwr("supernode", "ls", "loopback").get("nodes", [])
        return sum(node["status"] == "online" for node in nodes) == 2

    _wait_for(both_nodes_online, STARTUP_TIMEOUT_S, "both registered SuperNodes to come online", federation)

    # Central evaluation measures the accuracy; skipping federated evaluation
    # saves two ClientApp launches per round.
    run = _corolla_run(federation, out_dir, "num-clients=2", "num-server-rounds=2", "fraction-evaluate=0.0")

    assert run.returncode == 0, run.stdout + run.stderr
    assert f"$ {Path(sys.executable).parent / 'flwr'} run " in run.stdout
    assert "finished:completed" in run.stdout
    assert "Final central accuracy" in run.stdout

    accuracies = _round_accuracies(out_dir / "events.jsonl")
    summary = json.loads((out_dir / "summary.json").read_text())
    assert sorted(accuracies) == [0, 1, 2]
    assert accuracies[2] > accuracies[0]
    assert summary["final"]["accuracy"] == pytest.approx(accuracies[2])

    assert intruder.wait(timeout=STARTUP_TIMEOUT_S) != 0
    assert "Failed to activate SuperNode" in federation.log("intruder")
    assert f"$ {Path(sys.executable).parent / 'flower-supernode'} " in federation.log("intruder")
    assert f"$ {Path(sys.executable).parent / 'flower-superlink'} " in federation.log("superlink")


@pytest.mark.slow
def test_failed_run_exits_nonzero(federation: Federation) -> None:
    certs = federation.root / "certs"
    write_certificates(certs, [])
    _start_superlink(federation, certs)

    # `corolla run` checks names but not directories, so the ServerApp is the first to
    # reject this data directory, before it needs any SuperNode.
    run = _corolla_run(federation, federation.root / "run", "data-dir=/no-such-data-dir")

    assert run.returncode == 1, run.stdout + run.stderr
    assert "finished:failed" in run.stdout
    assert "no-such-data-dir" in run.stderr
