"""Kubernetes target: rendered manifests validate against real Kubernetes schemas and carry the options;
key rotation goes to the cluster's Secret (as far as a machine without an API server allows)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge_agent.errors import DeploymentError, UsageError
from packager import services
from packager.targets.base import free_port
from packager.targets.kubernetes import KubernetesOptions, render_keys_secret, render_manifests, write_manifests
from packager.targets.store import ServiceStore
from tests.servers import unreachable_kubeconfig

kubernetes_validate = pytest.importorskip("kubernetes_validate")

VERSIONS = ["1.28.0", "1.33.0"]


def _opts(**overrides: object) -> KubernetesOptions:
    values: dict[str, object] = {
        "name": "fraud",
        "image": "edgedeploy/fraud:1",
        "bundle_url": "http://bundles.example:8700/bundles/fraud.edb",
        "bundle_sha256": "ab" * 32,
        "replicas": 2,
        "max_replicas": 5,
        "cpu": 1.5,
        "memory_mb": 768,
        "http_port": 9000,
        "grpc_port": 9001,
        "trusted_keys": {"release.pub": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"},
    }
    values.update(overrides)
    return KubernetesOptions(**values)  # type: ignore[arg-type]


def _by_kind(docs: list[dict]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in docs}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("bundle_url", ["http://bundles.example:8700/b/fraud.edb", None])
def test_every_manifest_validates(version: str, bundle_url: str | None) -> None:
    for doc in render_manifests(_opts(bundle_url=bundle_url)):
        if doc["kind"] == "InferenceService":
            continue  # a CRD: checked structurally below
        kubernetes_validate.validate(doc, version, strict=True)


def test_invalid_manifest_is_caught_by_the_validator() -> None:
    """The validator really checks: a mangled Deployment fails."""
    doc = _by_kind(render_manifests(_opts()))["Deployment"]
    doc["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, VERSIONS[0], strict=True)


def test_values_flow_from_options() -> None:
    docs = _by_kind(render_manifests(_opts()))
    deployment = docs["Deployment"]
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "edgedeploy/fraud:1"
    assert container["resources"]["limits"] == {"cpu": "1500m", "memory": "768Mi"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 9000}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 9000}
    assert "--http-port" in container["command"] and "9000" in container["command"]
    assert pod["initContainers"][0]["command"][-1] == "http://bundles.example:8700/bundles/fraud.edb"
    assert docs["HorizontalPodAutoscaler"]["spec"]["minReplicas"] == 2
    assert docs["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] == 5
    assert [p["port"] for p in docs["Service"]["spec"]["ports"]] == [9000, 9001]
    keys = json.loads(docs["Secret"]["stringData"]["keys.json"])
    assert set(keys) == {"primary_key", "secondary_key"}
    config = json.loads(docs["ConfigMap"]["data"]["serve.json"])
    assert config["bundle_sha256"] == "ab" * 32


def test_baked_bundle_has_no_init_container() -> None:
    pod = _by_kind(render_manifests(_opts(bundle_url=None)))["Deployment"]["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert all(v["name"] != "bundle" for v in pod["volumes"])


def test_no_auth_renders_no_secret() -> None:
    docs = _by_kind(render_manifests(_opts(auth=False)))
    assert "Secret" not in docs
    assert "--no-auth" in docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["command"]


def test_inference_service_structure() -> None:
    docs = _by_kind(render_manifests(_opts()))
    isvc = docs["InferenceService"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = isvc["spec"]["predictor"]
    assert predictor["minReplicas"] == 2 and predictor["maxReplicas"] == 5
    deploy_container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert predictor["containers"] == [deploy_container]
    # Its pod fields are plain core/v1 PodSpec fields: validate them as a Pod.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": {k: v for k, v in predictor.items() if k not in ("minReplicas", "maxReplicas")}}
    kubernetes_validate.validate(pod, VERSIONS[-1], strict=True)


def test_dry_run_writes_yaml(tmp_path) -> None:
    docs = render_manifests(_opts())
    paths = write_manifests(docs, tmp_path / "out")
    assert len(paths) == len(docs)
    plain = list(yaml.safe_load_all((tmp_path / "out" / "all.yaml").read_text()))
    assert plain == [doc for doc in docs if doc["kind"] != "InferenceService"]
    kserve = list(yaml.safe_load_all((tmp_path / "out" / "kserve.yaml").read_text()))
    assert [doc["kind"] for doc in kserve] == ["Secret", "ConfigMap", "InferenceService"]


def test_pod_trusts_the_configured_keys() -> None:
    docs = _by_kind(render_manifests(_opts()))
    command = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--trusted-key") + 1] == "/etc/edgedeploy/release.pub"
    assert docs["ConfigMap"]["data"]["release.pub"].startswith("-----BEGIN PUBLIC KEY-----")


@pytest.mark.parametrize("bad", [{"replicas": 0}, {"max_replicas": 1}, {"name": "Bad_Name"},
                                 {"grpc_port": 9000}, {"image": ""}, {"trusted_keys": {}},
                                 {"trusted_keys": {"../x.pub": "k"}}])
def test_bad_options_refused(bad: dict) -> None:
    with pytest.raises(UsageError):
        render_manifests(_opts(**bad))


@pytest.mark.parametrize("version", VERSIONS)
def test_the_rotated_keys_secret_is_the_one_the_pods_mount(version: str) -> None:
    keys = {"primary_key": "p" * 43, "secondary_key": "s" * 43}
    opts = _opts(keys=keys)
    docs = _by_kind(render_manifests(opts, kserve=False))
    secret = render_keys_secret(opts.name, opts.namespace, keys, opts.bundle_sha256)
    kubernetes_validate.validate(secret, version, strict=True)
    assert secret == docs["Secret"]  # a rotation applies the same object (same labels) with new data
    assert json.loads(secret["stringData"]["keys.json"]) == keys
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert {"name": "keys", "secret": {"secretName": secret["metadata"]["name"]}} in pod["volumes"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "keys")
    assert "subPath" not in mount  # a subPath mount would never see the kubelet refresh the Secret


def _cluster_service(name: str, tmp_path: Path, auth: bool) -> tuple[dict[str, str], int]:
    """A kubernetes service's record and keys as ``deploy`` leaves them, its API server not answering."""
    closed = free_port()
    kubeconfig = unreachable_kubeconfig(tmp_path / "kubeconfig", closed)
    store = ServiceStore()
    store.claim(name)
    keys = {"primary_key": "old-primary", "secondary_key": "old-secondary"}
    store.write_keys(name, keys)
    store.save(name, {"name": name, "target": "kubernetes", "namespace": "ml", "image": "registry.example/e:1",
                      "http_port": 8080, "grpc_port": 8081, "auth": auth, "bundle_sha256": "ab" * 32,
                      "replicas": 1, "kubeconfig": str(kubeconfig)})
    return keys, closed


def test_regenerating_a_kubernetes_key_updates_the_cluster_secret_first(tmp_path: Path) -> None:
    """The rotation reaches for the cluster (it used to change only the local file); unreachable, nothing changes."""
    keys, closed = _cluster_service("fraud", tmp_path, auth=True)
    with pytest.raises(DeploymentError, match=f"cannot reach the Kubernetes API at http://127.0.0.1:{closed}"):
        services.regenerate_key("fraud", "primary")
    assert services.get_keys("fraud") == keys
    result = subprocess.run([sys.executable, "-m", "packager.cli.main", "service", "keys", "fraud", "--regenerate",
                             "secondary"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "cannot reach the Kubernetes API" in result.stderr
    assert services.get_keys("fraud") == keys


def test_a_kubernetes_service_without_auth_rotates_locally(tmp_path: Path) -> None:
    """No Secret was rendered for a --no-auth service, so the cluster is not asked."""
    keys, _ = _cluster_service("open", tmp_path, auth=False)
    rotated = services.regenerate_key("open", "primary")
    assert rotated["secondary_key"] == keys["secondary_key"] and rotated["primary_key"] != keys["primary_key"]
    assert services.get_keys("open") == rotated
