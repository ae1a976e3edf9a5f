"""Run a Corolla experiment on Flower's simulation engine (Ray) through ``flwr run``.

``run_with_ray`` takes the same run configuration as the in-process engine and
submits the repository's Flower App to a simulation SuperLink, so the run goes
through Flower's own path: FAB build, ``StartRun``, ``flwr-simulation`` and Ray.

Mechanism (Flower 1.42):

1. A private ``FLWR_HOME`` in a temporary directory contains ``config.toml`` with
   one connection, ``corolla-ray``, to ``127.0.0.1:PORT`` (insecure).
2. This module starts ``flower-superlink --simulation --insecure
   --disable-runtime-dependency-installation --host 127.0.0.1 --port PORT`` on
   a free loopback port, in a new session, and waits for ``GET /health``.
   Its environment also keeps Ray on loopback and Ray's files in the same
   temporary directory.
3. ``flwr run APP_DIR corolla-ray --run-config KEY=VALUE ... --federation-config
   num-supernodes=N --federation-config client-resources-num-cpus=C --format json``
   submits the run. The command is logged at INFO.
4. ``flwr log RUN_ID corolla-ray --stream`` forwards the run's log to this
   module's logger. The SuperLink ends that stream when the run finishes, and
   ``flwr ls RUN_ID --format json`` then reads the final status, because
   ``flwr run`` exits 0 even when the run fails. ``flwr ls`` also runs as a
   periodic liveness check while the stream is open.
5. In every case the SuperLink's process group is stopped first. Then every
   process that carries this call's ``COROLLA_RAY_ENGINE_ID`` in its
   environment, or lives in a session that such a process leads, is stopped.
   These are ``flower-superexec`` (which Flower starts in a new session),
   ``flwr-simulation`` and the Ray processes (GCS, raylet, agents, actors).

Why not Flower's managed local SuperLink (``address = ":local:"``): it can be
moved to other ports (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``), but ``flwr``
starts it detached and never reports its process id, so nothing can stop it
reliably. It also treats any server that responds to ``/health`` on its port as
"already started", so a concurrent run could silently reuse another user's
SuperLink. Owning the ``flower-superlink`` process avoids both problems and
lets a failed start be reported with the SuperLink's own log.

The SuperLink runs in the caller's working directory, which is also the
ServerApp's working directory, so a relative run directory lands where the
in-process engine would put it.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from server.launch import flower_executable
from simulations.flower_run_config import format_run_config

log = logging.getLogger(__name__)

CONNECTION_NAME = "corolla-ray"
ENGINE_ID_ENV = "COROLLA_RAY_ENGINE_ID"
LOG_TAIL_LINES = 40

SUPERLINK_START_TIMEOUT = 60.0
SUPERLINK_START_ATTEMPTS = 3
CLI_TIMEOUT = 120.0
STATUS_CHECK_INTERVAL = 15.0
FINAL_STATUS_INTERVAL = 1.0
PROCESS_EXIT_GRACE = 5.0

# Environment variables that would make Flower bind extra gRPC servers on
# non-loopback default addresses, or make Ray join a cluster that this module
# neither starts nor stops.
_STRIPPED_ENV_VARS = (
    "FLWR_INTERNAL_GRPC_CONTROL_API",
    "FLWR_INTERNAL_GRPC_FLEET_API",
    "RAY_ADDRESS",
)
# Unix socket paths are limited to 107 bytes, and Ray puts its sockets about
# 70 characters below its temporary directory.
_MAX_RAY_TMPDIR_LENGTH = 36

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class RayEngineError(RuntimeError):
    """Raised when a run on Flower's simulation engine fails, times out or cannot start."""


def run_with_ray(
    run_config: dict[str, Any],
    app_dir: Path,
    *,
    num_cpus_per_client: float = 1.0,
    timeout: float = 3600,
) -> None:
    """Run the Flower App in ``app_dir`` with ``run_config`` on Flower's Ray engine.

    One simulated SuperNode runs per client (``run_config["num-clients"]``),
    and each ClientApp actor reserves ``num_cpus_per_client`` Ray CPUs.
    ``timeout`` (seconds) covers the SuperLink start and the whole run.
    Results are whatever the ServerApp writes, normally into ``out-dir``.

    Raises ``RayEngineError`` when the run fails, times out or Flower cannot
    start it, and ``ValueError`` or ``TypeError`` for invalid arguments.
    """
    app_dir = Path(app_dir).resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise ValueError(f"Invalid app_dir {str(app_dir)!r}: it has no pyproject.toml, so it is not a Flower App.")
    if timeout <= 0:
        raise ValueError(f"Invalid timeout = {timeout!r}: it must be positive (seconds).")
    num_supernodes = _num_supernodes(run_config)
    run_config_args = format_run_config(run_config)
    federation_config_args = format_federation_config(num_supernodes, num_cpus_per_client, available_cpus())

    deadline = time.monotonic() + timeout
    with _SimulationSuperLink() as superlink:
        started = time.monotonic()
        superlink.start(deadline)
        superlink_seconds = time.monotonic() - started

        started = time.monotonic()
        run_id = superlink.submit_run(app_dir, run_config_args, federation_config_args, deadline)
        submit_seconds = time.monotonic() - started

        started = time.monotonic()
        status, details = superlink.wait_for_run(run_id, deadline, timeout)
        run_seconds = time.monotonic() - started

        log.info(
            "Run %s finished with status %s: SuperLink start %.1f s, submission %.1f s, run %.1f s.",
            run_id,
            status,
            superlink_seconds,
            submit_seconds,
            run_seconds,
        )
        if status != "finished:completed":
            raise RayEngineError(
                f"Flower run {run_id} ended with status {status!r}: {details or 'no details'}.\n"
                f"Last lines of the run log:\n{superlink.log_tail()}"
            )


def format_federation_config(num_supernodes: int, num_cpus_per_client: float, cpu_count: int) -> list[str]:
    """Return the ``flwr run --federation-config`` arguments for the simulation size and Ray resources.

    Flower 1.42 stores ``client-resources-num-cpus`` as an unsigned integer,
    so a fractional ``num_cpus_per_client`` is expressed by scaling Ray's
    logical CPU count instead: each actor reserves 1 CPU out of
    ``floor(cpu_count / num_cpus_per_client)``. Ray CPUs are scheduling units,
    so the number of concurrent actors is the same as with fractional CPUs.
    """
    if isinstance(num_cpus_per_client, bool) or not isinstance(num_cpus_per_client, (int, float)):
        raise TypeError(f"Invalid num_cpus_per_client = {num_cpus_per_client!r}: expected a number of CPUs.")
    if not num_cpus_per_client > 0 or math.isinf(num_cpus_per_client):
        raise ValueError(f"Invalid num_cpus_per_client = {num_cpus_per_client!r}: it must be a positive, finite number.")
    if num_cpus_per_client > cpu_count:
        raise ValueError(
            f"num_cpus_per_client = {num_cpus_per_client!r} exceeds the {cpu_count} CPUs available to this "
            f"process, so Ray could not start a single ClientApp actor. Use at most {cpu_count}."
        )

    arguments = [f"num-supernodes={num_supernodes}"]
    if float(num_cpus_per_client).is_integer():
        arguments.append(f"client-resources-num-cpus={int(num_cpus_per_client)}")
    else:
        num_actors = math.floor(cpu_count / num_cpus_per_client)
        arguments.append("client-resources-num-cpus=1")
        arguments.append(f"init-args-num-cpus={num_actors}")
    return arguments


def available_cpus() -> int:
    """Return the number of CPUs this process may run on (its affinity mask where the OS has one)."""
    # NOTE: a CPU quota set through cgroups is not counted. Ray reads that quota,
    # so in such a container Ray may see fewer CPUs than this function returns.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _num_supernodes(run_config: dict[str, Any]) -> int:
    if "num-clients" not in run_config:
        raise ValueError("The run config is missing 'num-clients', which sets the number of simulated SuperNodes.")
    num_clients = run_config["num-clients"]
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"Invalid num-clients = {num_clients!r}: it must be an integer of at least 1.")
    return num_clients


def _strip_ansi(text: str) -> str:
    return _ANSI_ESCAPE.sub("", text)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _flower_executable(name: str) -> str:
    """Find a Flower console script with ``server.launch.flower_executable``, raising RayEngineError if it is missing."""
    try:
        return flower_executable(name)
    except FileNotFoundError as error:
        raise RayEngineError(str(error)) from None


class _SimulationSuperLink:
    """A private simulation SuperLink, its ``FLWR_HOME`` and the ``flwr`` commands that talk to it."""

    def __init__(self) -> None:
        self.engine_id = uuid.uuid4().hex
        self.processes = _RunProcesses(self.engine_id)
        self.work_dir = Path(tempfile.mkdtemp(prefix="corolla-ray-"))
        self.flwr_home = self.work_dir / "flwr-home"
        self.flwr_home.mkdir()
        self.superlink_log = self.work_dir / "superlink.log"
        self.env = self._build_env()
        self.address: str | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.log_stream: subprocess.Popen[str] | None = None
        self.log_reader: threading.Thread | None = None
        self.log_lines: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)

    def __enter__(self) -> _SimulationSuperLink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _build_env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in _STRIPPED_ENV_VARS}
        env["FLWR_HOME"] = str(self.flwr_home)
        env["FLWR_TELEMETRY_ENABLED"] = "0"
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env[ENGINE_ID_ENV] = self.engine_id
        # The SuperLink starts `flower-superexec` and `flwr-simulation` by name.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if len(str(self.work_dir)) <= _MAX_RAY_TMPDIR_LENGTH:
            env["RAY_TMPDIR"] = str(self.work_dir)
        # Ray on Linux binds its GCS, raylet and workers to the address of the
        # default route unless this is 0, in which case it uses loopback as it
        # does on macOS and Windows. This engine runs a single-node Ray only.
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        return env

    def start(self, deadline: float) -> None:
        """Start the SuperLink on a free loopback port and wait until ``/health`` responds."""
        attempt = 1
        while True:
            port = _free_loopback_port()
            self._write_connection(port)
            command = [
                _flower_executable("flower-superlink"),
                "--simulation",
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
            log.info("Starting the simulation SuperLink: %s", subprocess.list2cmdline(command))
            with self.superlink_log.open("ab") as log_file:
                self.process = subprocess.Popen(
                    command,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if self._wait_until_healthy(port, deadline):
                self.address = f"127.0.0.1:{port}"
                log.info("SuperLink %s is ready (process %d).", self.address, self.process.pid)
                self.processes.record_sessions()
                return

            exit_code = self.process.poll()
            superlink_output = self._superlink_log_tail()
            self._stop_superlink()
            if "address already in use" in superlink_output.lower() and attempt < SUPERLINK_START_ATTEMPTS:
                log.warning("Port %d was taken before the SuperLink could bind it. Retrying on another port.", port)
                attempt += 1
                continue
            raise RayEngineError(
                f"The simulation SuperLink on 127.0.0.1:{port} did not start (exit code {exit_code}).\n"
                f"Last lines of its output:\n{superlink_output}"
            )

    def _write_connection(self, port: int) -> None:
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION_NAME}"\n\n'
            f'[superlink.{CONNECTION_NAME}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n',
            encoding="utf-8",
        )

    def _wait_until_healthy(self, port: int, deadline: float) -> bool:
        """Return True once the SuperLink responds and False if it exits first. Raise on timeout."""
        assert self.process is not None
        start_deadline = min(deadline, time.monotonic() + SUPERLINK_START_TIMEOUT)
        while time.monotonic() < start_deadline:
            if self.process.poll() is not None:
                return False
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0)
                # Check the process again, because another server could respond on this port.
                if response.is_success and self.process.poll() is None:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RayEngineError(
            f"The simulation SuperLink on 127.0.0.1:{port} did not respond within "
            f"{SUPERLINK_START_TIMEOUT:.0f} s.\nLast lines of its output:\n{self._superlink_log_tail()}"
        )

    def submit_run(
        self,
        app_dir: Path,
        run_config_args: list[str],
        federation_config_args: list[str],
        deadline: float,
    ) -> str:
        """Submit the app with ``flwr run`` and return the run ID."""
        command = [_flower_executable("flwr"), "run", str(app_dir), CONNECTION_NAME]
        for argument in run_config_args:
            command += ["--run-config", argument]
        for argument in federation_config_args:
            command += ["--federation-config", argument]
        command += ["--format", "json"]
        log.info("Submitting the run: %s", subprocess.list2cmdline(command))
        # NOTE: Flower 1.42 walks every file under app_dir before it applies
        # .gitignore, so a virtual environment inside the app directory slows
        # this step (48,000 files took 3 s on 2 cores).

        result = self._run_flwr(command, deadline)
        reply = _parse_json_reply(result)
        if not reply.get("success") or not reply.get("run-id"):
            reason = reply.get("error-message") or result.stderr.strip() or result.stdout.strip()
            raise RayEngineError(
                f"`flwr run` did not start a run: {_strip_ansi(str(reason)).strip()}\n"
                f"SuperLink errors:\n{self._superlink_errors()}"
            )
        run_id = str(reply["run-id"])
        log.info("Flower started run %s.", run_id)
        self.processes.record_sessions()
        return run_id

    def wait_for_run(self, run_id: str, deadline: float, timeout: float) -> tuple[str, str]:
        """Stream the run's log until the run finishes and return its ``(status, status details)``."""
        self._start_log_stream(run_id)
        assert self.log_stream is not None and self.process is not None

        next_status_check = time.monotonic() + STATUS_CHECK_INTERVAL
        while self.log_stream.poll() is None:
            if time.monotonic() >= deadline:
                raise RayEngineError(
                    f"Flower run {run_id} timed out after {timeout:g} s.\n"
                    f"Last lines of the run log:\n{self.log_tail()}"
                )
            if self.process.poll() is not None:
                raise RayEngineError(
                    f"The simulation SuperLink exited with code {self.process.poll()} during run {run_id}.\n"
                    f"Last lines of its output:\n{self._superlink_log_tail()}"
                )
            if time.monotonic() >= next_status_check:
                self.processes.record_sessions()
                try:
                    status, details = self._run_status(run_id, deadline)
                except RayEngineError as error:
                    # The loop still watches the SuperLink process and the deadline.
                    log.warning("Status check of run %s failed, continuing to wait: %s", run_id, error)
                    status, details = "unknown", ""
                log.debug("Run %s status: %s", run_id, status)
                if status.startswith("finished"):
                    # Let the stream deliver the last lines, which contain a failed run's traceback.
                    try:
                        self.log_stream.wait(timeout=PROCESS_EXIT_GRACE)
                    except subprocess.TimeoutExpired:
                        pass
                    self._join_log_reader()
                    return status, details
                next_status_check = time.monotonic() + STATUS_CHECK_INTERVAL
            time.sleep(0.2)
        self._join_log_reader()

        # The SuperLink closes the log stream when the run finishes, but a
        # stream that broke off early leaves the run still going.
        while True:
            status, details = self._run_status(run_id, deadline)
            if status.startswith("finished"):
                return status, details
            if time.monotonic() >= deadline:
                raise RayEngineError(
                    f"Flower run {run_id} timed out after {timeout:g} s (status {status!r}).\n"
                    f"Last lines of the run log:\n{self.log_tail()}"
                )
            time.sleep(FINAL_STATUS_INTERVAL)

    def log_tail(self) -> str:
        """Return the last lines of the run log received so far."""
        return "\n".join(self.log_lines) or "(no log lines received)"

    def _start_log_stream(self, run_id: str) -> None:
        command = [_flower_executable("flwr"), "log", run_id, CONNECTION_NAME, "--stream"]
        log.info("Streaming the run log: %s", subprocess.list2cmdline(command))
        self.log_stream = subprocess.Popen(
            command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        self.log_reader = threading.Thread(target=self._forward_log, args=(run_id,), daemon=True)
        self.log_reader.start()

    def _forward_log(self, run_id: str) -> None:
        assert self.log_stream is not None and self.log_stream.stdout is not None
        for raw_line in self.log_stream.stdout:
            line = _strip_ansi(raw_line).rstrip()
            if not line:
                continue
            self.log_lines.append(line)
            log.info("[run %s] %s", run_id, line)

    def _join_log_reader(self) -> None:
        if self.log_reader is not None:
            self.log_reader.join(timeout=PROCESS_EXIT_GRACE)

    def _run_status(self, run_id: str, deadline: float) -> tuple[str, str]:
        command = [_flower_executable("flwr"), "ls", CONNECTION_NAME, "--run-id", run_id, "--format", "json"]
        reply = _parse_json_reply(self._run_flwr(command, deadline))
        runs = reply.get("runs") or []
        if not reply.get("success") or not runs:
            reason = reply.get("error-message") or "no run in the reply"
            raise RayEngineError(f"`flwr ls` could not read the status of run {run_id}: {_strip_ansi(str(reason)).strip()}")
        details = runs[0].get("status-details", "")
        return str(runs[0].get("status", "unknown")), "" if details == "N/A" else str(details)

    def _run_flwr(self, command: list[str], deadline: float) -> subprocess.CompletedProcess[str]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RayEngineError(f"Timed out before `flwr {command[1]}` could run.")
        try:
            return subprocess.run(
                command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=min(remaining, CLI_TIMEOUT),
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise RayEngineError(f"`{subprocess.list2cmdline(command)}` timed out.") from None

    def _superlink_errors(self) -> str:
        """Return the SuperLink's last ERROR lines, which name the cause that the Control API reply omits."""
        lines = [line for line in self._superlink_output() if "ERROR" in line]
        return "\n".join(lines[-10:]) or "(none)"

    def _superlink_log_tail(self) -> str:
        return "\n".join(self._superlink_output()[-LOG_TAIL_LINES:]) or "(no SuperLink output)"

    def _superlink_output(self) -> list[str]:
        try:
            text = self.superlink_log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        return [_strip_ansi(line).rstrip() for line in text.splitlines() if line.strip()]

    def stop(self) -> None:
        """Stop the log stream, the SuperLink and every process this run started, then delete the work directory."""
        if self.log_stream is not None and self.log_stream.poll() is None:
            self.log_stream.terminate()
            try:
                self.log_stream.wait(timeout=PROCESS_EXIT_GRACE)
            except subprocess.TimeoutExpired:
                self.log_stream.kill()
                self.log_stream.wait()
        self._join_log_reader()

        self.processes.record_sessions()
        self._stop_superlink()
        self.processes.stop()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def _stop_superlink(self) -> None:
        if self.process is None:
            return
        _signal_group(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=PROCESS_EXIT_GRACE)
        except subprocess.TimeoutExpired:
            log.warning("SuperLink process %d ignored SIGTERM, so it gets SIGKILL.", self.process.pid)
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait()
        # Kill any child that stayed in the SuperLink's process group after the leader exited.
        _signal_group(self.process.pid, signal.SIGKILL)
        log.info("Stopped SuperLink process %d.", self.process.pid)
        self.process = None


def _parse_json_reply(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """Parse the JSON object that a ``flwr ... --format json`` command prints."""
    stdout = _strip_ansi(result.stdout)
    start = stdout.find("{")
    if start >= 0:
        try:
            reply = json.loads(stdout[start:])
        except json.JSONDecodeError:
            reply = None
        if isinstance(reply, dict):
            return reply
    output = "\n".join(part.strip() for part in (stdout, _strip_ansi(result.stderr)) if part.strip())
    raise RayEngineError(f"`flwr` exited with code {result.returncode} and printed no JSON reply:\n{output}")


def _signal_group(process_group: int, signal_number: int) -> None:
    try:
        os.killpg(process_group, signal_number)
    except (ProcessLookupError, PermissionError):
        pass


class _RunProcesses:
    """The processes that one ``run_with_ray`` call started, found through ``/proc``.

    ``flower-superlink`` and ``flower-superexec`` each start a new session, and
    ``flwr-simulation`` and every Ray process stay in the session of
    ``flower-superexec``. Ray's agents overwrite their environment with their
    process title, so the ``ENGINE_ID_ENV`` marker alone misses them, but their
    session id stays until they exit. A process belongs to the run if it carries
    the marker or lives in a session that a marked process leads.
    """

    def __init__(self, engine_id: str) -> None:
        self.marker = f"{ENGINE_ID_ENV}={engine_id}".encode()
        self.sessions: set[int] = set()

    def record_sessions(self) -> None:
        """Remember the sessions led by marked processes, so their members are found after the leader exits."""
        own_session = os.getsid(0)
        for pid, session, marked in self._scan():
            if marked and session == pid and session != own_session:
                self.sessions.add(session)

    def live(self) -> list[int]:
        """Return the ids of the run's processes that are still running (zombies excluded)."""
        own_pid = os.getpid()
        return [
            pid
            for pid, session, marked in self._scan()
            if pid != own_pid and (marked or session in self.sessions)
        ]

    def stop(self) -> None:
        """Send SIGTERM and then SIGKILL to the run's processes until none is left."""
        if not Path("/proc").is_dir():
            # TODO: find these processes without /proc (macOS). Until then only the
            # SuperLink's process group is stopped, and the rest is left to Flower's
            # parent-process monitors.
            return

        # flower-superexec exits within a second of losing the SuperLink, because
        # it polls its parent every 0.2 s. Give it and flwr-simulation a moment to
        # shut Ray down before signalling them.
        self._wait_for_exit(PROCESS_EXIT_GRACE)

        for signal_number in (signal.SIGTERM, signal.SIGKILL):
            survivors = self.live()
            if not survivors:
                return
            log.info("Sending %s to %d leftover Flower/Ray processes: %s", signal_number.name, len(survivors), survivors)
            for pid in survivors:
                try:
                    os.kill(pid, signal_number)
                except (ProcessLookupError, PermissionError):
                    pass
            self._wait_for_exit(PROCESS_EXIT_GRACE)

        survivors = self.live()
        if survivors:
            log.warning("Processes %s of this Ray run are still alive after SIGKILL.", survivors)

    def _wait_for_exit(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.live() and time.monotonic() < deadline:
            time.sleep(0.2)

    def _scan(self) -> list[tuple[int, int, bool]]:
        """Return ``(pid, session id, carries the marker)`` for every live process that this user can read."""
        if not Path("/proc").is_dir():
            return []
        processes = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text(encoding="utf-8", errors="replace")
            except OSError:  # the process has exited
                continue
            # The fields after the command name, which may itself contain ") ".
            state, _parent, _group, session = stat[stat.rindex(")") + 2 :].split()[:4]
            if state == "Z":
                continue
            try:
                environ = Path(entry.path, "environ").read_bytes()
            except OSError:  # exited, or another user's process
                environ = b""
            processes.append((int(entry.name), int(session), self.marker in environ.split(b"\0")))
        return processes
