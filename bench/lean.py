"""Device install benchmark: the project's wheel with the agent's dependencies only (``pip install
edgedeploy``, no extra), its size on disk, and the idle RSS of the agent with one small model, beside
the same agent in the full development install (``.[dev]``). Three agents are measured: ``edge-agent
serve`` of the digits MLP (onnxruntime) and of the small entry-script bundle ``bench/fleet.py`` rolls
out, and the fleet daemon (``edge-agent --config``, private Mosquitto) after a rollout of that bundle,
which is what ``bench/fleet.py``'s idle RSS per agent measures.

The helpers here (``build_wheel``, ``install_device``, ``serving_agent``) are also what
``tests/test_lean_install.py`` runs, so the figures and the test describe the same install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import print_table, write_results

__all__ = ["CLOUD_SIDE_PACKAGES", "DeviceInstall", "RunningAgent", "build_wheel", "disk_mb", "install_device",
           "installed_packages", "main", "serving_agent"]

PROJECT = Path(__file__).resolve().parent.parent
# what a device must not carry: the packager's converters, the cloud targets' SDKs, the FPGA compilers
CLOUD_SIDE_PACKAGES = frozenset({"docker", "onnx", "onnxconverter-common", "kubernetes", "hls4ml", "qonnx"})
IDLE_S = 3.0  # rest after the first requests, so that the figure is the agent at rest
# a clean copy of the sources: leftovers in build/ or a venv never reach the wheel
_NOT_SOURCES = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
                                      "results", "tests", "demo-out")


@dataclass(frozen=True)
class DeviceInstall:
    """A virtual environment holding the wheel with its base dependencies only."""

    venv: Path
    wheel: Path

    def bin(self, name: str) -> Path:
        """A command installed in the environment (``python``, ``edge-agent``, ``edgedeploy``)."""
        return self.venv / "bin" / name


@dataclass(frozen=True)
class RunningAgent:
    """An ``edge-agent serve`` process and the ports it answers on."""

    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def rss_mb(self) -> float:
        """Resident memory of the agent process, in MB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0


def _run(command: list[str], what: str, cwd: Path | None = None) -> str:
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=clean_env())
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {(done.stderr or done.stdout)[-2000:]}")
    return done.stdout


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would let another environment's packages leak in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, **extra}


def build_wheel(out: Path) -> Path:
    """Build the project's wheel (no dependencies) from a clean copy of its sources into ``out``."""
    source = out / "source"
    shutil.copytree(PROJECT, source, ignore=_NOT_SOURCES)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)], "pip wheel")
    shutil.rmtree(source)
    return next(out.glob("edgedeploy-*.whl"))


def install_device(folder: Path, compile_bytecode: bool = True) -> DeviceInstall:
    """A fresh venv in ``folder`` with the wheel and only its base (device) dependencies, from pip's index.

    ``compile_bytecode=False`` skips writing ``.pyc`` files (faster, for tests; a real install has them).
    """
    wheel = build_wheel(folder)
    venv = folder / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], "python -m venv")
    flags = [] if compile_bytecode else ["--no-compile"]
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *flags, str(wheel)], "pip install of the wheel")
    return DeviceInstall(venv, wheel)


def installed_packages(python: Path) -> set[str]:
    """Distribution names installed in the environment of ``python``, lower case with dashes."""
    listed = json.loads(_run([str(python), "-m", "pip", "list", "--format=json"], "pip list"))
    return {item["name"].lower().replace("_", "-") for item in listed}


def disk_mb(folder: Path) -> float:
    """Disk space used under ``folder`` (allocated blocks, as ``du`` counts them), in MB."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                total += path.stat().st_blocks * 512
    return total / 1024 / 1024


@contextmanager
def serving_agent(edge_agent: Path, bundle: Path, trusted_key: Path, workdir: Path,
                  timeout: float = 60.0) -> Iterator[RunningAgent]:
    """Run ``edge-agent serve`` on free loopback ports until the block ends; RuntimeError if it never gets ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    state = workdir / "state.json"
    command = [str(edge_agent), "serve", "--bundle", str(bundle), "--trusted-key", str(trusted_key), "--no-auth",
               "--http-port", "0", "--grpc-port", "0", "--state-file", str(state), "--workdir", str(workdir / "agent")]
    with open(workdir / "agent.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                   env=clean_env(EDGEDEPLOY_HOME=str(workdir / "home")))
    try:
        document = _wait_ready(process, state, timeout, workdir / "agent.log")
        yield RunningAgent(process, int(document["http_port"]), int(document["grpc_port"]))
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(process: subprocess.Popen[bytes], state: Path, timeout: float, log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state.is_file():
            document: dict[str, Any] = json.loads(state.read_text())
            if document.get("ready"):
                return document
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"edge-agent serve did not get ready (exit {process.poll()}): {log.read_text()[-2000:]}")


def rest_infer(base: str, model: str, rows: list[list[float]]) -> dict[str, Any]:
    """One Open Inference Protocol v2 request over REST; the decoded response."""
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [len(rows), len(rows[0])],
                        "data": [v for row in rows for v in row]}]}
    request = urllib.request.Request(f"{base}/v2/models/{model}/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return dict(json.loads(response.read()))


def _bundles(folder: Path) -> tuple[dict[str, Path], Path, list[list[float]]]:
    """The digits MLP packaged (fp32) and the fleet bench's entry-script bundle, both signed; the public
    key; two digits input rows."""
    from packager.examples import build_digits_mlp, digits_data
    from packager.keys import export_public_key, generate_key
    from packager.packaging import package
    from tests.e2e.test_fleet import script_bundle

    os.environ["EDGEDEPLOY_HOME"] = str(folder / "home")
    key = generate_key()
    model = build_digits_mlp(folder / "digits.onnx")
    digits = package(model, "cpu-x86_64", folder / "digits.edb", quantize="none", name="digits").bundle_path
    export_public_key(folder / "publisher.pub")
    bundles = {"digits": digits, "scorer": script_bundle(folder / "scorer.edb", key, 1)}
    return bundles, folder / "publisher.pub", digits_data().x_test[:2].tolist()


def _serve_rss(edge_agent: Path, bundle: Path, key: Path, workdir: Path, request: Callable[[str], Any]) -> float:
    with serving_agent(edge_agent, bundle, key, workdir) as agent:
        request(agent.http)
        time.sleep(IDLE_S)  # the measurement is of the agent at rest
        return agent.rss_mb()


def _score(base: str) -> None:
    request = urllib.request.Request(f"{base}/score", data=b'{"data": [[1.0, 2.0]]}',
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


def _daemon_rss(edge_agent: Path, bundle: Path, key: Path, workdir: Path) -> float:
    """Idle RSS of ``edge-agent --config`` after a fleet rollout of ``bundle`` to it."""
    import yaml

    from packager.bundle_server import BundleServer
    from packager.fleet import FleetController
    from tests.e2e.conftest import Broker

    workdir.mkdir(parents=True)
    home = Path(os.environ["EDGEDEPLOY_HOME"])  # the packaging home: its trust store knows the signer
    broker, server = Broker(workdir), BundleServer(port=0, home=home)
    broker.start()
    server.start()
    config = workdir / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": "dev-0", "profile": "cpu-x86_64", "groups": [], "tags": {}, "broker": broker.url,
        "data_dir": str(workdir / "data"), "trusted_keys": [str(key)], "http_port": 0, "grpc_port": 0}))
    with open(workdir / "agent.log", "wb") as log:
        process = subprocess.Popen([str(edge_agent), "--config", str(config)], stdout=log,
                                   stderr=subprocess.STDOUT, cwd=workdir, env=clean_env())
    try:
        with FleetController(broker.url, home=home) as ctl:
            deadline = time.monotonic() + 60
            while not any(d["online"] for d in ctl.devices()):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"the agent did not come online: {(workdir / 'agent.log').read_text()[-500:]}")
                time.sleep(0.2)
            rollout = ctl.rollout(bundle, "all", server.url, canary=1, wait=True, wave_timeout=120)
            if ctl.status(rollout, advance=False)["succeeded"] != 1:
                raise RuntimeError(f"the rollout to the agent failed: {ctl.status(rollout, advance=False)}")
        time.sleep(IDLE_S)
        return RunningAgent(process, 0, 0).rss_mb()
    finally:
        process.terminate()
        process.wait(15)
        server.stop()
        broker.stop()


def _measure(label: str, python: Path, venv: Path, bundles: dict[str, Path], key: Path, rows: list[list[float]],
             workdir: Path) -> dict[str, Any]:
    packages = installed_packages(python)
    edge_agent = python.parent / "edge-agent"
    result: dict[str, Any] = {
        "install": label, "disk_mb": round(disk_mb(venv), 1), "packages": len(packages),
        "cloud_side_packages": ",".join(sorted(packages & CLOUD_SIDE_PACKAGES)) or "none",
        "serve_digits_rss_mb": round(_serve_rss(edge_agent, bundles["digits"], key, workdir / "digits",
                                                lambda base: rest_infer(base, "digits", rows)), 1),
        "serve_scorer_rss_mb": round(_serve_rss(edge_agent, bundles["scorer"], key, workdir / "scorer", _score), 1),
    }
    try:
        result["daemon_scorer_rss_mb"] = round(_daemon_rss(edge_agent, bundles["scorer"], key, workdir / "fleet"), 1)
    except Exception as exc:  # noqa: BLE001 - no broker here must not hide the other figures
        result["daemon_scorer_rss_mb"] = f"not measured: {exc}"
    return result


def main() -> None:
    """Build and install the device wheel, then measure both installs; table + bench/results/lean.json."""
    with tempfile.TemporaryDirectory(prefix="edgedeploy-bench-lean-") as tmp:
        folder = Path(tmp)
        bundles, key, rows = _bundles(folder)
        started = time.monotonic()
        device = install_device(folder / "device")
        install_s = time.monotonic() - started
        results = [
            _measure("device: pip install edgedeploy (wheel)", device.bin("python"), device.venv, bundles, key, rows,
                     folder / "run-device"),
            _measure("development: pip install -e '.[dev]'", Path(sys.executable), Path(sys.prefix), bundles, key,
                     rows, folder / "run-dev"),
        ]
    results[0]["install_s"] = round(install_s, 1)
    print_table(results, ["install", "disk_mb", "packages", "cloud_side_packages", "serve_digits_rss_mb",
                          "serve_scorer_rss_mb", "daemon_scorer_rss_mb", "install_s"])
    write_results("lean", {"models": {"digits": "digits MLP (64 hidden, fp32, onnxruntime)",
                                      "scorer": "bench/fleet.py's entry-script bundle"},
                           "idle_s": IDLE_S, "results": results})


if __name__ == "__main__":
    main()
