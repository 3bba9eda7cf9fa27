"""Plug-ins by entry points: third-party runtime backends and deploy targets, installed for real.

Each third-party package is laid out the way pip installs one (its module beside a
``NAME-1.0.dist-info`` folder with ``METADATA`` and ``entry_points.txt``) in a folder put on
``sys.path`` (and on ``PYTHONPATH`` for the processes the CLI starts). The example plug-ins are
the modules in ``tests/plugins/`` that the README shows.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from edge_agent.bundle import BundleManifest
from edge_agent.dataplane import DataPlane
from edge_agent.errors import BundleError, UsageError
from edge_agent.inference import InferRequest
from edge_agent.metrics import MetricsRegistry
from edge_agent.plugins import RUNTIMES_GROUP, TARGETS_GROUP
from edge_agent.repository import ModelRepository
from edge_agent.runtime import installed_backends, load_model
from edge_agent.tensors import TensorSpec
from edge_agent.trust import TrustStore
from packager import services
from packager.bundle import write_bundle
from packager.keys import SigningKey
from packager.targets import ServiceStore, get_target, target_names

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = Path(__file__).parent / "plugins"
WEIGHTS = np.arange(6, dtype=np.float32).reshape(3, 2) / 4
BIAS = np.array([0.5, -1.0], dtype=np.float32)


def install_plugin(site: Path, dist: str, entry_points: dict[str, dict[str, str]],
                   modules: dict[str, str | Path]) -> Path:
    """``site`` holding ``modules`` (name -> source or file) and ``dist``'s metadata, as pip leaves them."""
    site.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        text = source.read_text() if isinstance(source, Path) else source
        (site / f"{name}.py").write_text(text)
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"  # as pip names it: the stem up to '-' is the name
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    groups = [f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in entries.items())
              for group, entries in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(groups))
    return site


@pytest.fixture
def affine_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example backend ``affine`` and the example target ``niced``, installed and importable."""
    site = install_plugin(tmp_path / "site", "edgedeploy-examples",
                          {RUNTIMES_GROUP: {"affine": "edgedeploy_affine:load"},
                           TARGETS_GROUP: {"niced": "niced_target:NicedTarget"}},
                          {"edgedeploy_affine": EXAMPLES / "edgedeploy_affine.py",
                           "niced_target": EXAMPLES / "niced_target.py"})
    monkeypatch.syspath_prepend(str(site))
    return site


def affine_bundle(out: Path, key: SigningKey, name: str = "affine") -> Path:
    """A signed bundle for the ``affine`` backend: x [N, 3] -> y [N, 2]."""
    weights = out.with_suffix(".npz")
    np.savez(weights, weights=WEIGHTS, bias=BIAS)
    manifest = BundleManifest(model={"name": name, "version": 1}, profile={"name": "cpu-x86_64"},
                              runtime={"backend": "affine", "model_path": "model/affine.npz"},
                              inputs=[TensorSpec("x", "FP32", (-1, 3))], outputs=[TensorSpec("y", "FP32", (-1, 2))])
    write_bundle(out, manifest, {"model/affine.npz": weights}, key)
    return out


def test_a_third_party_backend_serves_infer_and_score(affine_site: Path, tmp_path: Path,
                                                     signing_key: SigningKey) -> None:
    assert "affine" in installed_backends()
    bundle = affine_bundle(tmp_path / "affine.edb", signing_key)
    x = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]], dtype=np.float32)

    async def main() -> None:
        repository = ModelRepository(tmp_path / "work", TrustStore([signing_key.public_key]))
        plane = DataPlane(repository, MetricsRegistry())
        try:
            await repository.load_bundle(bundle)
            meta = plane.model_metadata("affine")
            assert meta["platform"] == "affine" and meta["state"] == "READY"
            response = await plane.infer(InferRequest("affine", {"x": x}))
            np.testing.assert_allclose(response.outputs["y"], x @ WEIGHTS + BIAS, rtol=1e-6)
            scored = await plane.score("affine", json.dumps({"data": x.tolist()}).encode())
            np.testing.assert_allclose(scored["y"], x @ WEIGHTS + BIAS, rtol=1e-6)
        finally:
            await repository.close()

    asyncio.run(main())


INCOMPLETE = '''
class Bare:
    def __init__(self, info):
        self.info = info
    def infer(self, inputs):
        return inputs
    def unload(self):
        pass

def load(bundle_dir, manifest, info):
    return Bare(info)
'''


def test_a_backend_missing_protocol_members_is_refused_at_load(tmp_path: Path, signing_key: SigningKey,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused when loaded, naming what is missing, instead of failing on its first request."""
    site = install_plugin(tmp_path / "site", "bare-backend", {RUNTIMES_GROUP: {"affine": "bare_backend:load"}},
                          {"bare_backend": INCOMPLETE})
    monkeypatch.syspath_prepend(str(site))
    bundle = affine_bundle(tmp_path / "affine.edb", signing_key)

    async def main() -> None:
        repository = ModelRepository(tmp_path / "work", TrustStore([signing_key.public_key]))
        try:
            with pytest.raises(BundleError, match="without inline, failure, inputs, outputs, score, schema"):
                await repository.load_bundle(bundle)
            assert repository.index() == []
        finally:
            await repository.close()

    asyncio.run(main())


def test_unknown_broken_and_ambiguous_plug_ins_are_clear_errors(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match=r"no deploy target named 'nomad' is installed \(installed: docker, "
                                         r"kubernetes, local\)"):
        get_target("nomad")
    broken = install_plugin(tmp_path / "broken", "broken-target", {TARGETS_GROUP: {"nomad": "broken_target:Nomad"}},
                            {"broken_target": "import no_such_module_anywhere\n"})
    monkeypatch.syspath_prepend(str(broken))
    with pytest.raises(UsageError, match="'nomad' .*cannot be loaded: ModuleNotFoundError"):
        get_target("nomad")
    other = install_plugin(tmp_path / "other", "other-backend", {RUNTIMES_GROUP: {"onnxruntime": "other:load"}},
                           {"other": "def load(bundle_dir, manifest, info):\n    raise AssertionError\n"})
    monkeypatch.syspath_prepend(str(other))
    manifest = BundleManifest(model={"name": "m", "version": 1}, profile={"name": "cpu-x86_64"},
                              runtime={"backend": "onnxruntime"})
    with pytest.raises(BundleError, match="'onnxruntime' is provided by several packages.*other-backend"):
        load_model(tmp_path, manifest)


def test_a_target_without_the_protocol_or_under_another_name_is_refused(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    source = "class Half:\n    name = 'half'\n    def __init__(self, store):\n        pass\n" \
             "    def deploy(self, spec, wait=True, timeout=60.0):\n        pass\n"
    site = install_plugin(tmp_path / "site", "half-target", {TARGETS_GROUP: {"half": "half_target:Half"}},
                          {"half_target": source})
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(UsageError, match="does not implement .*missing wait_ready, status, logs, update, delete, "
                                         "keys, regenerate_key, close"):
        get_target("half")
    alias = install_plugin(tmp_path / "alias", "alias-target",
                           {TARGETS_GROUP: {"here": "packager.targets.local:LocalTarget"}}, {})
    monkeypatch.syspath_prepend(str(alias))
    with pytest.raises(UsageError, match="'here' calls itself 'local': its entry point must have the same name"):
        get_target("here")


def test_a_service_whose_target_was_uninstalled_is_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    store = ServiceStore()
    store.claim("orphan")
    store.save("orphan", {"name": "orphan", "target": "gone"})
    with pytest.raises(UsageError, match="no deploy target named 'gone' is installed"):
        services.get_service("orphan")
    assert services.list_services() == []
    assert "skipping service orphan: no deploy target named 'gone'" in caplog.text


def test_a_package_installed_while_running_is_seen_at_the_next_lookup(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    assert "affine" not in installed_backends()  # read (and kept) before the install
    install_plugin(site, "late-affine", {RUNTIMES_GROUP: {"affine": "edgedeploy_affine:load"}},
                   {"edgedeploy_affine": EXAMPLES / "edgedeploy_affine.py"})
    assert "affine" in installed_backends()


def cli(*args: str, site: Path) -> subprocess.CompletedProcess[str]:
    """``edgedeploy ARGS`` in a fresh process that has the plug-in folder on its path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "packager.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


def test_a_third_party_target_runs_a_third_party_backend_through_the_cli(
        affine_site: Path, tmp_path: Path, signing_key: SigningKey, edgedeploy_home: Path) -> None:
    """``--target niced`` from entry points: deploy, show, score, rotate a key, delete; its agent runs niced."""
    assert "niced" in target_names()
    bundle = affine_bundle(tmp_path / "affine.edb", signing_key)
    deployed = cli("deploy", "slow-lane", "--bundle", str(bundle), "--target", "niced", "--auth", "--json",
                   site=affine_site)
    assert deployed.returncode == 0, deployed.stderr
    try:
        shown = json.loads(cli("service", "show", "slow-lane", "--json", site=affine_site).stdout)
        assert shown["target"] == "niced" and shown["state"] == "healthy"
        assert psutil.Process(shown["pid"]).nice() == 10
        x = [[1.0, 2.0, 3.0]]
        np.testing.assert_allclose(services.run("slow-lane", {"data": x})["y"], np.asarray(x) @ WEIGHTS + BIAS,
                                   rtol=1e-6)
        old = services.get_keys("slow-lane")["primary_key"]
        rotated = json.loads(cli("service", "keys", "slow-lane", "--regenerate", "primary", "--json",
                                 site=affine_site).stdout)
        assert rotated["primary_key"] != old and services.get_keys("slow-lane") == rotated
        assert services.run("slow-lane", {"data": x})["y"]  # the service takes the new key
    finally:
        removed = cli("service", "delete", "slow-lane", site=affine_site)
    assert removed.returncode == 0, removed.stderr
    assert not (edgedeploy_home / "services" / "slow-lane").exists()
    assert not psutil.pid_exists(shown["pid"]) or psutil.Process(shown["pid"]).status() == psutil.STATUS_ZOMBIE


def test_an_unknown_target_on_the_command_line_names_the_installed_ones(affine_site: Path) -> None:
    result = cli("deploy", "x", "--bundle", "b.edb", "--target", "nomad", site=affine_site)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert "'niced'" in result.stderr and "'local'" in result.stderr


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_runtime_and_target_modules_import_in_one_direction() -> None:
    """base is below every backend; services is above every target (no import back, even a lazy one)."""
    backends = {f"edge_agent.runtime.{p.stem}" for p in (ROOT / "edge_agent" / "runtime").glob("*.py")} - {
        "edge_agent.runtime.__init__", "edge_agent.runtime.base", "edge_agent.runtime.scoring"}
    assert not _imports(ROOT / "edge_agent" / "runtime" / "base.py") & (backends | {"edge_agent.runtime"})
    assert not _imports(ROOT / "edge_agent" / "runtime" / "scoring.py") & (backends | {"edge_agent.runtime.base"})
    for module in (ROOT / "edge_agent" / "runtime").glob("*.py"):
        if module.stem != "onnx":  # an FPGA or entry-script agent need not have onnxruntime
            assert "edge_agent.runtime.onnx" not in _imports(module), module.name
    for module in (ROOT / "packager" / "targets").glob("*.py"):
        assert "packager.services" not in _imports(module), module.name


def test_the_agent_side_imports_no_cloud_or_compiler_package() -> None:
    """The agent and every installed backend load without hls4ml, onnx, docker, kubernetes or packager."""
    code = (
        "import sys, edge_agent.daemon, edge_agent.server\n"
        "from edge_agent.errors import BundleError\n"
        "from edge_agent.plugins import RUNTIMES_GROUP, load_plugin, plugin_names\n"
        "names = plugin_names(RUNTIMES_GROUP)\n"
        "assert {'onnxruntime', 'entry-script', 'hls4ml', 'ice40'} <= set(names), names\n"
        "for name in names:\n"
        "    load_plugin(RUNTIMES_GROUP, name, 'runtime backend', BundleError)\n"
        "banned = ('hls4ml', 'qonnx', 'onnx', 'docker', 'kubernetes', 'packager')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(banned)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
