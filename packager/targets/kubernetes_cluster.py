"""``--target kubernetes`` against a live cluster: apply the rendered manifests, wait, operate.

The documents come from :mod:`packager.targets.kubernetes` (the same ones ``--dry-run`` writes and the
tests validate). They go to the cluster by server-side apply through the ``kubernetes`` client, so a
re-apply updates in place; an update patches the Deployment's pod template with the new bundle and
the rolling update (``maxUnavailable: 0``, readiness on the v2 health path) drops no requests. A
key rotation applies the service's Secret again (the cluster first, then the local copy), and the
pods take it without a restart. A service is reached later through the kubeconfig it was deployed
with (kept in its record).
Nothing past reading the kubeconfig and reaching the API server was run on the build machines:
no API server can be installed there (see the README).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from edge_agent.errors import DeploymentError, NotFoundError, UsageError
from packager.targets.base import DeploymentSpec, Service, ServiceState
from packager.targets.kubernetes import (
    KubernetesOptions,
    render_keys_secret,
    render_manifests,
    trusted_public_keys,
)
from packager.targets.store import ServiceStore

__all__ = ["KubernetesTarget", "find_kubeconfig"]

log = logging.getLogger(__name__)

_FIELD_MANAGER = "edgedeploy"


def find_kubeconfig(given: Path | None = None) -> Path:
    """The kubeconfig to use: ``given``, ``$KUBECONFIG`` or ``~/.kube/config``; UsageError if none exists."""
    candidates = [given] if given else [Path(p) for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    candidates = candidates or [Path.home() / ".kube" / "config"]
    for path in candidates:
        if path.is_file():
            return path
    raise UsageError(
        f"no kubeconfig found ({', '.join(str(p) for p in candidates)}): set KUBECONFIG or pass --kubeconfig, "
        "or write the manifests with --dry-run -o DIR"
    )


class KubernetesTarget:
    """Services as a Deployment + Service + HPA in a cluster; the record stays under EDGEDEPLOY_HOME."""

    name = "kubernetes"

    def __init__(self, kubeconfig: Path | None = None, image: str | None = None, bundle_server: str | None = None,
                 namespace: str = "default", store: ServiceStore | None = None) -> None:
        self._kubeconfig = Path(kubeconfig) if kubeconfig else None
        self.image = image
        self.bundle_server = bundle_server
        self.namespace = namespace
        self.store = store or ServiceStore()
        self._api: Any = None

    def close(self) -> None:
        """Close the API client's connection pool."""
        if self._api is not None:
            self._api[1].close()
            self._api = None

    # cluster access -----------------------------------------------------------------------------------

    def _client(self) -> Any:
        if self._api is None:
            try:
                from kubernetes import client, config
            except ImportError as exc:
                raise DeploymentError("--target kubernetes needs the 'kubernetes' package: "
                                      "pip install 'edgedeploy[cloud]'") from exc
            path = find_kubeconfig(self._kubeconfig)
            try:
                api = config.new_client_from_config(config_file=str(path))
            except Exception as exc:  # noqa: BLE001 - the client raises many types for a bad file
                raise UsageError(f"cannot use kubeconfig {path}: {exc}") from None
            self._api = client, api
        return self._api

    def _call(self, what: str, action: Any) -> Any:
        """Run one API call; connection failures and API errors become DeploymentError."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return action()
        except ApiException as exc:
            if exc.status == 404:
                raise NotFoundError(f"{what}: not found in the cluster") from None
            raise DeploymentError(f"{what}: the API server answered {exc.status} {exc.reason}") from None
        except (HTTPError, OSError) as exc:
            host = self._client()[1].configuration.host
            raise DeploymentError(f"{what}: cannot reach the Kubernetes API at {host} ({exc})") from None

    def _apply(self, docs: list[dict[str, Any]]) -> None:
        from kubernetes.dynamic import DynamicClient

        _, api = self._client()
        dynamic = self._call("discovering the cluster's APIs", lambda: DynamicClient(api))
        for doc in docs:
            kind, meta = doc["kind"], doc["metadata"]
            resource = self._call(f"{kind} API", lambda d=doc: dynamic.resources.get(
                api_version=d["apiVersion"], kind=d["kind"]))
            self._call(f"applying {kind} {meta['name']}", lambda r=resource, d=doc, m=meta: r.server_side_apply(
                body=d, name=m["name"], namespace=m["namespace"], field_manager=_FIELD_MANAGER,
                force_conflicts=True))
            log.info("applied %s %s/%s", kind, meta["namespace"], meta["name"])

    # records -----------------------------------------------------------------------------------------

    def _record(self, name: str) -> dict[str, Any]:
        """The record of ``name``; its cluster is the one it was deployed to, unless a kubeconfig was given."""
        record = self.store.record(name, self.name)
        if self._kubeconfig is None and record.get("kubeconfig"):
            self._kubeconfig = Path(record["kubeconfig"])
        return record

    def _options(self, spec: DeploymentSpec, keys: dict[str, str], namespace: str) -> KubernetesOptions:
        from edge_agent.bundle import bundle_sha256, verify_bundle
        from packager.images import image_tag

        verify_bundle(spec.bundle)
        digest = bundle_sha256(spec.bundle)
        url = None
        if self.bundle_server:
            from packager.bundle_server import publish_bundle

            url = self.bundle_server.rstrip("/") + publish_bundle(spec.bundle)[1]
        return KubernetesOptions(
            name=spec.name, image=self.image or image_tag(spec.name, digest), bundle_url=url, bundle_sha256=digest,
            namespace=namespace, replicas=spec.replicas or 1, cpu=spec.cpu, memory_mb=spec.memory_mb,
            http_port=spec.port or 8080, grpc_port=spec.grpc_port or 8081,
            auth=True if spec.auth is None else spec.auth, keys=keys, trusted_keys=trusted_public_keys(),
        )

    # protocol ----------------------------------------------------------------------------------------

    def deploy(self, spec: DeploymentSpec, wait: bool = True, timeout: float = 300.0) -> Service:
        """Apply the manifests (Secret, ConfigMap, Deployment, Service, HPA) and wait for the rollout."""
        from edge_agent.auth import generate_keys

        spec.validate()
        keys = generate_keys()
        options = self._options(spec, keys, self.namespace)
        docs = render_manifests(options, kserve=False)
        self._client()  # fail on a missing kubeconfig before anything is written
        self.store.claim(spec.name)
        try:
            self._apply(docs)
        except BaseException:
            self.store.remove(spec.name)
            raise
        self.store.write_keys(spec.name, keys)
        self.store.save(spec.name, {
            "name": spec.name, "target": "kubernetes", "namespace": self.namespace, "image": options.image,
            "http_port": options.http_port, "grpc_port": options.grpc_port, "auth": options.auth,
            "bundle_sha256": options.bundle_sha256, "replicas": options.replicas, "cpu": spec.cpu,
            "memory_mb": spec.memory_mb, "bundle_server": self.bundle_server,
            "kubeconfig": str(find_kubeconfig(self._kubeconfig)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        return self.wait_ready(spec.name, timeout) if wait else self.status(spec.name)

    def _deployment(self, record: dict[str, Any]) -> Any:
        client, api = self._client()
        apps = client.AppsV1Api(api)
        return self._call(f"reading Deployment {record['name']}",
                          lambda: apps.read_namespaced_deployment(record["name"], record["namespace"]))

    def status(self, name: str) -> Service:
        """The service with a state from the Deployment's available replicas."""
        record = self._record(name)
        try:
            deployment = self._deployment(record)
            wanted = deployment.spec.replicas or 0
            ready = deployment.status.available_replicas or 0
            updated = deployment.status.updated_replicas or 0
            state = ServiceState.HEALTHY if ready >= wanted and updated >= wanted else ServiceState.STARTING
        except NotFoundError:
            state = ServiceState.STOPPED
        base = f"http://{name}.{record['namespace']}.svc.cluster.local:{record['http_port']}"
        return Service(
            name=name, state=state, target="kubernetes", scoring_uri=base + "/score",
            swagger_uri=base + "/swagger.json",
            grpc_target=f"{name}.{record['namespace']}.svc.cluster.local:{record['grpc_port']}",
            auth_enabled=bool(record["auth"]), bundle_sha256=record["bundle_sha256"],
            http_port=int(record["http_port"]), grpc_port=int(record["grpc_port"]),
            created=record.get("created"), updated=record.get("updated"),
            resources={"cpu": record.get("cpu"), "memory_mb": record.get("memory_mb"), "image": record["image"],
                       "replicas": record.get("replicas"), "namespace": record["namespace"]},
        )

    def wait_ready(self, name: str, timeout: float = 300.0) -> Service:
        """Block until every replica runs the current pod template and is ready."""
        deadline = time.monotonic() + timeout
        while True:
            service = self.status(name)
            if service.state == ServiceState.HEALTHY:
                return service
            if time.monotonic() > deadline:
                raise DeploymentError(f"the rollout of {name} did not finish within {timeout:.0f} s "
                                      f"(see edgedeploy service logs {name})")
            time.sleep(2.0)

    def logs(self, name: str, tail: int | None = None) -> str:
        """The logs of the service's pods, each headed by the pod name."""
        record = self._record(name)
        client, api = self._client()
        core = client.CoreV1Api(api)
        selector = f"app.kubernetes.io/name={name}"
        pods = self._call("listing pods", lambda: core.list_namespaced_pod(record["namespace"],
                                                                           label_selector=selector))
        parts = []
        for pod in pods.items:
            text = self._call(f"reading the log of {pod.metadata.name}", lambda p=pod: core.read_namespaced_pod_log(
                p.metadata.name, record["namespace"], container="edge-agent", tail_lines=tail))
            parts.append(f"==> {pod.metadata.name} <==\n{text}")
        return "\n".join(parts)

    def update(self, name: str, bundle: Path) -> Service:
        """Re-apply with the new bundle: a rolling update, old pods serve until new ones are ready."""
        record = self._record(name)
        keys = self.store.keys(name)
        spec = DeploymentSpec(name=name, bundle=Path(bundle), port=record["http_port"],
                              grpc_port=record["grpc_port"], auth=record["auth"], cpu=record.get("cpu"),
                              memory_mb=record.get("memory_mb"), replicas=record.get("replicas"))
        self.bundle_server = self.bundle_server or record.get("bundle_server")
        options = self._options(spec, keys, record["namespace"])
        if not self.image and record.get("bundle_server"):
            options.image = record["image"]  # the runtime image pulls the bundle: keep it
        self._apply(render_manifests(options, kserve=False))
        record.update(bundle_sha256=options.bundle_sha256, image=options.image,
                      updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.store.save(name, record)
        return self.wait_ready(name)

    def keys(self, name: str) -> dict[str, str]:
        """The service's keys (the local copy of its Secret)."""
        self._record(name)
        return self.store.keys(name)

    def regenerate_key(self, name: str, which: str) -> dict[str, str]:
        """Replace one key in the service's Secret, then in the local copy; the pods take it without a restart.

        The cluster is updated first: if it cannot be reached, nothing changes and the old keys keep
        working. A service deployed with ``--no-auth`` has no Secret; only its local copy changes.
        """
        record = self._record(name)
        keys = self.store.rotated_keys(name, which)
        if record.get("auth"):
            self._apply([render_keys_secret(name, record["namespace"], keys, record.get("bundle_sha256"))])
        self.store.write_keys(name, keys)
        return keys

    def delete(self, name: str) -> None:
        """Delete the service's objects from the cluster, then its record."""
        record = self._record(name)
        client, api = self._client()
        namespace = record["namespace"]
        autoscaling = client.AutoscalingV2Api(api)
        calls = [
            ("HorizontalPodAutoscaler",
             lambda: autoscaling.delete_namespaced_horizontal_pod_autoscaler(name, namespace)),
            ("Service", lambda: client.CoreV1Api(api).delete_namespaced_service(name, namespace)),
            ("Deployment", lambda: client.AppsV1Api(api).delete_namespaced_deployment(name, namespace)),
            ("ConfigMap", lambda: client.CoreV1Api(api).delete_namespaced_config_map(name + "-config", namespace)),
            ("Secret", lambda: client.CoreV1Api(api).delete_namespaced_secret(name + "-keys", namespace)),
        ]
        for kind, call in calls:
            try:
                self._call(f"deleting {kind} {name}", call)
            except NotFoundError:
                log.info("%s %s was already gone", kind, name)
        self.store.remove(name)
