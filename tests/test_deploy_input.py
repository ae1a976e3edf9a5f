"""Input checks of the deployment commands, run through ``corolla.cli.main`` where a user would.

Every test here is fast: the commands are rejected before they start a Flower
process, or the test builds a command line and parses it with Flower's own
parser. The one slow test starts a single SuperNode on loopback.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.launch import supernode_command
from corolla import deploy_cli
from corolla.cli import main
from server import launch
from server.launch import (
    find_certificates,
    log_command,
    register_node_command,
    run_command,
    status_command,
    superlink_command,
    write_certificates,
    write_connection,
)
from simulations import ray_engine

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS_DIR = Path(sys.executable).parent


@pytest.fixture(scope="module")
def certificates_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_certificates(tmp_path_factory.mktemp("certs"), ["node-0"]).directory


def _server_names(certificate_file: Path) -> list[str]:
    certificate = x509.load_pem_x509_certificate(certificate_file.read_bytes())
    alt_names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(alt_names.get_values_for_type(x509.DNSName)) + [
        str(address) for address in alt_names.get_values_for_type(x509.IPAddress)
    ]


def _listening_port() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


def _path_without_scripts_dir() -> str:
    entries = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(entry for entry in entries if entry and Path(entry) != SCRIPTS_DIR)


# ---------------------------------------------------------------------------
# Flower executables
# ---------------------------------------------------------------------------


def test_commands_use_interpreter_scripts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Flower command resolves next to the interpreter when PATH lacks the virtual environment."""
    monkeypatch.setenv("PATH", str(tmp_path))
    certificates = write_certificates(tmp_path / "certs", ["node-0"])

    commands = {
        "flower-superlink": superlink_command(certificates),
        "flower-supernode": supernode_command("127.0.0.1:9092", certificates.ca_certificate, None, (0, 1)),
        "flwr": register_node_command(certificates.node("node-0").public_key, "corolla"),
    }
    for name, command in commands.items():
        assert command[0] == str(SCRIPTS_DIR / name), name
    for command in (run_command(REPO_ROOT, "corolla", {}), status_command(1, "corolla"), log_command(1, "corolla")):
        assert command[0] == str(SCRIPTS_DIR / "flwr")


def test_ray_engine_shares_executable_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    assert ray_engine._flower_executable("flower-superlink") == str(SCRIPTS_DIR / "flower-superlink")
    with pytest.raises(ray_engine.RayEngineError, match="install.sh"):
        ray_engine._flower_executable("flower-no-such-command")


def test_missing_executable_names_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(FileNotFoundError) as raised:
        launch.flower_executable("flower-no-such-command")

    message = str(raised.value)
    assert "flower-no-such-command" in message
    assert "./install.sh" in message
    assert "activate" in message


def test_flower_environment_puts_scripts_first() -> None:
    """Flower starts flower-superexec, flwr-serverapp and flwr-clientapp by name, so PATH must find them."""
    environment = launch.flower_environment({"PATH": "/usr/bin:/bin"})

    entries = environment["PATH"].split(os.pathsep)
    assert entries[0] == str(SCRIPTS_DIR)
    assert entries[-2:] == ["/usr/bin", "/bin"]
    assert environment["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


# ---------------------------------------------------------------------------
# corolla certs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "hint"),
    [
        ("", "empty"),
        ("a" * 300, "300 characters"),
        ("a" * 64 + ".org", "64 characters"),
        ("my host", "labels of letters"),
        ("*", "wildcard"),
        ("*.example.org", "wildcard"),
        ("https://x:8000", "without a scheme"),
        ("127.0.0.1:8000", "without a port"),
        ("[::1]", "without brackets"),
        ("example.org.", "trailing dot"),
        ("-bad.example.org", "labels of letters"),
        ("1.2.3", "all-digit"),
        ("fe80::1%eth0", "zone"),
    ],
)
def test_certs_rejects_host(tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str, hint: str) -> None:
    out = tmp_path / "certs"

    code = main(["certs", "--out", str(out), "--nodes", "1", f"--server-host={host}"])

    error = capsys.readouterr().err
    assert code == 2
    assert f"--server-host {host!r}" in error
    assert hint in error
    assert not out.exists()


@pytest.mark.parametrize(("first", "second"), [("localhost", "localhost"), ("localhost", "LocalHost"), ("::1", "0:0::1")])
def test_certs_rejects_duplicate_host(tmp_path: Path, capsys: pytest.CaptureFixture[str], first: str, second: str) -> None:
    out = tmp_path / "certs"

    code = main(["certs", "--out", str(out), "--nodes", "1", "--server-host", first, "--server-host", second])

    error = capsys.readouterr().err
    assert code == 2
    assert f"Duplicate --server-host {second!r}" in error
    assert not out.exists()


def test_certs_rerun_after_rejected_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--nodes", "1", "--server-host", ""]) == 2

    assert main(["certs", "--out", str(out), "--nodes", "1", "--server-host", "localhost"]) == 0

    assert _server_names(out / "server.pem") == ["localhost"]


def test_certs_accepts_longest_dns_name(tmp_path: Path) -> None:
    """A valid DNS name longer than the 64 characters of an X.509 common name still works."""
    long_name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(long_name) == 253

    code = main(["certs", "--out", str(tmp_path), "--nodes", "1", "--server-host", long_name, "--server-host", "10.0.0.7"])

    assert code == 0
    assert _server_names(tmp_path / "server.pem") == [long_name, "10.0.0.7"]


def test_certs_overwrite_removes_stale_nodes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "--out", str(tmp_path), "--nodes", "3"]) == 0
    (tmp_path / "notes.txt").write_text("kept")
    (tmp_path / "node-x.key").write_text("kept: not a numbered node file")
    capsys.readouterr()

    code = main(["certs", "--out", str(tmp_path), "--nodes", "1", "--overwrite"])

    output = capsys.readouterr().out
    assert code == 0
    assert [node.name for node in find_certificates(tmp_path).nodes] == ["node-0"]
    for name in ("node-1.key", "node-1.pub", "node-2.key", "node-2.pub"):
        assert not (tmp_path / name).exists(), name
        assert name in output
    assert (tmp_path / "notes.txt").read_text() == "kept"
    assert (tmp_path / "node-x.key").exists()


def test_certs_overwrite_reports_other_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "--out", str(tmp_path), "--node", "alice"]) == 0
    capsys.readouterr()

    code = main(["certs", "--out", str(tmp_path), "--nodes", "1", "--overwrite"])

    output = capsys.readouterr().out
    assert code == 0
    assert (tmp_path / "alice.pub").exists()
    assert "Kept other public keys: alice.pub" in output


def test_certs_existing_files_is_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "--out", str(tmp_path), "--nodes", "1"]) == 0
    before = (tmp_path / "ca.crt").read_bytes()
    capsys.readouterr()

    code = main(["certs", "--out", str(tmp_path), "--nodes", "1"])

    error = capsys.readouterr().err
    assert code == 2
    assert "ca.crt" in error
    assert "--out" in error
    assert "--overwrite" in error
    assert (tmp_path / "ca.crt").read_bytes() == before


@pytest.mark.parametrize("below", [False, True])
def test_certs_out_file_is_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], below: bool) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    out = a_file / "certs" if below else a_file

    code = main(["certs", "--out", str(out), "--nodes", "1"])

    error = capsys.readouterr().err
    assert code == 2
    assert f"{a_file} is a file" in error
    assert "choose another --out" in error


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_certs_read_only_out_is_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tmp_path.chmod(0o500)
    try:
        code = main(["certs", "--out", str(tmp_path), "--nodes", "1"])
    finally:
        tmp_path.chmod(0o700)

    error = capsys.readouterr().err
    assert code == 2
    assert "permission denied" in error
    assert "--out" in error


# ---------------------------------------------------------------------------
# corolla server
# ---------------------------------------------------------------------------


def _write_loopback_connection(certificates: launch.CertificatePaths) -> Path:
    return write_connection("corolla", "127.0.0.1:9999", certificates.ca_certificate)


def test_server_port_in_use_keeps_connection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certificates = write_certificates(tmp_path / "certs", ["node-0"])
    config_path = _write_loopback_connection(certificates)
    before = config_path.read_text()
    other_certificates = write_certificates(tmp_path / "other", ["node-0"])

    with _listening_port() as listener:
        port = listener.getsockname()[1]
        code = main(["server", "--certs", str(other_certificates.directory), "--port", str(port)])

    error = capsys.readouterr().err
    assert code == 2
    assert f"Port {port} on 127.0.0.1 is already in use" in error
    assert "--port" in error
    assert config_path.read_text() == before


def test_server_foreign_host_keeps_connection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 192.0.2.1 is reserved for documentation (RFC 5737), so it is no address of this machine.
    certificates = write_certificates(tmp_path / "certs", [], ["192.0.2.1", "127.0.0.1"])
    config_path = _write_loopback_connection(certificates)
    before = config_path.read_text()

    code = main(["server", "--certs", str(certificates.directory), "--host", "192.0.2.1", "--port", "18000"])

    error = capsys.readouterr().err
    assert code == 2
    assert "Invalid --host '192.0.2.1'" in error
    assert config_path.read_text() == before


def test_server_rejects_uncovered_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A certificate for localhost only fails the SuperExec, which dials 127.0.0.1."""
    out = tmp_path / "c_lh"
    assert main(["certs", "--out", str(out), "--nodes", "1", "--server-host", "localhost"]) == 0
    capsys.readouterr()

    code = main(["server", "--certs", str(out), "--port", "18120"])

    error = capsys.readouterr().err
    assert code == 2
    assert str(out / "server.pem") in error
    assert "valid for localhost, but not for 127.0.0.1" in error
    assert not (launch.flwr_home() / "config.toml").exists()

    fix = re.search(r"include it: (corolla certs .*?), then", error)
    assert fix is not None, error
    assert main(shlex.split(fix.group(1))[1:]) == 0
    assert sorted(_server_names(out / "server.pem")) == ["127.0.0.1", "localhost"]
    launch.check_superlink_certificate(find_certificates(out), "127.0.0.1")


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_default_certificate_covers_local_hosts(certificates_dir: Path, host: str) -> None:
    launch.check_superlink_certificate(find_certificates(certificates_dir), launch.superlink_host(host))


@pytest.mark.parametrize(
    ("names", "host", "covered"),
    [
        (["*.example.org"], "a.example.org", True),
        (["*.example.org"], "A.Example.org", True),
        (["*.example.org"], "example.org", False),
        (["*.example.org"], "a.b.example.org", False),
        (["::1"], "0:0::1", True),
        (["127.0.0.1"], "localhost", False),
    ],
)
def test_certificate_names_host(names: list[str], host: str, covered: bool) -> None:
    assert launch.certificate_names_host(names, host) is covered


def test_server_rejects_garbage_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certificates = write_certificates(tmp_path, [])
    certificates.server_key.write_text("not a key\n")

    code = main(["server", "--certs", str(tmp_path), "--port", "18121"])

    error = capsys.readouterr().err
    assert code == 2
    assert f"Invalid SuperLink private key {certificates.server_key}" in error
    assert "corolla certs" in error
    assert "Traceback" not in error


def test_server_rejects_mismatched_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certificates = write_certificates(tmp_path, [])
    other_key = ec.generate_private_key(ec.SECP384R1())
    certificates.server_key.write_bytes(
        other_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )

    code = main(["server", "--certs", str(tmp_path), "--port", "18122"])

    error = capsys.readouterr().err
    assert code == 2
    assert f"{certificates.server_key} does not belong to the certificate {certificates.server_certificate}" in error


def test_server_rejects_certificate_of_other_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certificates = write_certificates(tmp_path / "a", [])
    other = write_certificates(tmp_path / "b", [])
    certificates.ca_certificate.write_bytes(other.ca_certificate.read_bytes())

    code = main(["server", "--certs", str(certificates.directory), "--port", "18123"])

    error = capsys.readouterr().err
    assert code == 2
    assert f"is not signed by the CA certificate {certificates.ca_certificate}" in error


def test_superlink_host_of_bind_addresses() -> None:
    assert launch.superlink_host("0.0.0.0") == "127.0.0.1"
    assert launch.superlink_host("::") == "::1"
    assert launch.superlink_host("[::1]") == "::1"
    assert ipaddress.ip_address(launch.superlink_host("10.1.2.3")) == ipaddress.ip_address("10.1.2.3")


# ---------------------------------------------------------------------------
# corolla client
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "fix"),
    [
        ("::1:18110", "[::1]:18110"),
        ("https://127.0.0.1:18110", "'127.0.0.1:18110'"),
        ("grpc://[::1]:18110", "'[::1]:18110'"),
        ("[not-ipv6]:18110", "[::1]:8000"),
        ("my host:18110", "127.0.0.1:8000"),
        ("127.0.0.1:0", "1..65535"),
    ],
)
def test_supernode_rejects_address(certificates_dir: Path, server: str, fix: str) -> None:
    with pytest.raises(ValueError) as raised:
        supernode_command(server, certificates_dir / "ca.crt", None, (0, 1))

    assert repr(server) in str(raised.value)
    assert fix in str(raised.value)


@pytest.mark.parametrize("server", ["[::1]:18110", "127.0.0.1:18110", "server.example.org:443"])
def test_supernode_accepts_address(certificates_dir: Path, server: str) -> None:
    command = supernode_command(server, certificates_dir / "ca.crt", None, (0, 1))

    assert command[command.index("--superlink") + 1] == server


def test_client_data_file_is_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], certificates_dir: Path) -> None:
    data_file = tmp_path / "data.csv"
    data_file.write_text("x\n")

    code = main([
        "client", "--server", "127.0.0.1:18110", "--data", str(data_file),
        "--certs", str(certificates_dir), "--node-key", str(certificates_dir / "node-0.key"),
    ])

    error = capsys.readouterr().err
    assert code == 2
    assert f"Invalid --data {data_file}: it is a file, not a directory" in error


def _deploy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corolla")
    deploy_cli.add_deploy_commands(parser.add_subparsers(dest="command"))
    return parser


def test_client_max_wait_time_default(certificates_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    args = _deploy_parser().parse_args(["client", "--server", "127.0.0.1:1", "--partition", "0/1", "--certs", "c", "--node-key", "k"])
    command = supernode_command(
        args.server, certificates_dir / "ca.crt", None, (0, 1), max_wait_time=args.max_wait_time
    )
    flower_args = _parse_args_run_supernode().parse_args(command[1:])
    with pytest.raises(SystemExit):
        _deploy_parser().parse_args(["client", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())

    assert args.max_wait_time == 600
    assert flower_args.max_wait_time == 600
    assert "--max-wait-time SECONDS" in help_text
    assert "(default: 600)" in help_text


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "soon"])
def test_client_rejects_max_wait_time(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        _deploy_parser().parse_args(["client", "--server", "127.0.0.1:1", "--partition", "0/1", "--certs", "c", "--node-key", "k", "--max-wait-time", value])

    assert raised.value.code == 2
    assert f"--max-wait-time: invalid value {value!r}" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# corolla run
# ---------------------------------------------------------------------------

# No connection of this name exists, so a run that passed the checks would fail to submit.
_NO_CONNECTION = "corolla-test-none"


def _run(tmp_path: Path, *arguments: str) -> int:
    return main(["run", "digits-fedavg", "--superlink", _NO_CONNECTION, "--out", str(tmp_path / "run"), *arguments])


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("strategy=nope", "Unknown strategy 'nope'"),
        ("dataset=nope", "Unknown dataset 'nope'"),
        ("model=nope", "Unknown model 'nope'"),
        ("partition=nope", "Unknown partition 'nope'"),
        ("extensions=nope", "Unknown run extension 'nope'"),
        ("proximal-mu=0.5", "does not use proximal-mu"),
    ],
)
def test_run_rejects_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, message: str) -> None:
    code = _run(tmp_path, "--set", setting)

    error = capsys.readouterr().err
    assert code == 2
    assert message in error
    assert "flwr run" not in error


def test_run_rejects_repeated_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = _run(tmp_path, "--set", "lr=0.1", "--set", "lr=0.2")

    error = capsys.readouterr().err
    assert code == 2
    assert "--set lr is given twice (0.1 and 0.2)" in error


def test_run_rejects_out_and_out_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = _run(tmp_path, "--set", f"out-dir={tmp_path / 'other'}")

    assert code == 2
    assert "both set the run directory" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-5", "0", "nan", "inf"])
def test_run_rejects_timeout(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    with pytest.raises(SystemExit) as raised:
        _run(tmp_path, "--timeout", value)

    assert raised.value.code == 2
    assert f"--timeout: invalid value {value!r}" in capsys.readouterr().err


@pytest.mark.parametrize("artifact", ["events.jsonl", "summary.json"])
@pytest.mark.parametrize("option", ["--out", "--set"])
def test_run_rejects_used_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str], artifact: str, option: str) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / artifact).write_text("{}\n")
    destination = ["--out", str(used)] if option == "--out" else ["--set", f"out-dir={used}"]

    code = main(["run", "digits-fedavg", "--superlink", _NO_CONNECTION, *destination])

    error = capsys.readouterr().err
    assert code == 2
    assert f"Run directory {used} already contains a run ({artifact})" in error


def test_run_config_check_accepts_valid() -> None:
    from simulations.experiments import resolve_run_config

    run_config = resolve_run_config("digits-fedavg", {"strategy": "fedprox", "proximal-mu": 0.5})

    deploy_cli.check_run_config(run_config, ["strategy", "proximal-mu"])
    deploy_cli.check_run_directory_unused(Path("/no/such/run/directory"))


# ---------------------------------------------------------------------------
# A SuperNode whose SuperLink never comes up
# ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_node_without_server_exits(tmp_path: Path) -> None:
    """With nothing listening, the node gives up after --max-wait-time, even without the venv on PATH."""
    certificates = write_certificates(tmp_path / "certs", ["node-0"])
    address = f"127.0.0.1:{_free_port()}"
    environment = dict(os.environ)
    environment.update(
        PATH=_path_without_scripts_dir(),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    )
    command = [
        sys.executable, "-m", "corolla", "client", "--server", address, "--partition", "0/1",
        "--certs", str(certificates.directory), "--node-key", str(certificates.node("node-0").private_key),
        "--max-wait-time", "3",
    ]

    # A session of its own, so that the cleanup below reaches the SuperNode and its SuperExec.
    node = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = node.communicate(timeout=90)
    finally:
        # Kill what is left in the node's session at once. That is the SuperExec, which exits
        # on its own soon after the SuperNode, or the node itself after a timeout.
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.wait(timeout=10)

    assert node.returncode != 0, output
    assert output.count(f"Connecting to the SuperLink at {address}") == 1
    assert "for 3 s (--max-wait-time)" in output
    assert f"$ {SCRIPTS_DIR / 'flower-supernode'} " in output
    assert "No such file or directory" not in output
    assert "could not establish a connection to the SuperLink" in output
