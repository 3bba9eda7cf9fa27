"""Zero-downtime hand-over of a port between two real ``edge-agent serve`` processes (--reuse-port).

This is what a container update does: the new server binds the same ports, becomes ready, and the
old one is stopped with SIGTERM while clients keep opening new connections to the same address.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from packager.targets.base import free_port
from tests.servers import digits_bundle

pytestmark = pytest.mark.slow


def _serve(bundle: Path, http_port: int, grpc_port: int, workdir: Path, state: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "serve", "--bundle", str(bundle), "--name", "digits",
         "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--no-auth", "--reuse-port",
         "--workdir", str(workdir), "--state-file", str(state)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_ready(state: Path, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {process.stderr.read().decode() if process.stderr else ''}")
        if state.exists() and json.loads(state.read_text() or "{}").get("ready"):
            return
        time.sleep(0.1)
    raise AssertionError("server not ready")


def test_new_server_takes_over_the_port_without_a_failed_request(digits_mlp: Path, digits, signing_key,
                                                                   tmp_path: Path) -> None:
    bundle = digits_bundle(digits_mlp, digits, tmp_path)
    http_port, grpc_port = free_port(), free_port()
    old = _serve(bundle, http_port, grpc_port, tmp_path / "old", tmp_path / "old.json")
    new: subprocess.Popen[bytes] | None = None
    try:
        _wait_ready(tmp_path / "old.json", old)
        body = json.dumps({"data": digits.x_test[:1].tolist()}).encode()
        outcomes: list[str] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                request = urllib.request.Request(f"http://127.0.0.1:{http_port}/score", data=body,
                                                 headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=10) as response:
                        outcomes.append("ok" if response.status == 200 else f"http {response.status}")
                except Exception as exc:  # noqa: BLE001 - every failure is recorded and asserted on
                    outcomes.append(repr(exc))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        new = _serve(bundle, http_port, grpc_port, tmp_path / "new", tmp_path / "new.json")
        _wait_ready(tmp_path / "new.json", new)
        before_stop = len(outcomes)
        old.send_signal(signal.SIGTERM)
        assert old.wait(30) == 0
        time.sleep(0.5)
        after_old_gone = len(outcomes)
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(15)
        failures = [outcome for outcome in outcomes if outcome != "ok"]
        assert failures == [], failures[:5]
        assert before_stop > 20 and len(outcomes) > after_old_gone  # load ran across the hand-over
        assert new.poll() is None  # the new server answers alone now
    finally:
        for process in (old, new):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)
            if process is not None and process.stderr:
                process.stderr.close()
