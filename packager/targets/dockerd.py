"""A private Docker engine: start Debian's ``dockerd`` on its own socket when no engine answers.

Used by the tests and by ``edgedeploy image base`` on machines where no system engine runs. The
engine uses the ``vfs`` storage driver and no bridge or iptables (none are available in the build
sandboxes), so containers run with ``--network host``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import DeploymentError

__all__ = ["PrivateDockerd", "engine_answers", "start_private_dockerd"]

log = logging.getLogger(__name__)


def engine_answers(base_url: str | None = None, timeout: float = 3.0) -> bool:
    """True when a Docker engine at ``base_url`` (default: ``DOCKER_HOST`` or the system socket) pings."""
    import docker  # optional dependency, only for cloud targets

    try:
        client = docker.DockerClient(base_url=base_url, timeout=timeout) if base_url \
            else docker.from_env(timeout=timeout)
    except docker.errors.DockerException:
        return False
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - any failure means "no engine here"
        return False
    finally:
        client.close()


@dataclass
class PrivateDockerd:
    """A running private dockerd: its socket URL and process; :meth:`stop` ends it."""

    base_url: str
    root: Path
    process: subprocess.Popen[bytes]

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the engine (SIGTERM, then SIGKILL after ``timeout``)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stdout:
            self.process.stdout.close()


def start_private_dockerd(root: Path, timeout: float = 60.0) -> PrivateDockerd:
    """Start ``dockerd`` with data under ``root``; DeploymentError if it is missing or not root."""
    binary = shutil.which("dockerd")
    if binary is None:
        raise DeploymentError("dockerd is not installed: run .ci/install-docker.sh (apt-get install docker.io)")
    if os.geteuid() != 0:
        raise DeploymentError("a private dockerd needs root; set DOCKER_HOST to a running engine instead")
    root = Path(root)
    # Unix socket paths are limited to ~107 bytes: keep the runtime dir short.
    exec_root = Path("/tmp") / f"edd-{os.getpid()}-{int(time.time())}"
    for path in (root / "data", exec_root):
        path.mkdir(parents=True, exist_ok=True)
    sock = exec_root / "docker.sock"
    log_file = open(root / "dockerd.log", "ab")  # noqa: SIM115 - lives as long as the engine
    process = subprocess.Popen(
        [binary, "--storage-driver=vfs", "--iptables=false", "--ip6tables=false", "--bridge=none",
         "-H", f"unix://{sock}", "--data-root", str(root / "data"), "--exec-root", str(exec_root),
         "--pidfile", str(exec_root / "docker.pid")],
        stdout=log_file, stderr=subprocess.STDOUT,
    )
    log_file.close()
    engine = PrivateDockerd(f"unix://{sock}", root, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeploymentError(f"dockerd exited with {process.returncode}; see {root / 'dockerd.log'}")
        if sock.exists() and engine_answers(engine.base_url, timeout=2.0):
            log.info("private dockerd ready at %s", engine.base_url)
            return engine
        time.sleep(0.3)
    engine.stop()
    raise DeploymentError(f"dockerd did not answer within {timeout:.0f} s; see {root / 'dockerd.log'}")
