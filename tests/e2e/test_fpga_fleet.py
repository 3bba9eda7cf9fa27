"""FPGA bundles through the fleet: real agents with FPGA profiles install, bind-check and serve them."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from packager.examples import build_digits_dense_mlp
from packager.fleet import FleetController
from packager.keys import SigningKey
from packager.packaging import package
from tests.e2e.test_fleet import needs_agent, wait_fleet

pytest.importorskip("hls4ml")
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _score(row: dict[str, Any], x: np.ndarray) -> np.ndarray:
    request = urllib.request.Request(f"http://127.0.0.1:{row['http_port']}/score",
                                     data=json.dumps({"data": x.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return np.asarray(json.loads(response.read())["probabilities"])


@needs_agent
def test_fpga_bundles_roll_out_to_matching_devices_only(mqtt_broker: Any, bundle_server: Any, agents: Any,
                                                        digits, signing_key: SigningKey, tmp_path: Path) -> None:
    model = build_digits_dense_mlp(tmp_path / "digits_dense.onnx")
    np.savez(tmp_path / "calib.npz", input=digits.x_train)
    hls = package(model, "fpga-emulator", tmp_path / "hls.edb", name="digits",
                  calibration=tmp_path / "calib.npz").bundle_path
    ice40 = package(model, "lattice-ice40-up5k", tmp_path / "ice40.edb", name="digits",
                    calibration=tmp_path / "calib.npz").bundle_path
    emulator = agents(1, prefix="emu", groups=["emu"], profile="fpga-emulator")[0]
    board = agents(1, prefix="ice", groups=["ice"], profile="lattice-ice40-up5k", simulate_accelerators=True)[0]
    x = digits.x_test[:12]
    with FleetController(mqtt_broker.url) as ctl:
        wait_fleet(ctl, [emulator.device_id, board.device_id], lambda r: r["online"], timeout=120)
        first = ctl.rollout(hls, "group:emu", bundle_server.url, canary=0, wave="100%", wait=True, wave_timeout=180)
        assert ctl.status(first)["state"] == "succeeded", ctl.status(first)
        second = ctl.rollout(ice40, "group:ice", bundle_server.url, canary=0, wave="100%", wait=True,
                             wave_timeout=180)
        assert ctl.status(second)["state"] == "succeeded", ctl.status(second)
        rows = {r["device_id"]: r for r in wait_fleet(ctl, [emulator.device_id, board.device_id],
                                                      lambda r: r["state"] == "active")}
        # the HLS firmware is built for the Xilinx emulator: the iCE40 device refuses it
        third = ctl.rollout(hls, "group:ice", bundle_server.url, canary=0, wave="100%", wait=True, wave_timeout=180)
        status = ctl.status(third)
    assert status["state"] == "rolled-back" and "refused: the bundle is built for xilinx emulator" in str(status)
    for device in (emulator, board):
        answer = _score(rows[device.device_id], x)
        assert answer.shape == (12, 10) and (answer.argmax(1) == digits.y_test[:12]).mean() >= 0.8
