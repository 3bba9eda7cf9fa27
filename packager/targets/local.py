"""The local target: each service is a background ``edge-agent serve`` process on this machine.

Layout under ``EDGEDEPLOY_HOME/services/NAME/`` (see :mod:`packager.targets.store`): ``service.json``
(the record) and ``keys.json`` as for every target, plus ``service.log`` (the process's stdout and
stderr), ``agent-state.json`` (written by the agent: real ports, pid, readiness), ``bundles/`` (the
served bundle, copied in) and ``work/`` (the agent's extracted models). The bundle is verified
before anything starts. The agent re-reads ``keys.json`` when it changes, so a key rotation is
only a file write.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from edge_agent.atomic import read_json
from edge_agent.bundle import BundleManifest, bundle_sha256, verify_bundle
from edge_agent.errors import DeploymentError, EdgeDeployError, NotFoundError, UsageError
from edge_agent.home import edgedeploy_home
from packager.targets.base import DeploymentSpec, Service, ServiceState
from packager.targets.client import error_text, http_request, probe
from packager.targets.store import ServiceFiles, ServiceStore

__all__ = ["LocalTarget"]

log = logging.getLogger(__name__)

_STOP_GRACE_S = 10.0
_KILL_WAIT_S = 5.0
_LOAD_TIMEOUT_S = 120.0
_LOG_TAIL_ON_ERROR = 6
# Started through a tiny launcher that exits at once: the service is reparented away from the
# caller, so a long-lived caller (a notebook, a test run) never holds a child it must reap.
_LAUNCHER = (
    "import subprocess, sys\n"
    "log = open(sys.argv[1], 'ab')\n"
    "p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log, stderr=log,\n"
    "                     start_new_session=True, close_fds=True)\n"
    "print(p.pid)\n"
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _client_host(host: str) -> str:
    """The address a client on this machine uses (a wildcard bind is reached on loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _alive(pid: int | None, create_time: float | None) -> bool:
    """True when ``pid`` is our running process (not a zombie, not a reused pid)."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 1.0:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _create_time(pid: int) -> float | None:
    """When ``pid`` started (it tells our process from a later one reusing the pid), or None."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _wait_dead(pid: int, create_time: float | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid, create_time):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _stop_process(pid: int | None, create_time: float | None) -> None:
    """SIGTERM the service's process group, then SIGKILL it if it outlives the grace period."""
    if not _alive(pid, create_time):
        return
    assert pid is not None
    _signal_group(pid, signal.SIGTERM)
    if _wait_dead(pid, create_time, _STOP_GRACE_S):
        return
    log.warning("service process %s ignored SIGTERM for %.0f s; killing it", pid, _STOP_GRACE_S)
    _signal_group(pid, signal.SIGKILL)
    _wait_dead(pid, create_time, _KILL_WAIT_S)


def _tail(path: Path, lines: int | None) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    if lines is None:
        return text
    kept = text.splitlines()[-lines:] if lines > 0 else []
    return "".join(line + "\n" for line in kept)


def _log_summary(path: Path) -> str:
    lines = [line.strip() for line in _tail(path, 40).splitlines() if line.strip()]
    return " | ".join(lines[-_LOG_TAIL_ON_ERROR:]) or "(the log is empty)"


def _check_port_free(host: str, port: int | None, option: str) -> None:
    """Fail fast, before starting anything, when a fixed port is already taken."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise DeploymentError(
                f"cannot listen on {host}:{port} ({exc.strerror}); choose another {option} "
                "or 0 for a free one"
            ) from None


def _copy_in(source: Path, bundles: Path) -> tuple[Path, str]:
    """Copy a bundle into the service folder under its sha256; returns (path, sha256)."""
    digest = bundle_sha256(source)
    bundles.mkdir(parents=True, exist_ok=True)
    target = bundles / f"{digest[:16]}.edb"
    if not target.exists():
        tmp = bundles / f".{target.name}.tmp"
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    return target, digest


def _new_keys() -> dict[str, str]:
    from edge_agent.auth import generate_keys

    return generate_keys()


def _require_bundle_file(bundle: Path) -> Path:
    bundle = Path(bundle).expanduser()
    if not bundle.is_file():
        raise NotFoundError(f"bundle not found: {bundle} (build one with 'edgedeploy package')")
    return bundle.resolve()


# --- the target ------------------------------------------------------------------------------------


class LocalTarget:
    """Services as background processes on this machine (see the module docstring for the layout)."""

    name = "local"

    def __init__(self, store: ServiceStore | None = None) -> None:
        self.store = store or ServiceStore()

    def files(self, name: str) -> ServiceFiles:
        """The paths of service ``name`` (which may not exist)."""
        return self.store.files(name)

    def record(self, name: str) -> dict[str, Any]:
        """The record of local service ``name``; NotFoundError if there is none."""
        return self.store.record(name, self.name)

    def _save(self, name: str, record: dict[str, Any]) -> None:
        self.store.save(name, record)

    def close(self) -> None:
        """Nothing to release: each call opens and closes its own HTTP connection."""

    # deploy ----------------------------------------------------------------------------------------

    def deploy(self, spec: DeploymentSpec, wait: bool = True, timeout: float = 60.0) -> Service:
        """Verify the bundle, start ``edge-agent serve`` in the background and (optionally) wait."""
        spec.validate()
        source = _require_bundle_file(spec.bundle)
        files = self.store.claim(spec.name)
        try:
            self._start(spec, source, files)
            if wait:
                self._wait_ready(spec.name, timeout)
        except BaseException:
            record = self._safe_record(spec.name)
            _stop_process(record.get("pid"), record.get("pid_create_time"))
            self.store.remove(spec.name)
            raise
        return self.status(spec.name)

    def _safe_record(self, name: str) -> dict[str, Any]:
        try:
            return self.record(name)
        except EdgeDeployError:
            return {}

    def _start(self, spec: DeploymentSpec, source: Path, files: ServiceFiles) -> None:
        auth = spec.auth if spec.auth is not None else not _is_loopback(spec.host)
        record: dict[str, Any] = {
            "name": spec.name, "target": self.name, "state": ServiceState.STARTING, "host": spec.host,
            "auth_enabled": auth, "created": _now(), "updated": _now(),
            "resources": {"cpu": spec.cpu, "memory_mb": spec.memory_mb, "replicas": spec.replicas},
        }
        self._save(spec.name, record)
        bundle, digest = _copy_in(source, files.bundles)
        manifest = verify_bundle(bundle)
        _check_port_free(spec.host, spec.port, "--port")
        _check_port_free(spec.host, spec.grpc_port, "--grpc-port")
        self.store.write_keys(spec.name, _new_keys())
        record.update(_bundle_fields(manifest, bundle, digest))
        pid = self._spawn(spec, files, bundle, record["model"], auth)
        record.update(pid=pid, pid_create_time=_create_time(pid))
        self._save(spec.name, record)
        log.info("started service %s (pid %s) from %s", spec.name, pid, source)

    def agent_command(self, spec: DeploymentSpec, files: ServiceFiles, bundle: Path, model: str,
                      auth: bool) -> list[str]:
        """The ``edge-agent serve`` command line of a service; a subclass may wrap it (``nice``, say).

        The process it starts must keep the pid of the command (``exec``), since that pid is
        what ``status`` and ``delete`` follow.
        """
        return [
            sys.executable, "-m", "edge_agent.cli", "serve", "--bundle", str(bundle), "--name", model,
            "--host", spec.host, "--http-port", str(spec.port or 0), "--grpc-port", str(spec.grpc_port or 0),
            "--keys-file", str(files.keys), "--auth" if auth else "--no-auth",
            "--state-file", str(files.agent_state), "--workdir", str(files.work),
        ]

    def _spawn(self, spec: DeploymentSpec, files: ServiceFiles, bundle: Path, model: str, auth: bool) -> int:
        files.work.mkdir(parents=True, exist_ok=True)
        command = self.agent_command(spec, files, bundle, model, auth)
        env = dict(os.environ, PYTHONUNBUFFERED="1", EDGEDEPLOY_HOME=str(edgedeploy_home()))
        launched = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", _LAUNCHER, str(files.log), *command],
            capture_output=True, text=True, env=env, cwd=files.root, check=False, timeout=30,
        )
        if launched.returncode != 0 or not launched.stdout.strip().isdigit():
            raise DeploymentError(f"could not start edge-agent: {launched.stderr.strip() or 'no pid'}")
        return int(launched.stdout.strip())

    def wait_ready(
        self, name: str, timeout: float = 60.0, on_tick: Callable[[], None] | None = None
    ) -> Service:
        """Block until service ``name`` answers its readiness probe; DeploymentError otherwise."""
        self._wait_ready(name, timeout, on_tick)
        return self.status(name)

    def _wait_ready(self, name: str, timeout: float, on_tick: Callable[[], None] | None = None) -> None:
        files = self.files(name)
        deadline = time.monotonic() + timeout
        while True:
            record = self.record(name)
            agent = _read_agent_state(files)
            if agent.get("http_port") and probe(_base_url(record, agent) + "/v2/health/ready"):
                self._mark_running(name, record, agent)
                return
            if agent.get("error"):
                raise DeploymentError(f"service {name!r} failed to start: {agent['error']}")
            if not _alive(record.get("pid"), record.get("pid_create_time")):
                raise DeploymentError(
                    f"service {name!r} exited while starting; last log lines: {_log_summary(files.log)}"
                )
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"service {name!r} was not ready within {timeout:.0f} s; "
                    f"last log lines: {_log_summary(files.log)}"
                )
            if on_tick is not None:
                on_tick()
            time.sleep(0.1)

    def _mark_running(self, name: str, record: dict[str, Any], agent: dict[str, Any]) -> None:
        record.update(state="running", http_port=agent["http_port"], grpc_port=agent.get("grpc_port"))
        self._save(name, record)

    # status, logs ------------------------------------------------------------------------------------

    def status(self, name: str) -> Service:
        """The service with its live state: healthy, unhealthy, starting or stopped."""
        record = self.record(name)
        agent = _read_agent_state(self.files(name))
        http_port = record.get("http_port") or agent.get("http_port")
        grpc_port = record.get("grpc_port") or agent.get("grpc_port")
        alive = _alive(record.get("pid"), record.get("pid_create_time"))
        host = _client_host(record.get("host", "127.0.0.1"))
        base = f"http://{host}:{http_port}" if http_port else None
        if not alive:
            state = ServiceState.STOPPED
        elif base and probe(base + "/v2/health/ready"):
            state = ServiceState.HEALTHY
        else:
            starting = record.get("state") == ServiceState.STARTING
            state = ServiceState.STARTING if starting else ServiceState.UNHEALTHY
        return Service(
            name=name, state=state, target=self.name,
            scoring_uri=f"{base}/score" if base else None,
            swagger_uri=f"{base}/swagger.json" if base else None,
            grpc_target=f"{host}:{grpc_port}" if grpc_port else None,
            auth_enabled=bool(record.get("auth_enabled")), model=record.get("model"),
            version=record.get("version"), pid=record.get("pid") if alive else None,
            bundle_sha256=record.get("bundle_sha256"), http_port=http_port, grpc_port=grpc_port,
            created=record.get("created"), updated=record.get("updated"),
            resources=dict(record.get("resources") or {}),
        )

    def logs(self, name: str, tail: int | None = None) -> str:
        """The service log (stdout and stderr of the agent), the last ``tail`` lines when given."""
        self.record(name)
        if tail is not None and tail < 0:
            raise UsageError(f"--tail must be 0 or more, not {tail}")
        return _tail(self.files(name).log, tail)

    # keys ----------------------------------------------------------------------------------------------

    def keys(self, name: str) -> dict[str, str]:
        """``{"primary_key", "secondary_key"}`` of service ``name``."""
        self.record(name)
        return self.store.keys(name)

    def regenerate_key(self, name: str, which: str) -> dict[str, str]:
        """Replace one key; the running service accepts the new key and refuses the old at once."""
        self.record(name)
        keys = self.store.rotated_keys(name, which)
        self.store.write_keys(name, keys)
        return keys

    # update, delete ----------------------------------------------------------------------------------

    def update(self, name: str, bundle: Path) -> Service:
        """Verify ``bundle``, copy it in and hot-swap it through the repository API (no failed requests)."""
        record = self.record(name)
        source = _require_bundle_file(bundle)
        if not _alive(record.get("pid"), record.get("pid_create_time")):
            raise DeploymentError(
                f"service {name!r} is not running; remove it with 'edgedeploy service delete {name}' "
                "and deploy again"
            )
        files = self.files(name)
        old = Path(record["bundle"]) if record.get("bundle") else None
        copied, digest = _copy_in(source, files.bundles)
        try:
            manifest = verify_bundle(copied)
            self._load_remote(name, record, copied)
        except BaseException:
            if copied != old:
                copied.unlink(missing_ok=True)
            raise
        record.update(_bundle_fields(manifest, copied, digest), model=record["model"], updated=_now())
        self._save(name, record)
        if old is not None and old != copied:
            old.unlink(missing_ok=True)
        return self.status(name)

    def _load_remote(self, name: str, record: dict[str, Any], bundle: Path) -> None:
        agent = _read_agent_state(self.files(name))
        url = f"{_base_url(record, agent)}/v2/repository/models/{record['model']}/load"
        headers = {"Content-Type": "application/json"}
        if record.get("auth_enabled"):
            headers["Authorization"] = f"Bearer {self.keys(name)['primary_key']}"
        body = json.dumps({"parameters": {"bundle": str(bundle)}}).encode()
        status, answer = http_request("POST", url, body, headers, timeout=_LOAD_TIMEOUT_S)
        if status != 200:
            raise DeploymentError(
                f"service {name!r} refused the new bundle (HTTP {status}): {error_text(answer)}"
            )

    def delete(self, name: str) -> None:
        """Stop the process (SIGTERM, then SIGKILL after a grace period) and remove its folder."""
        files = self.files(name)
        try:
            record = self.record(name)
        except DeploymentError:
            # A corrupt record still names no one else's process: find ours by its state file.
            record = {"pid": _agent_pid(files)}
        _stop_process(record.get("pid"), record.get("pid_create_time"))
        self.store.remove(name)
        log.info("deleted service %s", name)


def _agent_pid(files: ServiceFiles) -> int | None:
    """The pid in the agent's state file, if that process is still serving this service."""
    pid = _read_agent_state(files).get("pid")
    if not isinstance(pid, int):
        return None
    try:
        cmdline = psutil.Process(pid).cmdline()
    except psutil.Error:
        return None
    return pid if str(files.agent_state) in cmdline else None


def _bundle_fields(manifest: BundleManifest, bundle: Path, digest: str) -> dict[str, Any]:
    return {
        "model": manifest.name, "version": manifest.version, "bundle": str(bundle),
        "bundle_sha256": digest, "profile": manifest.profile_name,
    }


def _read_agent_state(files: ServiceFiles) -> dict[str, Any]:
    try:
        return dict(read_json(files.agent_state))
    except (FileNotFoundError, ValueError):
        return {}


def _base_url(record: dict[str, Any], agent: dict[str, Any]) -> str:
    port = record.get("http_port") or agent.get("http_port")
    if not port:
        raise DeploymentError(f"service {record.get('name')!r} has not reported its port yet")
    return f"http://{_client_host(record.get('host', '127.0.0.1'))}:{port}"
