"""The Docker target: the signed bundle, unchanged, in a container running ``edge-agent serve``.

The record lives where local services keep theirs (``EDGEDEPLOY_HOME/services/NAME/service.json``,
with ``"target": "docker"``) so :mod:`packager.services` dispatches to this class. Containers use
``--network host`` (the build machines have no bridge), CPU and memory limits from the spec, a
health check on ``/v2/health/ready`` and the keys as a read-only bind-mounted file. The container
verifies the bundle at start with the same code as a device, trusting the key(s) passed in.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from pathlib import Path
from typing import Any

from packager.atomic import atomic_write_json
from packager.errors import AlreadyExistsError, DeploymentError, NotFoundError
from packager.images import BASE_IMAGE, BUNDLE_PATH, build_image
from packager.targets.base import DeploymentSpec, Service, ServiceState
from packager.targets.local import LocalTarget, http_request

__all__ = ["DockerTarget"]

log = logging.getLogger(__name__)

_KEYS_IN_CONTAINER = "/run/edgedeploy/keys.json"
_TRUST_IN_CONTAINER = "/run/edgedeploy/trusted.pub"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DockerTarget:
    """Services as containers in a Docker engine (``base_url`` or ``DOCKER_HOST``)."""

    name = "docker"

    def __init__(self, base_url: str | None = None, trusted_key: Path | None = None,
                 base_image: str = BASE_IMAGE, root: Path | None = None) -> None:
        self._base_url = base_url
        self.trusted_key = trusted_key
        self.base_image = base_image
        self._local = LocalTarget(root)
        self._client: Any = None

    @property
    def client(self) -> Any:
        """The docker SDK client (created on first use)."""
        if self._client is None:
            import docker

            try:
                self._client = docker.DockerClient(base_url=self._base_url) if self._base_url \
                    else docker.from_env()
            except docker.errors.DockerException as exc:
                raise DeploymentError(f"no Docker engine answers ({exc}); set DOCKER_HOST") from exc
        return self._client

    def close(self) -> None:
        """Close the engine connection."""
        if self._client is not None:
            self._client.close()
            self._client = None

    # records ---------------------------------------------------------------------------------------

    def _record(self, name: str) -> dict[str, Any]:
        record = self._local.record(name)
        if record.get("target") != "docker":
            raise NotFoundError(f"service {name!r} is not a docker service")
        return record

    def _save(self, name: str, record: dict[str, Any]) -> None:
        atomic_write_json(self._local.files(name).record, record)

    # containers ------------------------------------------------------------------------------------

    def _trust_key(self) -> Path:
        if self.trusted_key is not None:
            return Path(self.trusted_key)
        from packager.home import edgedeploy_home

        keys = sorted((edgedeploy_home() / "trust").glob("*.pub"))
        if not keys:
            raise DeploymentError("no trusted public key to pass to the container; give trusted_key=")
        return keys[0]

    def _run_container(self, spec: DeploymentSpec, image: str, keys_file: Path, suffix: str,
                       http_port: int, grpc_port: int, auth: bool) -> Any:
        command = ["edge-agent", "serve", "--bundle", BUNDLE_PATH, "--name", spec.name,
                   "--host", spec.host, "--http-port", str(http_port),
                   "--grpc-port", str(grpc_port), "--trusted-key", _TRUST_IN_CONTAINER,
                   "--keys-file", _KEYS_IN_CONTAINER, "--auth" if auth else "--no-auth"]
        limits: dict[str, Any] = {}
        if spec.cpu:
            limits["nano_cpus"] = int(spec.cpu * 1e9)
        if spec.memory_mb:
            limits["mem_limit"] = f"{spec.memory_mb}m"
        ready = f"http://127.0.0.1:{http_port}/v2/health/ready"
        healthcheck = {
            "test": ["CMD", "python3", "-c",
                     f"import urllib.request; urllib.request.urlopen('{ready}', timeout=2)"],
            "interval": 2_000_000_000, "timeout": 3_000_000_000, "retries": 3,
        }
        return self.client.containers.run(
            image, command, name=f"edgedeploy-{spec.name}-{suffix}", detach=True,
            network_mode="host", healthcheck=healthcheck,
            labels={"edgedeploy.service": spec.name},
            volumes={str(keys_file): {"bind": _KEYS_IN_CONTAINER, "mode": "ro"},
                     str(self._trust_key()): {"bind": _TRUST_IN_CONTAINER, "mode": "ro"}},
            **limits,
        )

    def _wait_container(self, container: Any, http_port: int, timeout: float) -> None:
        url = f"http://127.0.0.1:{http_port}/v2/health/ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            container.reload()
            if container.status in ("exited", "dead"):
                logs = container.logs(tail=20).decode(errors="replace")
                raise DeploymentError(f"container {container.name} stopped at start:\n{logs}")
            try:
                if http_request("GET", url, timeout=2)[0] == 200:
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.3)
        raise DeploymentError(f"container {container.name} was not ready within {timeout:.0f} s")

    # protocol --------------------------------------------------------------------------------------

    def deploy(self, spec: DeploymentSpec, wait: bool = True, timeout: float = 120.0) -> Service:
        """Build the image, run the container, and (optionally) wait until it is ready."""
        spec.validate()
        files = self._local.files(spec.name)
        self._local.root.mkdir(parents=True, exist_ok=True)
        try:
            files.root.mkdir()
        except FileExistsError:
            raise AlreadyExistsError(f"service {spec.name!r} exists; update or delete it") from None
        try:
            return self._deploy(spec, files, wait, timeout)
        except BaseException:
            self._remove_containers(spec.name)
            import shutil

            shutil.rmtree(files.root, ignore_errors=True)
            raise

    def _deploy(self, spec: DeploymentSpec, files: Any, wait: bool, timeout: float) -> Service:
        from edge_agent.auth import generate_keys

        keys = generate_keys()
        atomic_write_json(files.keys, keys)
        build = build_image(self.client, spec.bundle, spec.name, self.base_image)
        http_port = spec.port or _free_port()
        grpc_port = spec.grpc_port or _free_port()
        auth = bool(spec.auth) if spec.auth is not None else spec.host not in ("127.0.0.1", "localhost", "::1")
        container = self._run_container(spec, build.tag, files.keys.resolve(), "1", http_port,
                                        grpc_port, auth)
        record = {
            "name": spec.name, "target": "docker", "image": build.tag, "container": container.name,
            "generation": 1, "http_port": http_port, "grpc_port": grpc_port, "auth": auth,
            "host": spec.host, "bundle_sha256": build.bundle_sha256, "cpu": spec.cpu,
            "memory_mb": spec.memory_mb, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self._save(spec.name, record)
        if wait:
            self._wait_container(container, http_port, timeout)
        return self.status(spec.name)

    def wait_ready(self, name: str, timeout: float = 60.0) -> Service:
        """Block until the service's container answers its readiness probe."""
        record = self._record(name)
        self._wait_container(self._container(record), int(record["http_port"]), timeout)
        return self.status(name)

    def _container(self, record: dict[str, Any]) -> Any:
        import docker

        try:
            return self.client.containers.get(record["container"])
        except docker.errors.NotFound:
            raise NotFoundError(f"container {record['container']} is gone") from None

    def status(self, name: str) -> Service:
        """The service with a state from the container and its readiness probe."""
        record = self._record(name)
        try:
            container = self._container(record)
            container.reload()
            running = container.status == "running"
        except NotFoundError:
            running = False
        base = f"http://127.0.0.1:{record['http_port']}"
        state = ServiceState.STOPPED
        if running:
            try:
                ok = http_request("GET", base + "/v2/health/ready", timeout=2)[0] == 200
            except Exception:  # noqa: BLE001 - a probe failure is a state, not an error
                ok = False
            state = ServiceState.HEALTHY if ok else ServiceState.STARTING
        return Service(
            name=name, state=state, target="docker", scoring_uri=base + "/score",
            swagger_uri=base + "/swagger.json", grpc_target=f"127.0.0.1:{record['grpc_port']}",
            auth_enabled=bool(record["auth"]), bundle_sha256=record["bundle_sha256"],
            http_port=int(record["http_port"]), grpc_port=int(record["grpc_port"]),
            created=record.get("created"), updated=record.get("updated"),
            resources={"cpu": record.get("cpu"), "memory_mb": record.get("memory_mb"),
                       "image": record["image"], "container": record["container"]},
        )

    def logs(self, name: str, tail: int | None = None) -> str:
        """The container's output."""
        container = self._container(self._record(name))
        return str(container.logs(tail=tail if tail is not None else "all").decode(errors="replace"))

    def update(self, name: str, bundle: Path) -> Service:
        """Start a new container from the new bundle, check it, switch, then stop the old one.

        With host networking two containers cannot share a port, so the new one listens on fresh
        ports and the record switches to them once it is ready.
        """
        record = self._record(name)
        files = self._local.files(name)
        spec = DeploymentSpec(name=name, bundle=Path(bundle), cpu=record.get("cpu"),
                              memory_mb=record.get("memory_mb"), host=record.get("host", "127.0.0.1"))
        build = build_image(self.client, spec.bundle, name, self.base_image)
        generation = int(record.get("generation", 1)) + 1
        http_port, grpc_port = _free_port(), _free_port()
        new = self._run_container(spec, build.tag, files.keys.resolve(), str(generation),
                                  http_port, grpc_port, bool(record["auth"]))
        try:
            self._wait_container(new, http_port, 120.0)
        except BaseException:
            new.remove(force=True)
            raise
        old = record["container"]
        record.update(image=build.tag, container=new.name, generation=generation, http_port=http_port,
                      grpc_port=grpc_port, bundle_sha256=build.bundle_sha256,
                      updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self._save(name, record)
        self._remove(old)
        return self.status(name)

    def _remove(self, container_name: str) -> None:
        import docker

        with contextlib.suppress(docker.errors.NotFound):
            self.client.containers.get(container_name).remove(force=True)

    def _remove_containers(self, name: str) -> None:
        for container in self.client.containers.list(all=True, filters={"label": f"edgedeploy.service={name}"}):
            container.remove(force=True)

    def delete(self, name: str) -> None:
        """Remove every container of the service and its record."""
        import shutil

        self._record(name)
        self._remove_containers(name)
        shutil.rmtree(self._local.files(name).root, ignore_errors=True)
        log.info("deleted docker service %s", name)


