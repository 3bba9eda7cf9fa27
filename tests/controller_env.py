"""A real control plane for a test module: ``edgedeploy controller`` over a private Mosquitto, real agents.

:func:`controller_fleet` builds one (modules hold it in a module-scoped fixture, so each module starts
one broker and one controller): its own ``EDGEDEPLOY_HOME`` with a signing key, a SQLite store, the
bundle server (``edgedeploy serve``), the controller subprocess and ``edge-agent`` subprocesses that
report every second. Everything is stopped, by process, when the block ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from packager.keys import SigningKey, export_public_key, generate_key
from tests.e2e.conftest import MOSQUITTO, ROOT, Agent, Broker, free_port, make_agent, stop_process, wait_port
from tests.e2e.test_fleet import script_bundle

T = TypeVar("T")
TOKEN = "test-token-0123456789abcdef"
_UNSET: Any = object()


@dataclass
class ControllerFleet:
    """A running controller, its broker, bundle server and agents, and ways to talk to them."""

    folder: Path
    home: Path
    key: SigningKey
    broker: Broker
    url: str
    bundle_server: str
    token: str | None
    controller_log: Path
    agents: list[Agent] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a CLI subprocess that uses this fleet's home, broker and bundle server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEDEPLOY_CONTROLLER")}
        env.update(EDGEDEPLOY_HOME=str(self.home), EDGEDEPLOY_BROKER=self.broker.url,
                   EDGEDEPLOY_BUNDLE_SERVER=self.bundle_server, **extra)
        return env

    def cli(self, *args: str, controller: bool = True, timeout: float = 180,
            **env: str) -> subprocess.CompletedProcess[str]:
        """``edgedeploy ARGS`` (through the controller unless ``controller=False``)."""
        extra = {"EDGEDEPLOY_CONTROLLER": self.url, "EDGEDEPLOY_CONTROLLER_TOKEN": self.token or ""}
        if not controller:
            extra = {}
        return subprocess.run([sys.executable, "-m", "packager.cli.main", *args], capture_output=True, text=True,
                              env=self.env(**{**extra, **env}), cwd=ROOT, timeout=timeout)

    def api(self, method: str, path: str, body: Any = None, token: str | None = _UNSET,
            headers: dict[str, str] | None = None, raw: bytes | None = None) -> tuple[int, Any]:
        """One API call; returns (status, parsed JSON body). ``token`` defaults to the fleet's."""
        sent = {"Content-Type": "application/json", **(headers or {})}
        token = self.token if token is _UNSET else token
        if token:
            sent["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=sent)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def get(self, path: str, **kwargs: Any) -> Any:
        """GET ``path`` and its JSON; the status must be 200."""
        status, doc = self.api("GET", path, **kwargs)
        assert status == 200, (path, status, doc)
        return doc

    def bundle(self, name: str, version: int) -> Path:
        """A small signed entry-script bundle of model ``name`` at ``version``."""
        out = self.folder / "bundles" / f"{name}-{version}.edb"
        out.parent.mkdir(exist_ok=True)
        return out if out.exists() else script_bundle(out, self.key, version, name=name)

    def spec(self, name: str, version: int) -> dict[str, Any]:
        """What an API client sends for a bundle: verified and published to the bundle server here."""
        from packager.fleet import publish_target

        return publish_target(self.bundle(name, version), self.bundle_server, self.home)

    def online(self) -> set[str]:
        """Ids of the devices the controller lists as online."""
        return {d["device_id"] for d in self.get("/api/v1/devices")["devices"] if d["online"]}

    def log_tail(self) -> str:
        """The controller's log, for assertion messages."""
        return self.controller_log.read_text(errors="replace")[-3000:] if self.controller_log.exists() else ""


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 90.0, every: float = 0.3) -> T:
    """``check()``'s first truthy answer; fails the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def _wait_answers(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    def answers() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"the controller exited ({proc.returncode}): {log.read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/openapi.json", timeout=2):
                return True
        except OSError:
            return False

    wait_for(answers, "the controller to answer", timeout)


@contextmanager
def controller_fleet(folder: Path, devices: Sequence[dict[str, Any]] = (), tokens: list[str] | None = None,
                     broker_settings: str = "") -> Iterator[ControllerFleet]:
    """Broker, bundle server, controller and one agent per ``devices`` entry (``device_id``, groups, tags).

    ``broker_settings`` are more mosquitto.conf lines (see :class:`tests.e2e.conftest.Broker`).
    """
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed")
    home = folder / "home"
    with ExitStack() as stack:
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        patch.setenv("EDGEDEPLOY_HOME", str(home))  # the signing key and bundles of this fleet
        key = generate_key()
        key_file = folder / "publisher.pub"
        export_public_key(key_file)
        broker = Broker(folder / "broker", settings=broker_settings)
        broker.folder.mkdir(parents=True)
        broker.start()
        stack.callback(broker.stop)
        env = {**os.environ, "EDGEDEPLOY_HOME": str(home)}
        serve_port, port = free_port(), free_port()
        server = subprocess.Popen([sys.executable, "-m", "packager.cli.main", "serve", "--port", str(serve_port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        stack.callback(stop_process, server)
        args = ["controller", "--store", f"sqlite:///{folder / 'controller.db'}", "--broker", broker.url,
                "--port", str(port), "--retention", "1d"]
        if tokens:
            (folder / "tokens").write_text("# test tokens\n" + "\n".join(tokens) + "\n")
            args += ["--token-file", str(folder / "tokens")]
        log = folder / "controller.log"
        with open(log, "wb") as out:
            controller = subprocess.Popen([sys.executable, "-m", "packager.cli.main", "-v", *args], stdout=out,
                                          stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        stack.callback(stop_process, controller)
        url = f"http://127.0.0.1:{port}"
        wait_port(serve_port)
        _wait_answers(url, controller, log)
        fleet = ControllerFleet(folder, home, key, broker, url, f"http://127.0.0.1:{serve_port}",
                                tokens[0] if tokens else None, log)
        for spec in devices:
            agent = make_agent(folder / "agents", spec["device_id"], broker.url, key_file, spec.get("groups"),
                               spec.get("tags"), telemetry_period_s=1)
            agent.start()
            stack.callback(agent.kill)
            fleet.agents.append(agent)
        wanted = {spec["device_id"] for spec in devices}
        wait_for(lambda: wanted <= fleet.online(), f"devices {sorted(wanted)} online in the controller", 120)
        yield fleet
