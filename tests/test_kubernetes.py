"""Kubernetes target: rendered manifests validate against real Kubernetes schemas and carry the options."""

from __future__ import annotations

import json

import pytest
import yaml

from edge_agent.errors import UsageError
from packager.targets.kubernetes import KubernetesOptions, render_manifests, write_manifests

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
