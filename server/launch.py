"""Launch helpers for a deployed Corolla federation on Flower 1.42.

This module writes the TLS certificates and SuperNode keys, builds the
``flower-superlink`` command, stores a SuperLink connection in
``$FLWR_HOME/config.toml``, registers SuperNode public keys and submits and
follows runs through the ``flwr`` CLI. It only builds and runs Flower's own
commands, so every step can also be typed by hand.

In Flower 1.42 one SuperLink port serves the Fleet, Control and ServerApp
runtime APIs over HTTPS (``--host``/``--port``, default 127.0.0.1:8000), and
``flwr`` commands name a SuperLink *connection* from ``$FLWR_HOME/config.toml``
where older releases named a federation from ``pyproject.toml``.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import sysconfig
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import tomli_w
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from simulations.flower_run_config import run_config_options

logger = logging.getLogger(__name__)

DEFAULT_SERVER_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")
DEFAULT_SUPERLINK_PORT = 8000  # Flower 1.42's default for flower-superlink --port
DEFAULT_CONNECTION = "corolla"
CERTIFICATE_VALIDITY_DAYS = 365

# `flwr supernode register` in Flower 1.42 takes "a P-384 (or any other NIST EC
# curve) public key file", as its help text puts it.
NODE_KEY_CURVE = ec.SECP384R1

_NODE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Names of the key pairs that `corolla certs --nodes N` writes.
_NUMBERED_NODE_FILE_PATTERN = re.compile(r"node-[0-9]+\.(key|pub)")
_DNS_LABEL_PATTERN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?")
_MAX_DNS_NAME_LENGTH = 253  # RFC 1035, without the trailing dot
_MAX_DNS_LABEL_LENGTH = 63
_MAX_COMMON_NAME_LENGTH = 64  # the upper bound of X.509 commonName (RFC 5280)
# Flower rewrites dotted keys in config.toml, so connection names have no dots.
_CONNECTION_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_RESERVED_NAMES = frozenset({"ca", "server"})

# Terminal run states as `flwr ls --format json` prints them ("finished:<sub-status>").
RUN_COMPLETED = "finished:completed"
_FINISHED_PREFIX = "finished"

Echo = Callable[[Sequence[str]], None]


class FlowerCommandError(RuntimeError):
    """Raised when a ``flwr`` command exits non-zero or prints an unexpected result."""


class RunFailedError(RuntimeError):
    """Raised when a run ends in any state other than ``finished:completed``."""

    def __init__(self, status: RunStatus) -> None:
        detail = f" ({status.details})" if status.details else ""
        super().__init__(f"Run {status.run_id} ended as {status.status}{detail}.")
        self.status = status


# ---------------------------------------------------------------------------
# Flower executables
# ---------------------------------------------------------------------------


def interpreter_script_directories() -> list[Path]:
    """Return the directories where the running interpreter's environment installs console scripts.

    These are the directory of ``sys.executable`` and sysconfig's ``scripts``
    path, which are the same ``bin`` directory in a virtual environment.
    """
    directories = []
    if sys.executable:
        directories.append(Path(sys.executable).parent)
    directories.append(Path(sysconfig.get_path("scripts")))
    unique: list[Path] = []
    for directory in directories:
        if directory not in unique:
            unique.append(directory)
    return unique


def flower_executable(name: str) -> str:
    """Return the path of Flower's console script ``name``, such as ``flwr`` or ``flower-superlink``.

    The script installed next to the running interpreter comes first, so a
    virtual environment works without being activated. PATH is searched after
    that. Raises FileNotFoundError when neither has the script.
    """
    directories = interpreter_script_directories()
    for directory in directories:
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        searched = " or ".join(str(directory) for directory in directories)
        raise FileNotFoundError(
            f"Flower command `{name}` not found in {searched} or on PATH. "
            "Run ./install.sh, or activate the virtual environment that has flwr installed "
            "(source .venv/bin/activate)."
        )
    return found


# ---------------------------------------------------------------------------
# Certificates and node keys
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeKeyPaths:
    """Key pair of one SuperNode: OpenSSH private key and OpenSSH public key."""

    name: str
    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class CertificatePaths:
    """Files written by :func:`write_certificates`.

    ``ca_certificate`` goes to every SuperNode and ``flwr`` user, the server
    files only to the SuperLink, and each node's private key only to that node.
    ``ca_key`` is needed only to sign a new server certificate.
    """

    directory: Path
    ca_certificate: Path
    ca_key: Path
    server_certificate: Path
    server_key: Path
    nodes: tuple[NodeKeyPaths, ...]

    def node(self, name: str) -> NodeKeyPaths:
        """Return the key paths of the node called ``name``."""
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(node.name for node in self.nodes) or "none"
        raise KeyError(f"No node key named {name!r}; the certificate directory has: {known}.")


def certificate_paths(out_dir: Path, node_names: Iterable[str] = ()) -> CertificatePaths:
    """Return the file layout that :func:`write_certificates` uses under ``out_dir``."""
    out_dir = Path(out_dir).resolve()
    nodes = tuple(
        NodeKeyPaths(name, out_dir / f"{name}.key", out_dir / f"{name}.pub") for name in node_names
    )
    return CertificatePaths(
        directory=out_dir,
        ca_certificate=out_dir / "ca.crt",
        ca_key=out_dir / "ca.key",
        server_certificate=out_dir / "server.pem",
        server_key=out_dir / "server.key",
        nodes=nodes,
    )


def find_certificates(cert_dir: Path) -> CertificatePaths:
    """Return the paths in a directory written by :func:`write_certificates`.

    Node key pairs are found by their ``NAME.pub`` files. Raises FileNotFoundError
    naming the first missing CA or server file.
    """
    cert_dir = Path(cert_dir).resolve()
    node_names = sorted(path.stem for path in cert_dir.glob("*.pub"))
    paths = certificate_paths(cert_dir, node_names)
    for required in (paths.ca_certificate, paths.server_certificate, paths.server_key):
        if not required.is_file():
            raise FileNotFoundError(
                f"Missing {required}; create the directory with `corolla certs --out {cert_dir}`."
            )
    return paths


def validate_node_names(node_names: Sequence[str]) -> None:
    """Raise ValueError unless the names are unique, file-name safe and not reserved."""
    seen: set[str] = set()
    for name in node_names:
        if not _NODE_NAME_PATTERN.fullmatch(name):
            raise ValueError(
                f"Invalid node name {name!r}: use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit."
            )
        if name in _RESERVED_NAMES:
            raise ValueError(f"Invalid node name {name!r}: 'ca' and 'server' name the TLS files.")
        if name in seen:
            raise ValueError(f"Duplicate node name {name!r}.")
        seen.add(name)


def validate_server_hosts(hosts: Sequence[str]) -> None:
    """Raise ValueError unless every host is an IP address or a DNS name, each given once.

    These are the names that the server certificate carries, so every value must
    be a bare host: no scheme, port, brackets or wildcard. The message names
    ``--server-host``, the option of ``corolla certs`` that supplies them.
    """
    if not hosts:
        raise ValueError("No --server-host given; give at least one host name or IP address of the SuperLink.")
    seen: dict[str | ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
    for host in hosts:
        problem = _server_host_problem(host)
        if problem is not None:
            raise ValueError(f"Invalid --server-host {host!r}: {problem}")
        key = _host_key(host)
        if key in seen:
            same = "" if seen[key] == host else f" (the same host as {seen[key]!r})"
            raise ValueError(f"Duplicate --server-host {host!r}{same}; give each host once.")
        seen[key] = host


def _host_key(host: str) -> str | ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Return a value that is equal for two spellings of the same host."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return host.lower()  # DNS names are case-insensitive


def _server_host_problem(host: str) -> str | None:
    """Return why ``host`` cannot be a subject alternative name, or None if it can."""
    if not host:
        return "the host is empty; give a host name or IP address, for example server.example.org."
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None:
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            return "a certificate cannot name an IPv6 zone; give the address without the %zone suffix."
        return None

    if "://" in host:
        return "give the host without a scheme such as https:// and without a port."
    if host.startswith("["):
        return "give an IPv6 address without brackets, for example ::1."
    name, separator, port = host.rpartition(":")
    if separator and port.isdigit():
        return f"give the host without a port, here {name!r}; the port is an option of `corolla server`."
    if "*" in host:
        return "wildcard names are not supported; give each host name that nodes connect to."
    if host.endswith("."):
        return "remove the trailing dot; certificates name hosts without it."
    if len(host) > _MAX_DNS_NAME_LENGTH:
        return f"it has {len(host)} characters, more than the {_MAX_DNS_NAME_LENGTH} that a DNS name allows."
    for label in host.split("."):
        if len(label) > _MAX_DNS_LABEL_LENGTH:
            return (
                f"its label {label!r} has {len(label)} characters, more than the "
                f"{_MAX_DNS_LABEL_LENGTH} that a DNS label allows."
            )
        if not _DNS_LABEL_PATTERN.fullmatch(label):
            return (
                "expected an IP address or a DNS name: dot-separated labels of letters, digits and "
                "hyphens that neither start nor end with a hyphen, for example server.example.org."
            )
    if host.rsplit(".", 1)[-1].isdigit():
        return "it is not a valid IP address, and a DNS name cannot end in an all-digit label."
    return None


def write_certificates(
    out_dir: Path,
    node_names: Sequence[str],
    server_hosts: Sequence[str] = DEFAULT_SERVER_HOSTS,
    *,
    overwrite: bool = False,
    valid_days: int = CERTIFICATE_VALIDITY_DAYS,
) -> CertificatePaths:
    """Write a self-signed CA, a server certificate it signs, and one key pair per node.

    The server certificate carries every entry of ``server_hosts`` as a
    subjectAltName: IP addresses as iPAddress entries, other names as dNSName
    entries. SuperNodes, the ``flwr`` CLI and the ServerApp process all verify
    the SuperLink against ``ca.crt``, so the list must contain every address
    they dial. Node keys are P-384 EC keys in OpenSSH format, as
    ``flower-supernode --auth-supernode-private-key`` and
    ``flwr supernode register`` read them. Private keys get file mode 0600.

    Raises FileExistsError listing the files that exist unless ``overwrite``
    is true, and ValueError for an invalid node name or host (see
    :func:`validate_server_hosts`). Both are raised before any file is written.
    """
    node_names = list(node_names)
    validate_node_names(node_names)
    validate_server_hosts(server_hosts)
    if valid_days < 1:
        raise ValueError(f"Invalid valid_days = {valid_days}: it must be at least 1.")

    paths = certificate_paths(out_dir, node_names)
    targets = [paths.ca_certificate, paths.ca_key, paths.server_certificate, paths.server_key]
    for node in paths.nodes:
        targets += [node.private_key, node.public_key]
    existing = [str(path) for path in targets if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            "Files already exist and were not overwritten: " + ", ".join(existing)
            + ". Choose another directory or pass overwrite=True (--overwrite)."
        )
    paths.directory.mkdir(parents=True, exist_ok=True)

    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now - datetime.timedelta(minutes=5)  # tolerate small clock skew
    not_after = now + datetime.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_certificate = _build_ca_certificate(ca_key, not_before, not_after)
    _write_private_key_pem(paths.ca_key, ca_key)
    _write_public_file(paths.ca_certificate, ca_certificate.public_bytes(serialization.Encoding.PEM))

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_certificate = _build_server_certificate(
        server_key, ca_key, ca_certificate, server_hosts, not_before, not_after
    )
    _write_private_key_pem(paths.server_key, server_key)
    _write_public_file(
        paths.server_certificate, server_certificate.public_bytes(serialization.Encoding.PEM)
    )

    for node in paths.nodes:
        write_node_key(node)

    logger.info(
        "Wrote CA, server certificate for %s and %d node key pair(s) to %s",
        ", ".join(server_hosts), len(paths.nodes), paths.directory,
    )
    return paths


def remove_stale_node_keys(paths: CertificatePaths) -> list[Path]:
    """Delete ``node-N.key`` and ``node-N.pub`` files in ``paths.directory`` that ``paths.nodes`` does not name.

    A set of certificates written again for fewer nodes would otherwise keep
    the old key pairs, which :func:`find_certificates` then lists. Files with
    other names are kept. Returns the deleted paths, sorted.
    """
    current = {path.name for node in paths.nodes for path in (node.private_key, node.public_key)}
    removed = []
    for path in sorted(paths.directory.iterdir()):
        if _NUMBERED_NODE_FILE_PATTERN.fullmatch(path.name) and path.name not in current and path.is_file():
            path.unlink()
            removed.append(path)
    if removed:
        logger.info("Removed stale node key files: %s", ", ".join(path.name for path in removed))
    return removed


def write_node_key(node: NodeKeyPaths) -> None:
    """Write a new P-384 key pair for one SuperNode in OpenSSH format.

    The public key line ends with the node name as its comment.
    """
    private_key = ec.generate_private_key(NODE_KEY_CURVE())
    private_bytes = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public_bytes = private_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_private_file(node.private_key, private_bytes)
    _write_public_file(node.public_key, public_bytes + f" corolla-{node.name}\n".encode())


def _build_ca_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.Certificate:
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Corolla"),
        x509.NameAttribute(NameOID.COMMON_NAME, "Corolla federation CA"),
    ])
    public_key = ca_key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def _build_server_certificate(
    server_key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_certificate: x509.Certificate,
    server_hosts: Sequence[str],
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.Certificate:
    alt_names: list[x509.GeneralName] = []
    for host in server_hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))

    # TLS clients check the subject alternative names only, so the common name is a
    # label. A DNS name may have up to 253 characters, but a common name only 64.
    common_name = server_hosts[0] if len(server_hosts[0]) <= _MAX_COMMON_NAME_LENGTH else "Corolla SuperLink"
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Corolla"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])
    ca_public_key = ca_key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_certificate.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public_key), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )


def _write_private_key_pem(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    _write_private_file(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a file that is mode 0600 from the moment it exists."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    os.chmod(path, 0o600)  # the umask may have cleared bits, never added them


def _write_public_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)


# ---------------------------------------------------------------------------
# SuperLink
# ---------------------------------------------------------------------------


def superlink_command(
    certificates: CertificatePaths,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_SUPERLINK_PORT,
    node_auth: bool = True,
    database: Path | None = None,
    log_file: Path | None = None,
    executable: str | None = None,
) -> list[str]:
    """Build the ``flower-superlink`` command with TLS and SuperNode authentication.

    ``host``/``port`` bind the single HTTPS port that serves the Fleet API
    (SuperNodes), the Control API (``flwr``) and the ServerApp runtime API in
    Flower 1.42. Without ``database`` the SuperLink keeps its state, registered
    node keys included, in memory and loses it on exit. Runtime dependency
    installation is always disabled so that Flower never runs ``uv sync`` for the app.
    ``executable`` defaults to :func:`flower_executable`'s ``flower-superlink``.
    """
    _check_port(port)
    command = [
        executable or flower_executable("flower-superlink"),
        "--ssl-ca-certfile", str(certificates.ca_certificate),
        "--ssl-certfile", str(certificates.server_certificate),
        "--ssl-keyfile", str(certificates.server_key),
        "--host", host,
        "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]
    if node_auth:
        command.append("--enable-supernode-auth")
    if database is not None:
        command += ["--database", str(Path(database).resolve())]
    if log_file is not None:
        command += ["--log-file", str(Path(log_file).resolve())]
    return command


def superlink_host(host: str) -> str:
    """Return the host that clients on this machine dial for a SuperLink bound to ``host``.

    A bind-all host (0.0.0.0 or ::) becomes its loopback address, as Flower
    1.42 does for the SuperLink's own SuperExec, and brackets are removed.
    """
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def superlink_address(host: str, port: int) -> str:
    """Return the ``host:port`` that clients on this machine dial for a SuperLink bound to ``host``.

    A bind-all host (0.0.0.0 or ::) becomes its loopback address, and IPv6
    addresses get brackets.
    """
    _check_port(port)
    host = superlink_host(host)
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def check_superlink_certificate(certificates: CertificatePaths, host: str) -> None:
    """Raise ValueError unless the SuperLink's certificate and key can serve TLS for ``host``.

    ``host`` is the address that ``flwr`` and the SuperLink's own SuperExec dial
    (see :func:`superlink_host`). The certificate must load, be signed by
    ``ca.crt``, name ``host`` among its subject alternative names, and belong to
    ``server.key``. Without these checks the SuperLink starts, but its SuperExec
    fails the TLS handshake and every run stays pending.
    """
    ca_certificate = _load_certificate_file(certificates.ca_certificate, certificates)
    certificate = _load_certificate_file(certificates.server_certificate, certificates)
    try:
        certificate.verify_directly_issued_by(ca_certificate)
    except (ValueError, TypeError, InvalidSignature):
        raise ValueError(
            f"The SuperLink certificate {certificates.server_certificate} is not signed by the CA certificate "
            f"{certificates.ca_certificate}, so nodes and `flwr` reject it. Write both again: "
            f"{_certs_command(certificates, certificate_host_names(certificate))}"
        ) from None

    names = certificate_host_names(certificate)
    if not certificate_names_host(names, host):
        hosts = [host] + [name for name in names if _host_key(name) != _host_key(host)]
        raise ValueError(
            f"The SuperLink certificate {certificates.server_certificate} is valid for "
            f"{', '.join(names) or 'no host'}, but not for {host}, the address that `flwr` and the "
            "SuperLink's own SuperExec connect to. Write certificates that include it: "
            f"{_certs_command(certificates, hosts)}, then give every node the new ca.crt "
            "and register the new public keys."
        )

    private_key = _load_private_key_file(certificates.server_key, certificates, names)
    if _public_key_bytes(private_key.public_key()) != _public_key_bytes(certificate.public_key()):
        raise ValueError(
            f"The SuperLink private key {certificates.server_key} does not belong to the certificate "
            f"{certificates.server_certificate}. Write both again: {_certs_command(certificates, names)}"
        )


def certificate_host_names(certificate: x509.Certificate) -> list[str]:
    """Return the DNS names and IP addresses in a certificate's subject alternative names."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    names = []
    for name in extension.value:
        if isinstance(name, x509.DNSName):
            names.append(name.value)
        elif isinstance(name, x509.IPAddress):
            names.append(str(name.value))
    return names


def certificate_names_host(names: Sequence[str], host: str) -> bool:
    """Return whether a certificate with subject alternative names ``names`` is valid for ``host``.

    An IP address matches an equal IP address entry, and a DNS name matches an
    equal DNS entry, ignoring case, or a wildcard entry ``*.rest`` whose
    ``rest`` equals everything after the host's first label.
    """
    key = _host_key(host)
    if not isinstance(key, str):
        return any(_host_key(name) == key for name in names)
    parent = key.partition(".")[2]
    for name in names:
        name = name.lower()
        if name == key or (name.startswith("*.") and parent and name[2:] == parent):
            return True
    return False


def _load_certificate_file(path: Path, certificates: CertificatePaths) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as error:
        raise ValueError(
            f"Invalid certificate {path}: it is not a PEM X.509 certificate ({error}). "
            f"Write the certificates again: {_certs_command(certificates, DEFAULT_SERVER_HOSTS)}"
        ) from None


def _load_private_key_file(path: Path, certificates: CertificatePaths, hosts: Sequence[str]) -> object:
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise ValueError(
            f"Invalid SuperLink private key {path}: it is not an unencrypted PEM private key ({error}). "
            f"Write the certificates again: {_certs_command(certificates, hosts)}"
        ) from None


def _public_key_bytes(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _certs_command(certificates: CertificatePaths, hosts: Sequence[str]) -> str:
    """Return the ``corolla certs`` command that writes this directory again for ``hosts``."""
    command = ["corolla", "certs", "--out", str(certificates.directory), "--overwrite"]
    names = [node.name for node in certificates.nodes]
    if names and names == [f"node-{index}" for index in range(len(names))]:
        command += ["--nodes", str(len(names))]
    elif names:
        for name in names:
            command += ["--node", name]
    else:
        command += ["--nodes", "1"]
    for host in hosts:
        command += ["--server-host", host]
    return shlex.join(command)


def check_bind_address(host: str, port: int) -> None:
    """Raise ValueError when this machine cannot listen on ``host``:``port``.

    The check binds a socket and closes it at once, so a port in use or a host
    that is not an address of this machine is reported before the SuperLink
    starts. A host name is resolved as the SuperLink resolves it. NOTE: another
    process may still take the port between this check and the SuperLink's bind.
    """
    _check_port(port)
    bind_host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(bind_host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ValueError(
            f"Invalid --host {host!r}: it does not resolve to an address ({error.strerror}). "
            "Give an IP address of this machine, or 0.0.0.0 to accept connections on every address."
        ) from None
    with socket.socket(family, kind, protocol) as probe:
        # Connections in TIME_WAIT from an earlier SuperLink do not block a new one.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ValueError(
                    f"Port {port} on {host} is already in use, by another SuperLink or another program. "
                    "Stop that process or choose another --port."
                ) from None
            if error.errno == errno.EADDRNOTAVAIL:
                raise ValueError(
                    f"Invalid --host {host!r}: it is not an address of this machine. Give one of its "
                    "addresses, or 0.0.0.0 to accept connections on every address."
                ) from None
            raise ValueError(f"Cannot listen on {host} port {port}: {error.strerror}.") from None


def superlink_is_healthy(address: str, root_certificates: Path, *, timeout: float = 2.0) -> bool:
    """Return whether the SuperLink at ``address`` responds to ``GET /health`` over TLS.

    The TLS handshake verifies the SuperLink against ``root_certificates`` for
    the host in ``address``, as ``flwr`` does. Proxy settings in the
    environment are ignored, because the request goes to the SuperLink itself.
    """
    context = ssl.create_default_context(cafile=str(root_certificates))
    try:
        response = httpx.get(f"https://{address}/health", verify=context, timeout=timeout, trust_env=False)
    except httpx.HTTPError:
        return False
    return response.is_success


def flower_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return ``base`` (default: ``os.environ``) set up for Flower's processes.

    Runtime dependency installation is disabled, and the interpreter's script
    directories come first on PATH, because the SuperLink and SuperNode start
    ``flower-superexec`` by name and it starts ``flwr-serverapp`` and
    ``flwr-clientapp`` by name.
    """
    environment = dict(os.environ if base is None else base)
    environment["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    directories = [str(directory) for directory in interpreter_script_directories()]
    path_entries = [entry for entry in environment.get("PATH", "").split(os.pathsep) if entry]
    environment["PATH"] = os.pathsep.join(directories + [entry for entry in path_entries if entry not in directories])
    return environment


def _check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise ValueError(f"Invalid port {port}: it must be in 1..65535.")


# ---------------------------------------------------------------------------
# SuperLink connections in $FLWR_HOME/config.toml
# ---------------------------------------------------------------------------


def flwr_home() -> Path:
    """Return the Flower home directory: ``$FLWR_HOME``, else ``~/.flwr`` as in Flower 1.42."""
    configured = os.environ.get("FLWR_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".flwr"


def check_connection_name(name: str) -> None:
    """Raise ValueError unless ``name`` can name a SuperLink connection in ``config.toml``."""
    if not _CONNECTION_NAME_PATTERN.fullmatch(name) or name == "default":
        raise ValueError(
            f"Invalid connection name {name!r}: use letters, digits, '_' and '-', "
            "and not 'default', which Flower reserves."
        )


def write_connection(
    name: str,
    address: str,
    root_certificates: Path,
    *,
    config_path: Path | None = None,
) -> Path:
    """Add or replace the SuperLink connection ``name`` in Flower's ``config.toml``.

    Writes ``[superlink.NAME]`` with ``address`` (``host:port`` of the
    SuperLink) and the absolute path of the CA certificate, and keeps every
    other entry. A new file gets no default connection, so ``flwr`` commands
    must name the connection, as all commands built here do. Returns the path
    of the configuration file.
    """
    check_connection_name(name)
    root_certificates = Path(root_certificates).resolve()
    if not root_certificates.is_file():
        raise FileNotFoundError(f"CA certificate {root_certificates} not found.")

    config_path = config_path or flwr_home() / "config.toml"
    config: dict = {}
    if config_path.exists():
        with config_path.open("rb") as file:
            config = tomllib.load(file)
    superlinks = config.setdefault("superlink", {})
    superlinks[name] = {"address": address, "root-certificates": str(root_certificates)}

    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(tomli_w.dumps(config), encoding="utf-8")
    logger.info("Wrote SuperLink connection %r (%s) to %s", name, address, config_path)
    return config_path


# ---------------------------------------------------------------------------
# flwr CLI: register nodes, submit and follow runs
# ---------------------------------------------------------------------------


def register_node_command(public_key: Path, connection: str, name: str | None = None) -> list[str]:
    """Build ``flwr supernode register KEY.pub CONNECTION --format json``."""
    command = [flower_executable("flwr"), "supernode", "register", str(Path(public_key).resolve()), connection]
    if name:
        command += ["--name", name]
    return command + ["--format", "json"]


def register_node(
    public_key: Path,
    connection: str,
    *,
    name: str | None = None,
    echo: Echo | None = None,
    timeout: float = 60.0,
) -> int:
    """Register a SuperNode public key with the SuperLink and return the node id it assigns."""
    result = _run_flwr_json(register_node_command(public_key, connection, name), echo, timeout)
    return int(result["node-id"])


def app_run_config_defaults(app_dir: Path) -> dict:
    """Return ``[tool.flwr.app.config]`` from the app's pyproject.toml (empty when absent)."""
    pyproject = Path(app_dir) / "pyproject.toml"
    if not pyproject.is_file():
        raise FileNotFoundError(f"{pyproject} not found; the app directory must be a Flower App.")
    with pyproject.open("rb") as file:
        project = tomllib.load(file)
    return project.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})


def run_config_overrides(
    app_dir: Path, run_config: Mapping[str, bool | int | float | str]
) -> dict[str, bool | int | float | str]:
    """Return the entries of ``run_config`` that differ from the app's own defaults.

    The SuperLink merges overrides into the defaults of the submitted app, so
    passing only the differences gives the same run config with a shorter
    command. Flower 1.42 rejects a run whose overrides name a key that the
    app does not declare, so such keys raise ValueError here, before submission.
    """
    defaults = app_run_config_defaults(app_dir)
    undeclared = sorted(key for key in run_config if key not in defaults)
    if undeclared:
        raise ValueError(
            f"The app at {app_dir} does not declare the run-config key(s) "
            f"{', '.join(undeclared)} under [tool.flwr.app.config] in pyproject.toml, "
            "and Flower rejects overrides of undeclared keys; add them there."
        )
    return {
        key: value
        for key, value in run_config.items()
        if type(defaults[key]) is not type(value) or defaults[key] != value
    }


def run_command(app_dir: Path, connection: str, overrides: Mapping[str, bool | int | float | str]) -> list[str]:
    """Build ``flwr run APP_DIR CONNECTION [--run-config ...] --format json``."""
    command = [flower_executable("flwr"), "run", str(Path(app_dir).resolve()), connection]
    command += run_config_options(overrides)
    return command + ["--format", "json"]


def submit_run(
    app_dir: Path,
    connection: str,
    run_config: Mapping[str, bool | int | float | str],
    *,
    echo: Echo | None = None,
    timeout: float = 120.0,
) -> int:
    """Build the app at ``app_dir`` into a FAB, submit it with ``run_config`` and return the run id.

    ``connection`` names a SuperLink connection in ``$FLWR_HOME/config.toml``
    (see :func:`write_connection`). Only the values that differ from the
    app's defaults are sent (see :func:`run_config_overrides`). ``echo``
    receives the ``flwr`` command before it runs. A returned run id does not
    mean that the run succeeded, because ``flwr run`` exits 0 even when the
    run fails later, so follow it with :func:`wait_for_run`.
    """
    overrides = run_config_overrides(app_dir, run_config)
    result = _run_flwr_json(run_command(app_dir, connection, overrides), echo, timeout)
    if not result.get("success") or result.get("run-id") is None:
        raise FlowerCommandError(f"flwr run did not start a run: {result}")
    return int(result["run-id"])


@dataclass(frozen=True)
class RunStatus:
    """State of one run as ``flwr ls --run-id ID --format json`` reports it."""

    run_id: int
    status: str  # "pending", "starting", "running" or "finished:<completed|failed|stopped>"
    details: str = ""

    @property
    def finished(self) -> bool:
        """Whether the run has reached a terminal state."""
        return self.status.startswith(_FINISHED_PREFIX)

    @property
    def succeeded(self) -> bool:
        """Whether the run finished with sub-status ``completed``."""
        return self.status == RUN_COMPLETED


def status_command(run_id: int, connection: str) -> list[str]:
    """Build ``flwr ls CONNECTION --run-id ID --format json``."""
    return [flower_executable("flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"]


def get_run_status(run_id: int, connection: str, *, echo: Echo | None = None, timeout: float = 60.0) -> RunStatus:
    """Return the current status of a run."""
    result = _run_flwr_json(status_command(run_id, connection), echo, timeout)
    runs = result.get("runs") or []
    if len(runs) != 1:
        raise FlowerCommandError(f"flwr ls returned {len(runs)} runs for run id {run_id}: {result}")
    details = str(runs[0].get("status-details") or "")
    return RunStatus(run_id, str(runs[0]["status"]), "" if details == "N/A" else details)


def wait_for_run(
    run_id: int,
    connection: str,
    timeout: float,
    *,
    poll_interval: float = 5.0,
    check: bool = True,
    echo: Echo | None = None,
) -> RunStatus:
    """Poll ``flwr ls`` until the run finishes and return its final status.

    Each poll starts a ``flwr`` process, which costs about a second of CPU,
    so polls are seconds apart. ``echo`` receives only the first ``flwr ls``
    command. Raises RunFailedError when ``check`` is true and the run did not
    complete. Raises TimeoutError when the run is still unfinished after
    ``timeout`` seconds, and the run then keeps going on the SuperLink until
    ``flwr stop RUN_ID CONNECTION`` stops it.
    """
    deadline = time.monotonic() + timeout
    status = get_run_status(run_id, connection, echo=echo)
    last_logged = ""
    while not status.finished:
        if status.status != last_logged:
            logger.info("Run %d is %s", run_id, status.status)
            last_logged = status.status
        if time.monotonic() + poll_interval > deadline:
            raise TimeoutError(
                f"Run {run_id} is still {status.status} after {timeout:g} s; "
                f"it keeps running until `flwr stop {run_id} {connection}`."
            )
        time.sleep(poll_interval)
        status = get_run_status(run_id, connection)

    logger.info("Run %d ended as %s", run_id, status.status)
    if check and not status.succeeded:
        raise RunFailedError(status)
    return status


def log_command(run_id: int, connection: str) -> list[str]:
    """Build ``flwr log RUN_ID CONNECTION --show``."""
    return [flower_executable("flwr"), "log", str(run_id), connection, "--show"]


def fetch_run_log(run_id: int, connection: str, *, echo: Echo | None = None, timeout: float = 60.0) -> str:
    """Return the ServerApp log that the SuperLink stored for a run."""
    command = log_command(run_id, connection)
    completed = _run_flwr(command, echo, timeout)
    return completed.stdout


def _run_flwr(
    command: list[str], echo: Echo | None, timeout: float, *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    if echo is not None:
        echo(command)
    logger.info("Running %s", shlex.join(command))
    try:
        completed = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=flower_environment(),
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise FlowerCommandError(f"`{shlex.join(command)}` timed out after {timeout:g} s.") from error
    if check and completed.returncode != 0:
        raise FlowerCommandError(
            f"`{shlex.join(command)}` failed with exit code {completed.returncode}: "
            f"{_last_lines(completed.stdout + completed.stderr)}"
        )
    return completed


def _run_flwr_json(command: list[str], echo: Echo | None, timeout: float) -> dict:
    """Run a ``flwr ... --format json`` command and return its JSON object.

    With ``--format json`` Flower 1.42 prints errors as JSON too
    (``{"success": false, "error-message": ...}``), sometimes with exit code 0.
    """
    completed = _run_flwr(command, echo, timeout, check=False)
    try:
        result = json.loads(completed.stdout)
    except json.JSONDecodeError as error:
        raise FlowerCommandError(
            f"`{shlex.join(command)}` exited with code {completed.returncode} and printed no JSON: "
            f"{_last_lines(completed.stdout + completed.stderr)}"
        ) from error
    if not isinstance(result, dict) or result.get("success") is False:
        message = result.get("error-message", result) if isinstance(result, dict) else result
        raise FlowerCommandError(f"`{shlex.join(command)}` failed: {message}")
    return result


def _last_lines(text: str, count: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-count:])
