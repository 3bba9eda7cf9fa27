"""A real edge agent refuses a bundle bound to hardware it does not have, before unpacking it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge_agent.profiles import load_profile
from packager.bundle import write_bundle
from packager.fleet import FleetController
from packager.keys import SigningKey
from tests.e2e.test_fleet import needs_agent, score, script_bundle, wait_fleet

pytestmark = pytest.mark.e2e


def _bound_to_kv260(out: Path, key: SigningKey, version: int) -> Path:
    """The same scorer, but its manifest binds it to a Kria KV260 with a given firmware digest."""
    from edge_agent.bundle import read_manifest

    plain = script_bundle(out.with_suffix(".plain.edb"), key, version)
    manifest, _ = read_manifest(plain)
    manifest.profile = load_profile("xilinx-kria-kv260").to_dict()
    manifest.accelerator = {"kind": "fpga", "vendor": "xilinx", "board": "kria-kv260",
                            "part": "xck26-sfvc784-2LV-c", "shell_version": "kv260-base-2022.2",
                            "firmware_sha256": "ab" * 32}
    payload: dict[str, Path | bytes] = {
        "src/score.py": b"def init():\n    pass\n\ndef run(data):\n    return {'version': %d}\n" % version,
        "model/params.json": b'{"v": %d}' % version, "samples/input.json": b'{"data": [[1.0, 2.0]]}'}
    manifest.files = []
    write_bundle(out, manifest, payload, key)
    return out


@needs_agent
def test_agent_refuses_a_bundle_for_a_board_it_lacks(mqtt_broker: Any, bundle_server: Any, agents: Any,
                                                     signing_key: SigningKey, tmp_path: Path) -> None:
    device = agents(1)[0]
    v1 = script_bundle(tmp_path / "v1.edb", signing_key, 1)
    bound = _bound_to_kv260(tmp_path / "v2-kv260.edb", signing_key, 2)
    with FleetController(mqtt_broker.url) as ctl:
        wait_fleet(ctl, [device.device_id], lambda r: r["online"], timeout=120)
        first = ctl.rollout(v1, "all", bundle_server.url, canary=0, wave="100%", wait=True, wave_timeout=120)
        assert ctl.status(first)["state"] == "succeeded"
        slots = device.data_dir / "models" / "scorer" / "slots"  # the model's own A/B slots
        slots_before = sorted(p.name for p in slots.iterdir())
        second = ctl.rollout(bound, "all", bundle_server.url, canary=0, wave="100%", wait=True, wave_timeout=120)
        status = ctl.status(second)
        assert status["state"] == "rolled-back", status
        row = wait_fleet(ctl, [device.device_id], lambda r: r["state"] in ("failed", "active"))[0]
    assert row["model_version"] == 1 and score(row) == {"version": 1}
    assert "refused: the bundle is built for xilinx kria-kv260" in str(status), status
    for slot in slots.iterdir():  # nothing of the refused bundle was unpacked
        assert slot.name in slots_before or not any(slot.iterdir())
