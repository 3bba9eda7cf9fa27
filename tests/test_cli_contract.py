"""The CLI shapes of `fleet` and `deploy` that CLI.md promises: options where users write them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.bundle import bundle_sha256
from packager.keys import SigningKey
from packager.packaging import package
from tests.e2e.conftest import free_port


@pytest.mark.parametrize("where", ["before", "after"])
def test_broker_option_in_either_position(where: str) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    args = ["fleet", "--broker", url, "devices"] if where == "before" else ["fleet", "devices", "--broker", url]
    result = subprocess.run([sys.executable, "-m", "packager.cli.main", *args], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"error: cannot reach the MQTT broker at {url} ([Errno 111] Connection refused); " \
                            "is it running?\n"


@pytest.mark.parametrize(
    ("extra", "code", "text"),
    [
        (["--dry-run", "-o", "manifests"], 2, "use it with --target kubernetes"),
        (["--target", "kubernetes", "--dry-run"], 2, "use it with --target kubernetes"),
        (["--target", "kubernetes", "--dry-run", "-o", "manifests"], 2, "bundle not found"),
    ],
)
def test_deploy_dry_run_is_part_of_the_command_line(extra: list[str], code: int, text: str, tmp_path: object) -> None:
    args = ["deploy", "svc", "--bundle", "/no/bundle.edb", *extra]
    result = subprocess.run([sys.executable, "-m", "packager.cli.main", *args], capture_output=True, text=True)
    assert result.returncode == code and text in result.stderr


def test_kubernetes_dry_run_writes_valid_manifests(digits_mlp: Path, signing_key: SigningKey, tmp_path: Path) -> None:
    import kubernetes_validate
    import yaml

    bundle = package(digits_mlp, "cpu-x86_64", tmp_path / "digits.edb", name="digits").bundle_path
    out = tmp_path / "manifests"
    args = ["deploy", "digits", "--bundle", str(bundle), "--target", "kubernetes", "--dry-run", "-o", str(out),
            "--server", "http://bundles.example:8080", "--replicas", "2", "--memory-mb", "512"]
    result = subprocess.run([sys.executable, "-m", "packager.cli.main", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    documents = list(yaml.safe_load_all((out / "all.yaml").read_text()))
    kinds = [d["kind"] for d in documents]
    assert kinds == ["Secret", "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler"]
    kserve = [d["kind"] for d in yaml.safe_load_all((out / "kserve.yaml").read_text())]
    assert kserve == ["Secret", "ConfigMap", "InferenceService"]
    deployment = documents[2]
    assert deployment["spec"]["replicas"] == 2
    init = deployment["spec"]["template"]["spec"]["initContainers"][0]
    assert any(f"/bundles/{bundle_sha256(bundle)}.edb" in part for part in init["command"])
    for document in documents[:5]:
        kubernetes_validate.validate(document, "1.28.0", strict=True)

