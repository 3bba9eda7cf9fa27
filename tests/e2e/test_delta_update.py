"""Delta updates end to end: a real ``edge-agent`` against a real ``edgedeploy serve`` over a private Mosquitto.

Four rollouts of one model to one device: version 1 travels whole (nothing to apply a delta to); version 2,
whose last layer alone was retrained, travels as a delta of a fraction of the bundle and is rebuilt to the
exact bytes; for version 3 the server's cached delta is corrupt, and for version 4 the server no longer
holds the base bundle: the device says why in one log line, downloads the whole bundle and installs it.
The bytes come from the server's own access log (``edgedeploy -v serve``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.bundle import MANIFEST_NAME, bundle_sha256
from packager.bundle_server import bundles_dir, publish_bundle
from packager.delta import DeltaCache
from packager.fleet import FleetController
from packager.keys import SigningKey
from packager.targets.base import free_port, wait_port
from tests.delta_bundles import build_digits_models, onnx_bundle
from tests.e2e.conftest import ROOT, BundleServerProcess, stop_process

pytestmark = pytest.mark.e2e


@pytest.fixture
def logged_server(edgedeploy_home: Path, tmp_path: Path) -> Iterator[tuple[BundleServerProcess, Path]]:
    """``edgedeploy -v serve`` with its log (one line per answer, with the bytes sent) in a file."""
    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "packager.cli.main", "-v", "serve", "--port", str(port)],
                                stdout=sink, stderr=subprocess.STDOUT, env=os.environ.copy(), cwd=ROOT)
    try:
        wait_port(port)
        yield BundleServerProcess(f"http://127.0.0.1:{port}", port, proc), log
    finally:
        stop_process(proc)


def served_bytes(log: Path) -> dict[str, int]:
    """Bytes the server sent, by path under /bundles/: ``<sha>.edb``, or ``<new>.edb.delta/<old>``."""
    totals: dict[str, int] = {}
    for match in re.finditer(r"sent (\d+) bytes of /bundles/(\S+) to", log.read_text()):
        totals[match.group(2)] = totals.get(match.group(2), 0) + int(match.group(1))
    return totals


def wait_active(ctl: FleetController, device_id: str, sha: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rows = [d for d in ctl.devices() if d["device_id"] == device_id]
        if rows and rows[0]["bundle_sha256"] == sha and rows[0]["state"] == "active":
            return rows[0]
        assert time.monotonic() < deadline, f"the device never got {sha[:12]} active: {rows}"
        time.sleep(0.5)


def score(row: dict[str, Any]) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{row['http_port']}/score",
                                     data=json.dumps({"data": [[0.5] * 64]}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_a_device_updates_through_deltas_and_falls_back_to_whole_bundles(
        mqtt_broker: Any, logged_server: tuple[BundleServerProcess, Path], agents: Any, signing_key: SigningKey,
        tmp_path: Path) -> None:
    server, log = logged_server
    models = build_digits_models(tmp_path / "models")
    versions = {1: onnx_bundle(tmp_path / "v1.edb", models.base, signing_key, 1),
                2: onnx_bundle(tmp_path / "v2.edb", models.head, signing_key, 2),
                3: onnx_bundle(tmp_path / "v3.edb", models.head, signing_key, 3, sample_row=4),
                4: onnx_bundle(tmp_path / "v4.edb", models.base, signing_key, 4, sample_row=4)}
    sha = {v: bundle_sha256(path) for v, path in versions.items()}
    (agent,) = agents(1)
    store = bundles_dir()
    with FleetController(mqtt_broker.url) as ctl:
        deadline = time.monotonic() + 120
        while not any(d["device_id"] == agent.device_id and d["online"] for d in ctl.devices()):
            assert time.monotonic() < deadline, "the agent never came online"
            time.sleep(0.5)

        def roll_out(version: int) -> dict[str, Any]:
            ctl.rollout(versions[version], f"device:{agent.device_id}", server.url, canary=0, wave="100%",
                        wait=True, wave_timeout=120)
            return wait_active(ctl, agent.device_id, sha[version])

        roll_out(1)
        assert served_bytes(log) == {f"{sha[1]}.edb": versions[1].stat().st_size}

        row = roll_out(2)  # only the last layer changed: a delta
        sent = served_bytes(log)
        assert f"{sha[2]}.edb" not in sent, "the whole bundle travelled"
        assert 0 < sent[f"{sha[2]}.edb.delta/{sha[1]}"] <= 0.2 * versions[2].stat().st_size, sent
        slot = agent.data_dir / "models" / "digits" / "slots"
        installed = [p for p in slot.glob(f"*/{MANIFEST_NAME}") if p.read_bytes() == _manifest_bytes(versions[2])]
        assert installed, "the active slot does not hold version 2's manifest"
        assert "label" in score(row)

        publish_bundle(versions[3])
        cached = DeltaCache(store).get(sha[3], sha[2])  # made ahead of the order, then corrupted
        data = bytearray(cached.read_bytes())
        data[len(data) // 2] ^= 0x40
        cached.write_bytes(bytes(data))
        roll_out(3)
        assert served_bytes(log)[f"{sha[3]}.edb"] == versions[3].stat().st_size

        (store / f"{sha[3]}.edb").unlink()  # the server lost the base bundle
        row = roll_out(4)
        assert served_bytes(log)[f"{sha[4]}.edb"] == versions[4].stat().st_size
        assert "label" in score(row)
    agent_log = agent.log.read_text()
    assert len(re.findall(f"bundle {sha[2][:12]} rebuilt from a \\d+-byte delta against {sha[1][:12]}", agent_log)) == 1
    fallbacks = re.findall(r"no delta update to bundle (\w+) from (\w+) \((.*)\): downloading the whole bundle",
                           agent_log)
    assert [(new, old) for new, old, _ in fallbacks] == [(sha[3][:12], sha[2][:12]), (sha[4][:12], sha[3][:12])]
    assert "HTTP 404" in fallbacks[1][2]
    assert "Traceback" not in agent_log


def _manifest_bytes(bundle: Path) -> bytes:
    with tarfile.open(bundle, "r:gz") as tar:
        member = tar.extractfile(MANIFEST_NAME)
        assert member is not None
        return member.read()
