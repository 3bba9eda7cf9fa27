"""Fleet fixtures: a private Mosquitto broker, a running bundle server, and real edge agents."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from packager.targets.base import free_port, wait_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
ROOT = Path(__file__).resolve().parents[2]



def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Signal a process we started and reap it (SIGKILL when it does not stop in time)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@dataclass
class Broker:
    """A private mosquitto on a loopback port; retained messages persist across ``restart()``.

    ``settings`` are more mosquitto.conf lines (a simulated fleet on one connection needs
    ``max_queued_messages 0``: the default queue of 1,000 messages per client drops the rest);
    ``persistent=False`` keeps retained messages in memory only (saving 300,000 of them every
    second would cost more than the fleet it measures).
    """

    folder: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    settings: str = ""
    persistent: bool = True

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        conf = self.folder / "mosquitto.conf"
        persistence = f"persistence true\npersistence_location {self.folder}/\nautosave_interval 1\n" \
            if self.persistent else "persistence false\n"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{persistence}"
                        f"log_dest file {self.folder}/mosquitto.log\n{self.settings}\n")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        """SIGTERM: mosquitto writes its persistence file on the way out."""
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


@pytest.fixture
def mqtt_broker(tmp_path: Path) -> Iterator[Broker]:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed")
    folder = tmp_path / "broker"
    folder.mkdir()
    broker = Broker(folder)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@dataclass
class BundleServerProcess:
    """``edgedeploy serve`` running on a free port."""

    url: str
    port: int
    proc: subprocess.Popen


@pytest.fixture
def bundle_server(edgedeploy_home: Path) -> Iterator[BundleServerProcess]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "packager.cli.main", "serve", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy(), cwd=ROOT)
    try:
        wait_port(port)
        yield BundleServerProcess(f"http://127.0.0.1:{port}", port, proc)
    finally:
        stop_process(proc)


@dataclass
class Agent:
    """One ``edge-agent --config`` subprocess and its files."""

    device_id: str
    config: Path
    data_dir: Path
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None:
            stop_process(self.proc, sig)
            self.proc = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


AgentFactory = Callable[..., list[Agent]]


def make_agent(root: Path, device_id: str, broker_url: str, trusted_key_file: Path, groups: list[str] | None = None,
               tags: dict[str, str] | None = None, profile: str = "cpu-x86_64", **settings: Any) -> Agent:
    """An agent's folder and agent.yaml under ``root/device_id`` (not started), on free ports."""
    folder = root / device_id
    folder.mkdir(parents=True)
    config = folder / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": device_id, "profile": profile, "groups": list(groups or []), **settings,
        "tags": dict(tags or {}), "broker": broker_url, "data_dir": str(folder / "data"),
        "trusted_keys": [str(trusted_key_file)], "http_port": 0, "grpc_port": 0,
    }))
    return Agent(device_id, config, folder / "data", folder / "agent.log")


@pytest.fixture
def trusted_key_file(signing_key, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    """The test signing key's public key, as devices get it."""
    from packager.keys import export_public_key

    path = tmp_path / "publisher.pub"
    export_public_key(path)
    return path


@pytest.fixture
def agents(mqtt_broker: Broker, trusted_key_file: Path, tmp_path: Path) -> Iterator[AgentFactory]:
    """``agents(n, groups=..., tags=...)`` starts n real edge agents in parallel; all killed at teardown."""
    started: list[Agent] = []

    def start(n: int, prefix: str = "dev", groups: list[str] | None = None,
              tags: dict[str, str] | None = None, profile: str = "cpu-x86_64", **settings: Any) -> list[Agent]:
        batch = [make_agent(tmp_path / "agents", f"{prefix}-{len(started) + i:03d}", mqtt_broker.url,
                            trusted_key_file, groups, tags, profile, **settings) for i in range(n)]
        started.extend(batch)
        for agent in batch:
            agent.start()
        return batch

    try:
        yield start
    finally:
        for agent in started:
            agent.kill()
