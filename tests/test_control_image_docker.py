"""The controller's container image against a real engine: built by the CLI, run as the README runs it.

``edgedeploy image controller`` builds it (the base image's rootfs tar and the wheelhouse are cached
under ~/.cache/edgedeploy, as for the docker target's tests); a container then runs it on the host's
network (the test engine has no bridge) with a token file mounted where the image reads it, the order
key copied into its volume as the README shows, and a private Mosquitto as its broker. The controller
in the container must lead, see the simulated devices, guard its API with the token and serve the
console.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.fleet_sim import FleetSimulator
from packager.images import CONTROLLER_HOME, CONTROLLER_TOKENS, CONTROLLER_UID
from packager.keys import load_order_key
from tests.controller_env import TOKEN, wait_for
from tests.e2e.conftest import MOSQUITTO, Broker, free_port

pytestmark = [pytest.mark.slow, pytest.mark.docker]

EDGEDEPLOY = Path(sys.executable).parent / "edgedeploy"
DEVICES = 3


def _docker(*args: str, stdin: bytes | None = None, timeout: float = 120) -> str:
    """The ``docker`` command line, as the README's examples use it; its stdout."""
    result = subprocess.run(["docker", *args], input=stdin, capture_output=True, timeout=timeout,
                            stdin=None if stdin is not None else subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return result.stdout.decode()


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    """GET ``url`` (with a bearer token when given), redirects not followed; (status, body)."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed")
    running = Broker(tmp_path / "broker")
    running.folder.mkdir()
    running.start()
    try:
        yield running
    finally:
        running.stop()


def test_the_controller_image_builds_and_its_container_leads_the_fleet(docker_host: str, broker: Broker,
                                                                       edgedeploy_home: Path, tmp_path: Path) -> None:
    if shutil.which("docker") is None:
        pytest.skip("the docker command line is not installed (run .ci/install-docker.sh)")
    tag = f"edgedeploy/controller:test-{secrets.token_hex(3)}"
    built = subprocess.run([str(EDGEDEPLOY), "image", "controller", "--tag", tag, "--json"], capture_output=True,
                           text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["image"] == tag
    name, volume = f"edgedeploy-ctl-{secrets.token_hex(3)}", f"edgedeploy-ctl-{secrets.token_hex(3)}"
    try:
        config = json.loads(_docker("image", "inspect", tag))[0]["Config"]
        assert config["User"] == f"{CONTROLLER_UID}:{CONTROLLER_UID}" and "8090/tcp" in config["ExposedPorts"]
        assert list(config["Volumes"]) == [CONTROLLER_HOME] and config["Labels"]["edgedeploy.role"] == "controller"
        assert config["Entrypoint"][:2] == ["edgedeploy", "controller"] and CONTROLLER_TOKENS in config["Entrypoint"]
        assert f"EDGEDEPLOY_HOME={CONTROLLER_HOME}" in config["Env"] and config["Healthcheck"]["Test"]

        key_id = load_order_key(edgedeploy_home).key_id  # this home's order key, which the devices trust
        archive = subprocess.run(["tar", "-C", str(edgedeploy_home), "-c", "keys/orders"], capture_output=True,
                                 check=True).stdout
        _docker("run", "--rm", "-i", "--network", "host", "-v", f"{volume}:{CONTROLLER_HOME}", "--entrypoint",
                "tar", tag, "-x", "-C", CONTROLLER_HOME, stdin=archive)  # the README's copy, once
        tokens = tmp_path / "tokens"
        tokens.write_text(TOKEN + "\n")
        tokens.chmod(0o600)  # the README's way: readable by the image's user only
        if os.geteuid() == 0:
            os.chown(tokens, CONTROLLER_UID, CONTROLLER_UID)
        else:
            tokens.chmod(0o644)
        port = free_port()
        _docker("run", "-d", "--name", name, "--network", "host", "-v", f"{volume}:{CONTROLLER_HOME}",
                "-v", f"{tokens}:{CONTROLLER_TOKENS}:ro", "-e", f"EDGEDEPLOY_BROKER={broker.url}", tag,
                "--store", f"sqlite:///{CONTROLLER_HOME}/controller.db", "--port", str(port))
        url = f"http://127.0.0.1:{port}"
        with FleetSimulator("127.0.0.1", broker.port, DEVICES, telemetry_period_s=None):
            _check_the_controller(url, name)
        owner = _docker("run", "--rm", "-v", f"{volume}:{CONTROLLER_HOME}", "--entrypoint", "stat", tag, "-c",
                        "%u %a", f"{CONTROLLER_HOME}/keys/orders/controller.key", f"{CONTROLLER_HOME}/controller.db")
        assert owner.split() == [str(CONTROLLER_UID), "600", str(CONTROLLER_UID), "644"]
        assert _order_key_id(tag, volume) == key_id  # the copied key, not a new one
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
        subprocess.run(["docker", "volume", "rm", "-f", volume], capture_output=True, timeout=60)
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True, timeout=60)


def _check_the_controller(url: str, container: str) -> None:
    """Health (leading, connected) with the token, 401 without, the devices, the OpenAPI document and the console."""
    def health() -> dict[str, Any] | None:
        state = _docker("inspect", "-f", "{{.State.Status}}", container).strip()
        assert state == "running", _docker("logs", container)[-2000:]
        try:
            status, body = _get(url + "/api/v1/health", TOKEN)
        except OSError:
            return None
        doc: dict[str, Any] = json.loads(body) if status == 200 else {}
        return doc if doc.get("leader") else None

    assert wait_for(health, "the container's controller to lead", 120)["connected"] is True
    assert _get(url + "/api/v1/health")[0] == 401
    devices = wait_for(lambda: (d := json.loads(_get(url + "/api/v1/devices", TOKEN)[1]))["total"] >= DEVICES and d,
                       f"{DEVICES} simulated devices in the container's controller", 60)
    assert sorted(row["device_id"] for row in devices["devices"])[0].startswith("sim")
    status, body = _get(url + "/openapi.json")
    assert status == 200 and "/api/v1/devices" in json.loads(body)["paths"]
    assert _get(url + "/")[0] == 303  # the console sends a visitor without a token to /login
    status, body = _get(url + "/", TOKEN)
    assert status == 200 and b"sim" in body


def _order_key_id(tag: str, volume: str) -> str:
    """The key id of the order key in ``volume``, as the image's edgedeploy reads it."""
    script = "from packager.keys import load_order_key; print(load_order_key().key_id)"
    return _docker("run", "--rm", "-v", f"{volume}:{CONTROLLER_HOME}", "--entrypoint", "python3", tag, "-c",
                   script).strip()
