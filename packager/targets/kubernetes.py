"""The Kubernetes target: render (and optionally apply) the manifests that serve one bundle.

Rendering is pure: :func:`render_manifests` turns :class:`KubernetesOptions` into plain dicts
(Secret, ConfigMap, Deployment, Service, HorizontalPodAutoscaler and, for KServe users, an
``InferenceService`` with the same container). ``--dry-run -o DIR`` writes them as YAML with
:func:`write_manifests`; with a kubeconfig :mod:`packager.targets.kubernetes_cluster` applies
them. Applying to a live cluster was not exercised on the build machines (no API server can be
installed there); the rendered documents are validated against the Kubernetes OpenAPI schemas,
and the pod's container spec is run in a real Docker engine, in the tests.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edge_agent.atomic import atomic_write_bytes
from edge_agent.errors import UsageError
from packager.targets.store import check_service_name

__all__ = [
    "BUNDLE_DIR",
    "KubernetesOptions",
    "container_spec",
    "render_inference_service",
    "render_keys_secret",
    "render_manifests",
    "serve_command",
    "trusted_public_keys",
    "write_manifests",
]

log = logging.getLogger(__name__)

#: Where the bundle lives inside the pod (an emptyDir filled by the init container, or the image).
BUNDLE_DIR = "/var/lib/edgedeploy/bundle"
_KEYS_DIR = "/var/run/edgedeploy/keys"
_CONFIG_DIR = "/etc/edgedeploy"
_READY_PATH = "/v2/health/ready"
_LIVE_PATH = "/v2/health/live"


@dataclass
class KubernetesOptions:
    """What a Kubernetes deployment of one bundle needs: names, image, sizing and exposure."""

    name: str
    image: str
    bundle_file: str = "model.edb"
    bundle_url: str | None = None
    bundle_sha256: str | None = None
    namespace: str = "default"
    replicas: int = 1
    max_replicas: int | None = None
    cpu: float | None = None
    memory_mb: int | None = None
    http_port: int = 8080
    grpc_port: int = 8081
    auth: bool = True
    target_cpu_percent: int = 70
    init_image: str = "busybox:1.36"
    keys: dict[str, str] = field(default_factory=dict)
    #: public keys the pod trusts (file name -> PEM); the bundle is refused without one that signed it
    trusted_keys: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        """Refuse options no cluster would accept; raises UsageError with what to change."""
        check_service_name(self.name)
        if not self.image:
            raise UsageError("a Kubernetes deployment needs a container image (--image)")
        if self.replicas < 1:
            raise UsageError(f"--replicas must be at least 1, not {self.replicas}")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise UsageError(
                f"max replicas {self.max_replicas} is below --replicas {self.replicas}"
            )
        for label, port in (("http", self.http_port), ("grpc", self.grpc_port)):
            if not 1 <= port <= 65535:
                raise UsageError(f"{label} port {port} must be 1-65535 in a pod")
        if self.http_port == self.grpc_port:
            raise UsageError("http and grpc ports must differ")
        if "/" in self.bundle_file or not self.bundle_file:
            raise UsageError(f"bundle file name {self.bundle_file!r} must be a plain file name")
        if not self.trusted_keys:
            raise UsageError("the pod needs a trusted public key to verify the bundle: run `edgedeploy keys "
                             "trust` (or `keys generate`) first")
        for key_name in self.trusted_keys:
            if not key_name.endswith(".pub") or "/" in key_name or key_name == "serve.json":
                raise UsageError(f"trusted key file name {key_name!r} must be a plain NAME.pub")


def _labels(opts: KubernetesOptions) -> dict[str, str]:
    return _labels_of(opts.name, opts.bundle_sha256)


def _labels_of(name: str, bundle_sha256: str | None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/managed-by": "edgedeploy"}
    if bundle_sha256:
        # Label values are at most 63 characters; the full digest goes in an annotation.
        labels["edgedeploy.io/bundle-sha256"] = bundle_sha256[:63]
    return labels


def _meta(opts: KubernetesOptions, suffix: str = "") -> dict[str, Any]:
    return {"name": opts.name + suffix, "namespace": opts.namespace, "labels": _labels(opts)}


def _resources(opts: KubernetesOptions) -> dict[str, Any]:
    amounts: dict[str, str] = {}
    if opts.cpu is not None:
        amounts["cpu"] = f"{int(round(opts.cpu * 1000))}m"
    if opts.memory_mb is not None:
        amounts["memory"] = f"{int(opts.memory_mb)}Mi"
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def _probe(path: str, opts: KubernetesOptions, initial: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": opts.http_port},
        "initialDelaySeconds": initial,
        "periodSeconds": 5,
        "failureThreshold": 6,
    }


def serve_command(opts: KubernetesOptions, bundle_dir: str = BUNDLE_DIR) -> list[str]:
    """The container command: the same ``edge-agent serve`` a local service runs."""
    command = [
        "edge-agent", "serve",
        "--bundle", f"{bundle_dir}/{opts.bundle_file}",  # served under the bundle's model name
        "--host", "0.0.0.0",
        "--http-port", str(opts.http_port),
        "--grpc-port", str(opts.grpc_port),
    ]
    for key_name in sorted(opts.trusted_keys):
        command += ["--trusted-key", f"{_CONFIG_DIR}/{key_name}"]
    if opts.auth:
        command += ["--keys-file", f"{_KEYS_DIR}/keys.json", "--auth"]
    else:
        command += ["--no-auth"]
    return command


def container_spec(opts: KubernetesOptions) -> dict[str, Any]:
    """The serving container (image, command, env, ports, probes, resources, mounts)."""
    mounts = [{"name": "bundle", "mountPath": BUNDLE_DIR, "readOnly": True},
              {"name": "config", "mountPath": _CONFIG_DIR, "readOnly": True}]
    if opts.auth:
        mounts.append({"name": "keys", "mountPath": _KEYS_DIR, "readOnly": True})
    spec: dict[str, Any] = {
        "name": "edge-agent",
        "image": opts.image,
        "command": serve_command(opts),
        "env": [
            {"name": "EDGEDEPLOY_SERVICE", "value": opts.name},
            {"name": "EDGEDEPLOY_CONFIG", "value": f"{_CONFIG_DIR}/serve.json"},
        ],
        "ports": [
            {"name": "http", "containerPort": opts.http_port, "protocol": "TCP"},
            {"name": "grpc", "containerPort": opts.grpc_port, "protocol": "TCP"},
        ],
        "readinessProbe": _probe(_READY_PATH, opts, 2),
        "livenessProbe": _probe(_LIVE_PATH, opts, 10),
        "volumeMounts": mounts,
    }
    resources = _resources(opts)
    if resources:
        spec["resources"] = resources
    return spec


def _init_container(opts: KubernetesOptions) -> dict[str, Any]:
    """Pulls the bundle from the bundle server into the shared emptyDir, unchanged."""
    assert opts.bundle_url is not None
    target = f"{BUNDLE_DIR}/{opts.bundle_file}"
    return {
        "name": "fetch-bundle",
        "image": opts.init_image,
        "command": ["wget", "-q", "-O", target, opts.bundle_url],
        "volumeMounts": [{"name": "bundle", "mountPath": BUNDLE_DIR}],
    }


def _pod_spec(opts: KubernetesOptions) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": opts.name + "-config"}}]
    if opts.auth:
        volumes.append({"name": "keys", "secret": {"secretName": opts.name + "-keys"}})
    spec: dict[str, Any] = {"containers": [container_spec(opts)]}
    if opts.bundle_url:
        volumes.append({"name": "bundle", "emptyDir": {}})
        spec["initContainers"] = [_init_container(opts)]
    else:
        # Bundle baked into the image at BUNDLE_DIR: mount nothing over it.
        spec["containers"][0]["volumeMounts"] = [
            m for m in spec["containers"][0]["volumeMounts"] if m["name"] != "bundle"
        ]
    spec["volumes"] = volumes
    return spec


def _serve_config(opts: KubernetesOptions) -> dict[str, Any]:
    return {
        "name": opts.name,
        "bundle": f"{BUNDLE_DIR}/{opts.bundle_file}",
        "bundle_sha256": opts.bundle_sha256,
        "http_port": opts.http_port,
        "grpc_port": opts.grpc_port,
        "auth": opts.auth,
    }


def trusted_public_keys(home: Path | None = None) -> dict[str, str]:
    """The public keys this host trusts (``EDGEDEPLOY_HOME/trust/*.pub``), as file name -> PEM."""
    from edge_agent.home import edgedeploy_home

    folder = (home or edgedeploy_home()) / "trust"
    return {path.name: path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.pub"))}


def _keys(opts: KubernetesOptions) -> dict[str, str]:
    if opts.keys:
        return dict(opts.keys)
    return {"primary_key": secrets.token_urlsafe(32), "secondary_key": secrets.token_urlsafe(32)}


def render_inference_service(opts: KubernetesOptions) -> dict[str, Any]:
    """A KServe ``InferenceService`` (serving.kserve.io/v1beta1) running the same container."""
    pod = _pod_spec(opts)
    predictor: dict[str, Any] = {
        "minReplicas": opts.replicas,
        "maxReplicas": opts.max_replicas or opts.replicas,
        "containers": pod["containers"],
        "volumes": pod["volumes"],
    }
    if "initContainers" in pod:
        predictor["initContainers"] = pod["initContainers"]
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": _meta(opts),
        "spec": {"predictor": predictor},
    }


def render_keys_secret(name: str, namespace: str, keys: dict[str, str],
                       bundle_sha256: str | None = None) -> dict[str, Any]:
    """The Secret ``NAME-keys`` the pods mount as ``keys.json`` (applied again by a key rotation).

    The kubelet refreshes a mounted Secret in place (no subPath), and the agent re-reads its keys
    file when it changes, so running pods take a rotated key without a restart.
    """
    check_service_name(name)
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name + "-keys", "namespace": namespace, "labels": _labels_of(name, bundle_sha256)},
            "stringData": {"keys.json": json.dumps(keys)}}


def render_manifests(opts: KubernetesOptions, *, kserve: bool = True) -> list[dict[str, Any]]:
    """All documents for one service, in apply order (Secret and ConfigMap before the pods)."""
    opts.validate()
    docs: list[dict[str, Any]] = []
    if opts.auth:
        docs.append(render_keys_secret(opts.name, opts.namespace, _keys(opts), opts.bundle_sha256))
    docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(opts, "-config"),
                 "data": {"serve.json": json.dumps(_serve_config(opts), sort_keys=True),
                          **dict(sorted(opts.trusted_keys.items()))}})
    selector = {"app.kubernetes.io/name": opts.name}
    annotations = {"edgedeploy.io/bundle-sha256": opts.bundle_sha256 or ""}
    docs.append({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {**_meta(opts), "annotations": annotations},
        "spec": {
            "replicas": opts.replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": _labels(opts), "annotations": annotations},
                         "spec": _pod_spec(opts)},
        },
    })
    docs.append({
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(opts),
        "spec": {"selector": selector, "type": "ClusterIP", "ports": [
            {"name": "http", "port": opts.http_port, "targetPort": "http", "protocol": "TCP"},
            {"name": "grpc", "port": opts.grpc_port, "targetPort": "grpc", "protocol": "TCP"},
        ]},
    })
    docs.append({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(opts),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": opts.name},
            "minReplicas": opts.replicas,
            "maxReplicas": opts.max_replicas or max(opts.replicas, opts.replicas * 4),
            "metrics": [{"type": "Resource", "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": opts.target_cpu_percent},
            }}],
        },
    })
    if kserve:
        docs.append(render_inference_service(opts))
    return docs


def write_manifests(docs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write one YAML file per document (``NN-kind-name.yaml``) and two ready-to-apply sets.

    ``all.yaml`` is the plain set (Deployment, Service, HPA with their Secret and ConfigMap);
    ``kserve.yaml`` is the KServe set (InferenceService with the same Secret and ConfigMap). Apply
    one of them, not both: each starts its own pods. A file that holds a Secret (the service's
    keys) is mode 0600.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for index, doc in enumerate(docs):
        name = f"{index:02d}-{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"
        _write_documents(out_dir / name, [doc])
        paths.append(out_dir / name)
    plain = [doc for doc in docs if doc["kind"] != "InferenceService"]
    _write_documents(out_dir / "all.yaml", plain)
    if len(plain) < len(docs):
        shared = [doc for doc in docs if doc["kind"] in ("Secret", "ConfigMap", "InferenceService")]
        _write_documents(out_dir / "kserve.yaml", shared)
    return paths


def _write_documents(path: Path, docs: list[dict[str, Any]]) -> None:
    secret = any(doc["kind"] == "Secret" for doc in docs)
    atomic_write_bytes(path, yaml.safe_dump_all(docs, sort_keys=False).encode("utf-8"), mode=0o600 if secret else 0o644)
