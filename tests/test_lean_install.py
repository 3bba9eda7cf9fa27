"""The device install: the wheel with the agent's dependencies only (``pip install edgedeploy``) runs a
signed bundle, carries the device profiles, and imports nothing of the cloud side; the cloud-side
CLI on it names the extra to install instead of failing with a traceback.

The wheel tests build the wheel and install it into a fresh venv from pip's index (once per module:
about 30 s when the machine is quiet, pip's cache reused), hence ``slow``; they run in ``make test``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from bench.lean import (
    CLOUD_SIDE_PACKAGES,
    PROJECT,
    DeviceInstall,
    clean_env,
    install_device,
    installed_packages,
    rest_infer,
    serving_agent,
)
from edge_agent.bundle import verify_bundle
from packager.control.migrations import migrations
from packager.examples import DigitsData
from packager.keys import SigningKey, export_public_key, generate_key
from packager.packaging import package

# Top-level modules the agent must never load: the cloud side and the libraries only it needs.
CLOUD_SIDE_MODULES = ("packager", "docker", "onnx", "onnxconverter_common", "kubernetes", "hls4ml", "qonnx")

# Run in a fresh interpreter: every agent module, then what got loaded (and from where).
_IMPORT_GUARD = """
import importlib, json, pkgutil, sys
import edge_agent, edge_agent.cli, edge_agent.daemon, edge_agent.server
import edge_agent.runtime
for info in pkgutil.walk_packages(edge_agent.__path__, "edge_agent."):
    importlib.import_module(info.name)
loaded = sorted({name.partition(".")[0] for name in sys.modules} & set(sys.argv[1:]))
print(json.dumps({"loaded": loaded, "edge_agent": edge_agent.__file__,
                  "runtime": sorted(n for n in sys.modules if n.startswith("edge_agent.runtime."))}))
"""


# Run in the device install: a SQLite controller store, migrated by the wheel's own migrations.
_OPEN_STORE = """
import json, sys
import packager.control.migrations as migrations
from packager.control.store import Store
with Store.open(sys.argv[1]) as store:
    print(json.dumps({"version": store.schema_version(), "migrations": migrations.__file__}))
"""


def _import_guard(python: Path | str, cwd: Path) -> dict[str, Any]:
    done = subprocess.run([str(python), "-c", _IMPORT_GUARD, *CLOUD_SIDE_MODULES], capture_output=True, text=True,
                          cwd=cwd, env=clean_env())
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_the_agent_imports_nothing_of_the_cloud_side(tmp_path: Path) -> None:
    found = _import_guard(sys.executable, tmp_path)
    assert found["loaded"] == []
    assert {"edge_agent.runtime.onnx", "edge_agent.runtime.entry_script"} <= set(found["runtime"])


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> DeviceInstall:
    return install_device(tmp_path_factory.mktemp("device"), compile_bytecode=False)


@pytest.fixture
def signed(digits_mlp: Path, digits: DigitsData, signing_key: SigningKey, tmp_path: Path) -> tuple[Path, Path]:
    """A signed fp32 digits bundle with an input sample, and the signer's public key file."""
    sample = tmp_path / "sample.json"
    sample.write_text(json.dumps({"data": digits.x_test[:2].tolist()}))
    bundle = package(digits_mlp, "cpu-x86_64", tmp_path / "digits.edb", quantize="none", name="digits",
                     input_sample=sample).bundle_path
    export_public_key(tmp_path / "publisher.pub")
    return bundle, tmp_path / "publisher.pub"


def _cli(device: DeviceInstall, command: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(device.bin(command)), *args], capture_output=True, text=True, cwd=cwd,
                          env=clean_env(), timeout=120)


@pytest.mark.slow
def test_the_device_install_carries_no_cloud_side_package(device: DeviceInstall) -> None:
    packages = installed_packages(device.bin("python"))
    assert "edgedeploy" in packages and "onnxruntime" in packages
    assert packages & CLOUD_SIDE_PACKAGES == set()


@pytest.mark.slow
def test_the_installed_agent_imports_nothing_of_the_cloud_side(device: DeviceInstall, tmp_path: Path) -> None:
    found = _import_guard(device.bin("python"), tmp_path)
    assert Path(found["edge_agent"]).is_relative_to(device.venv)  # the wheel's copy, not the checkout
    assert found["loaded"] == []


@pytest.mark.slow
def test_the_installed_wheel_carries_the_device_profiles(device: DeviceInstall, tmp_path: Path) -> None:
    listed = _cli(device, "edgedeploy", "profile", "list", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    names = sorted(p["name"] for p in json.loads(listed.stdout))
    assert names == sorted(p.stem for p in (PROJECT / "device-profiles").glob("*.yaml"))
    with zipfile.ZipFile(device.wheel) as wheel:
        assert "edge_agent/systemd/edge-agent.service" in wheel.namelist()  # the device's unit file too


@pytest.mark.slow
def test_the_installed_wheel_carries_the_store_migrations(device: DeviceInstall, tmp_path: Path) -> None:
    with zipfile.ZipFile(device.wheel) as wheel:
        shipped = sorted(n for n in wheel.namelist() if n.startswith("packager/control/migrations/0"))
    assert shipped == [f"packager/control/migrations/{m.version:04d}_{m.name}.py" for m in migrations()]
    opened = subprocess.run([str(device.bin("python")), "-c", _OPEN_STORE, str(tmp_path / "controller.db")],
                            capture_output=True, text=True, cwd=tmp_path, env=clean_env(), timeout=120)
    assert opened.returncode == 0, opened.stderr
    found = json.loads(opened.stdout)
    assert found["version"] == migrations()[-1].version
    assert Path(found["migrations"]).is_relative_to(device.venv)  # the wheel's copy ran, not the checkout's


@pytest.mark.slow
def test_the_device_install_verifies_and_serves_a_signed_bundle(
    device: DeviceInstall, signed: tuple[Path, Path], digits: DigitsData, digits_mlp: Path, tmp_path: Path
) -> None:
    import tritonclient.grpc as grpcclient

    bundle, key = signed
    x = digits.x_test[:2]
    expected = ort.InferenceSession(str(digits_mlp), providers=["CPUExecutionProvider"]).run(["label"], {"input": x})[0]
    with serving_agent(device.bin("edge-agent"), bundle, key, tmp_path / "serve") as agent:
        answer = rest_infer(agent.http, "digits", x.tolist())
        labels = next(o for o in answer["outputs"] if o["name"] == "label")["data"]
        assert labels == expected.tolist()
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{agent.grpc_port}")
        try:
            tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x.astype(np.float32))
            result = client.infer("digits", [tensor])
        finally:
            client.close()
        assert result.as_numpy("label").tolist() == expected.tolist()


@pytest.mark.slow
def test_the_device_install_refuses_a_bundle_from_an_untrusted_signer(
    device: DeviceInstall, signed: tuple[Path, Path], tmp_path: Path
) -> None:
    bundle, _ = signed
    generate_key("stranger")
    export_public_key(tmp_path / "stranger.pub", "stranger")
    refused = _cli(device, "edge-agent", "serve", "--bundle", str(bundle), "--trusted-key",
                   str(tmp_path / "stranger.pub"), "--no-auth", "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "trust" in lines[0], refused.stderr
    verify_bundle(bundle)  # the bundle itself is fine: the device refused the signer


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (["package", "{model}", "--profile", "cpu-x86_64", "-o", "{tmp}/x.edb"], "packager"),
        (["package", "--help"], "packager"),
        (["deploy", "svc", "--bundle", "{bundle}", "--target", "docker"], "cloud"),
    ],
)
def test_a_cloud_side_command_on_the_device_install_names_the_extra(
    device: DeviceInstall, signed: tuple[Path, Path], digits_mlp: Path, tmp_path: Path, args: list[str], extra: str
) -> None:
    words = [a.format(model=digits_mlp, tmp=tmp_path, bundle=signed[0]) for a in args]
    done = _cli(device, "edgedeploy", *words, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert f"pip install 'edgedeploy[{extra}]'" in lines[0]
    assert "Traceback" not in done.stderr and not (tmp_path / "x.edb").exists()
