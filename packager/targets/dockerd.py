"""A private Docker engine: start Debian's ``dockerd`` on its own socket when no engine answers.

Used by the tests and by ``edgedeploy image base`` on machines where no system engine runs. The
engine has no bridge or iptables (none are available in the build sandboxes), so containers run with
``--network host``. Its storage driver is ``overlay2`` where the data root allows it (layers and
containers share files) and ``vfs`` elsewhere (an overlayfs data root, say), which copies the whole
root file system for every layer and every container: a 600 MB image costs a minute of copying per build.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import DeploymentError

__all__ = ["STORAGE_DRIVERS", "PrivateDockerd", "engine_answers", "start_private_dockerd"]

log = logging.getLogger(__name__)

#: Tried in this order: the first one dockerd starts with is used.
STORAGE_DRIVERS = ("overlay2", "vfs")


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
    """A running private dockerd: its socket URL, process and storage driver; :meth:`stop` ends it."""

    base_url: str
    root: Path
    process: subprocess.Popen[bytes]
    storage_driver: str = "vfs"
    unmount_data_root: bool = True  # False when the data root was a mount point before dockerd started

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the engine (SIGTERM, then SIGKILL after ``timeout``) and release its data root."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stdout:
            self.process.stdout.close()
        if self.unmount_data_root:
            _release_data_root(self.root / "data")


def _release_data_root(data: Path) -> None:
    """Unmount ``data`` if dockerd left it bind-mounted on itself (it does when it fails to start or is killed).

    A clean shutdown unmounts it; a left mount makes the folder impossible to delete ("device busy").
    """
    if _is_mount_point(data):
        done = subprocess.run(["umount", str(data)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log.warning("could not unmount the dockerd data root %s: %s", data, done.stderr.strip())


def _is_mount_point(path: Path) -> bool:
    """Whether ``path`` is a mount point, a bind mount on the same file system included (unlike os.path.ismount)."""
    target = os.path.realpath(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return os.path.ismount(target)
    # the fifth field is the mount point, with space, tab, newline and backslash written in octal (\040)
    points = {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
              for line in lines if len(line.split()) > 4}
    return target in points


def start_private_dockerd(root: Path, timeout: float = 60.0,
                          storage_drivers: tuple[str, ...] = STORAGE_DRIVERS) -> PrivateDockerd:
    """Start ``dockerd`` with data under ``root``, with the first of ``storage_drivers`` it accepts.

    DeploymentError if dockerd is missing, we are not root, or it starts with none of the drivers.
    """
    binary = shutil.which("dockerd")
    if binary is None:
        raise DeploymentError("dockerd is not installed: run .ci/install-docker.sh (apt-get install docker.io)")
    if os.geteuid() != 0:
        raise DeploymentError("a private dockerd needs root; set DOCKER_HOST to a running engine instead")
    failures = []
    for driver in storage_drivers:
        try:
            return _start_dockerd(binary, Path(root), driver, timeout)
        except DeploymentError as exc:
            log.info("private dockerd with the %s storage driver: %s", driver, exc)
            failures.append(f"{driver}: {exc}")
    raise DeploymentError("dockerd started with no storage driver (" + "; ".join(failures) + ")")


def _start_dockerd(binary: str, root: Path, driver: str, timeout: float) -> PrivateDockerd:
    """One dockerd with ``driver``; DeploymentError if it exits or does not answer within ``timeout``."""
    # Unix socket paths are limited to ~107 bytes: keep the runtime dir short.
    exec_root = Path("/tmp") / f"edd-{os.getpid()}-{int(time.time())}-{driver}"
    for path in (root / "data", exec_root):
        path.mkdir(parents=True, exist_ok=True)
    unmount = not _is_mount_point(root / "data")  # a mount of someone's stays
    sock = exec_root / "docker.sock"
    log_file = open(root / "dockerd.log", "ab")  # noqa: SIM115 - lives as long as the engine
    process = subprocess.Popen(
        [binary, f"--storage-driver={driver}", "--iptables=false", "--ip6tables=false", "--bridge=none",
         "-H", f"unix://{sock}", "--data-root", str(root / "data"), "--exec-root", str(exec_root),
         "--pidfile", str(exec_root / "docker.pid")],
        stdout=log_file, stderr=subprocess.STDOUT,
    )
    log_file.close()
    engine = PrivateDockerd(f"unix://{sock}", root, process, driver, unmount)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            engine.stop()
            raise DeploymentError(f"dockerd exited with {process.returncode}; see {root / 'dockerd.log'}")
        if sock.exists() and engine_answers(engine.base_url, timeout=2.0):
            log.info("private dockerd ready at %s (%s storage driver)", engine.base_url, driver)
            return engine
        time.sleep(0.3)
    engine.stop()
    raise DeploymentError(f"dockerd did not answer within {timeout:.0f} s; see {root / 'dockerd.log'}")
