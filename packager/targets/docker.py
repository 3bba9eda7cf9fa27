"""The Docker target: the signed bundle, unchanged, in a container running ``edge-agent serve``.

The record and keys live in the shared service store (``EDGEDEPLOY_HOME/services/NAME/``, with
``"target": "docker"``) so :mod:`packager.services` dispatches to this class. Containers use
``--network host`` (the build machines have no bridge), CPU and memory limits from the spec, a
health check on ``/v2/health/ready`` and the keys as a read-only bind-mounted file. The container
verifies the bundle at start with the same code as a device, trusting the key(s) passed in.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from edge_agent.errors import DeploymentError, NotFoundError
from packager.images import BASE_IMAGE, BUNDLE_PATH, build_image
from packager.targets.base import DeploymentSpec, Service, ServiceState, free_port
from packager.targets.client import http_request
from packager.targets.store import ServiceFiles, ServiceStore

__all__ = ["DockerTarget"]

log = logging.getLogger(__name__)

# The service folder is mounted (not keys.json itself): a key rotation replaces the file by rename,
# and a bind-mounted file would keep showing the old inode to the container.
_SERVICE_IN_CONTAINER = "/run/edgedeploy/service"
_KEYS_IN_CONTAINER = _SERVICE_IN_CONTAINER + "/keys.json"
_TRUST_IN_CONTAINER = "/run/edgedeploy/trust"
_STATE_IN_CONTAINER = "/tmp/edgedeploy-serve.json"
_STOP_GRACE_SECONDS = 15
_HEALTH_PROBE = ("import json, urllib.request; assert json.load(open('{state}'))['ready']; "
                 "urllib.request.urlopen('http://127.0.0.1:{port}/v2/health/ready', timeout=2)")


class DockerTarget:
    """Services as containers in a Docker engine (``base_url`` or ``DOCKER_HOST``)."""

    name = "docker"

    def __init__(self, base_url: str | None = None, trusted_key: Path | None = None,
                 base_image: str = BASE_IMAGE, store: ServiceStore | None = None) -> None:
        self._base_url = base_url
        self.trusted_key = trusted_key
        self.base_image = base_image
        self.store = store or ServiceStore()
        self._client: Any = None

    @property
    def client(self) -> Any:
        """The docker SDK client (created on first use)."""
        if self._client is None:
            import docker

            url = self._base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
            if url.startswith("unix://") and not Path(url.removeprefix("unix://")).exists():
                # checked first: the SDK leaks the socket of a failed unix connection
                raise DeploymentError(f"no Docker engine answers at {url} (no such socket); start Docker or "
                                      "set DOCKER_HOST")
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
        return self.store.record(name, self.name)

    def _save(self, name: str, record: dict[str, Any]) -> None:
        self.store.save(name, record)

    def keys(self, name: str) -> dict[str, str]:
        """The service's keys (the file its containers read)."""
        self._record(name)
        return self.store.keys(name)

    def regenerate_key(self, name: str, which: str) -> dict[str, str]:
        """Replace one key; the containers see the service folder mounted, so they use it at once."""
        self._record(name)
        keys = self.store.rotated_keys(name, which)
        self.store.write_keys(name, keys)
        return keys

    # containers ------------------------------------------------------------------------------------

    def _trusted_keys(self) -> list[Path]:
        """The public keys the container trusts: ``trusted_key`` or every key this host trusts."""
        if self.trusted_key is not None:
            return [Path(self.trusted_key).resolve()]
        from edge_agent.home import edgedeploy_home

        keys = sorted(path.resolve() for path in (edgedeploy_home() / "trust").glob("*.pub"))
        if not keys:
            raise DeploymentError("no trusted public key to pass to the container: run `edgedeploy keys "
                                  "trust` or give trusted_key=")
        return keys

    def _run_container(self, spec: DeploymentSpec, image: str, service_dir: Path, suffix: str,
                       http_port: int, grpc_port: int, auth: bool) -> Any:
        trusted = self._trusted_keys()
        command = ["edge-agent", "serve", "--bundle", BUNDLE_PATH,  # served under the bundle's model name
                   "--host", spec.host, "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                   "--keys-file", _KEYS_IN_CONTAINER, "--auth" if auth else "--no-auth",
                   "--state-file", _STATE_IN_CONTAINER, "--reuse-port"]
        volumes = {str(service_dir): {"bind": _SERVICE_IN_CONTAINER, "mode": "ro"}}
        for index, key in enumerate(trusted):
            inside = f"{_TRUST_IN_CONTAINER}/{index}-{key.name}"
            command += ["--trusted-key", inside]
            volumes[str(key)] = {"bind": inside, "mode": "ro"}
        limits: dict[str, Any] = {}
        if spec.cpu:
            limits["nano_cpus"] = int(spec.cpu * 1e9)
        if spec.memory_mb:
            limits["mem_limit"] = f"{spec.memory_mb}m"
        healthcheck = {
            # this container's own readiness (the port may be shared with the one it replaces)
            "test": ["CMD", "python3", "-c", _HEALTH_PROBE.format(state=_STATE_IN_CONTAINER, port=http_port)],
            "interval": 2_000_000_000, "timeout": 3_000_000_000, "retries": 3,
        }
        return self.client.containers.run(
            image, command, name=f"edgedeploy-{spec.name}-{suffix}", detach=True,
            network_mode="host", healthcheck=healthcheck,
            labels={"edgedeploy.service": spec.name}, volumes=volumes, **limits,
        )

    @staticmethod
    def _container_ready(container: Any) -> bool:
        """Whether this container's server says it is ready (its state file, not the shared port)."""
        code, output = container.exec_run(["cat", _STATE_IN_CONTAINER])
        if code != 0:
            return False
        try:
            return bool(json.loads(output).get("ready"))
        except ValueError:
            return False

    def _ready_now(self, container: Any, url: str) -> bool:
        """One readiness check; a server not listening yet, or an exec refused meanwhile, is "not yet"."""
        import docker

        try:
            return self._container_ready(container) and http_request("GET", url, timeout=2)[0] == 200
        except (DeploymentError, http.client.HTTPException, docker.errors.APIError) as exc:
            log.debug("container %s not ready yet: %s", container.name, exc)
            return False

    def _wait_container(self, container: Any, http_port: int, timeout: float) -> None:
        url = f"http://127.0.0.1:{http_port}/v2/health/ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            container.reload()
            if container.status in ("exited", "dead"):
                logs = container.logs(tail=20).decode(errors="replace")
                raise DeploymentError(f"container {container.name} stopped at start:\n{logs}")
            if self._ready_now(container, url):
                return
            time.sleep(0.3)
        raise DeploymentError(f"container {container.name} was not ready within {timeout:.0f} s")

    # protocol --------------------------------------------------------------------------------------

    def deploy(self, spec: DeploymentSpec, wait: bool = True, timeout: float = 120.0) -> Service:
        """Build the image, run the container, and (optionally) wait until it is ready."""
        spec.validate()
        try:
            self.client.ping()  # no engine: fail before anything is written
        except (DeploymentError, ModuleNotFoundError):  # a device install lacks the SDK: the CLI names the extra
            raise
        except Exception as exc:  # noqa: BLE001 - the SDK raises requests' and its own errors
            raise DeploymentError(f"no Docker engine answers ({exc}); set DOCKER_HOST") from None
        files = self.store.claim(spec.name)
        try:
            return self._deploy(spec, files, wait, timeout)
        except BaseException:
            self._remove_containers(spec.name)
            self.store.remove(spec.name)
            raise

    def _deploy(self, spec: DeploymentSpec, files: ServiceFiles, wait: bool, timeout: float) -> Service:
        from edge_agent.auth import generate_keys

        self.store.write_keys(spec.name, generate_keys())
        build = build_image(self.client, spec.bundle, spec.name, self.base_image)
        http_port = spec.port or free_port()
        grpc_port = spec.grpc_port or free_port()
        auth = bool(spec.auth) if spec.auth is not None else spec.host not in ("127.0.0.1", "localhost", "::1")
        container = self._run_container(spec, build.tag, files.root.resolve(), "1", http_port,
                                        grpc_port, auth)
        record = {
            "name": spec.name, "target": "docker", "image": build.tag, "container": container.name,
            "generation": 1, "http_port": http_port, "grpc_port": grpc_port, "auth": auth,
            "host": spec.host, "bundle_sha256": build.bundle_sha256, "cpu": spec.cpu,
            "memory_mb": spec.memory_mb, "base_image": self.base_image,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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
            except (DeploymentError, http.client.HTTPException):  # a probe failure is a state, not an error
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

        Both containers run with ``--reuse-port``: the new one binds the same ports while the old
        one serves, and once the new one is ready the old one gets SIGTERM, steers new connections
        to it, finishes what it holds and exits (see :mod:`edge_agent.handover`). Clients keep
        their address; a bundle that fails to start leaves the old container serving.
        """
        record = self._record(name)
        files = self.store.files(name)
        spec = DeploymentSpec(name=name, bundle=Path(bundle), cpu=record.get("cpu"),
                              memory_mb=record.get("memory_mb"), host=record.get("host", "127.0.0.1"))
        build = build_image(self.client, spec.bundle, name, record.get("base_image", self.base_image))
        generation = int(record.get("generation", 1)) + 1
        http_port, grpc_port = int(record["http_port"]), int(record["grpc_port"])
        new = self._run_container(spec, build.tag, files.root.resolve(), str(generation),
                                  http_port, grpc_port, bool(record["auth"]))
        try:
            self._wait_container(new, http_port, 120.0)
        except BaseException:
            new.remove(force=True)
            raise
        old = record["container"]
        record.update(image=build.tag, container=new.name, generation=generation,
                      bundle_sha256=build.bundle_sha256, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self._save(name, record)
        self._stop(old)
        return self.status(name)

    def _stop(self, container_name: str) -> None:
        """Stop gracefully (SIGTERM: hand over the ports, finish requests), then remove."""
        import docker

        with contextlib.suppress(docker.errors.NotFound):
            container = self.client.containers.get(container_name)
            container.stop(timeout=_STOP_GRACE_SECONDS)
            container.remove(force=True)

    def _remove_containers(self, name: str) -> None:
        for container in self.client.containers.list(all=True, filters={"label": f"edgedeploy.service={name}"}):
            container.remove(force=True)

    def delete(self, name: str) -> None:
        """Remove every container of the service and its record."""
        self._record(name)
        self._remove_containers(name)
        self.store.remove(name)
        log.info("deleted docker service %s", name)
