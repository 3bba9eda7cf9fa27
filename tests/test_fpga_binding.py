"""Hardware binding: what a bundle's accelerator section demands against the profile and detected hardware."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.errors import DeploymentError
from edge_agent.fpga.binding import DetectedAccelerator, binding_problem, check_binding, detect_accelerators
from edge_agent.profiles import load_profile

KV260 = {"kind": "fpga", "vendor": "xilinx", "board": "kria-kv260", "part": "xck26-sfvc784-2LV-c",
         "shell_version": "kv260-base-2022.2", "firmware_sha256": "ab" * 32}
ICE40 = {"kind": "fpga", "vendor": "lattice", "board": "icebreaker", "part": "iCE40UP5K-SG48",
         "shell_version": "edgedeploy-ice40-uart-1", "bitstream_sha256": "cd" * 32}


def _accelerators(profile: str) -> list[dict]:
    return list(load_profile(profile).document["accelerators"])


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_kv260_is_detected_from_sysfs_and_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEDEPLOY_ACCELERATORS", raising=False)
    root = _tree(tmp_path, {"sys/class/fpga_manager/fpga0/name": "Xilinx ZynqMP FPGA Manager",
                            "proc/device-tree/model": "ZynqMP SMK-K26 Rev1/B/A KV260\x00"})
    detected = detect_accelerators(root)
    assert DetectedAccelerator("xilinx", "kria-kv260", detected[0].evidence) in detected
    assert binding_problem(KV260, _accelerators("xilinx-kria-kv260"), detected) is None


def test_icebreaker_is_detected_from_its_usb_bridge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEDEPLOY_ACCELERATORS", raising=False)
    root = _tree(tmp_path, {"sys/bus/usb/devices/1-1.2/idVendor": "0403\n",
                            "sys/bus/usb/devices/1-1.2/idProduct": "6010\n",
                            "sys/bus/usb/devices/1-1.2/product": "iCEBreaker V1.0e\n",
                            "sys/bus/usb/devices/1-1.3/idVendor": "046d\n",
                            "sys/bus/usb/devices/1-1.3/idProduct": "c52b\n"})
    models = [(d.vendor, d.model) for d in detect_accelerators(root)]
    assert ("lattice", "icebreaker") in models and ("lattice", "ice40-ftdi") not in models
    assert binding_problem(ICE40, _accelerators("lattice-ice40-up5k"), detect_accelerators(root)) is None


def test_a_bundle_for_another_board_is_refused_with_both_sides_named() -> None:
    board = [DetectedAccelerator("xilinx", "kria-kv260", "test")]
    with pytest.raises(DeploymentError) as refused:
        check_binding(ICE40, _accelerators("xilinx-kria-kv260"), board)
    message = str(refused.value)
    assert message.startswith("refused: the bundle is built for lattice icebreaker part iCE40UP5K-SG48")
    assert "xilinx kria-kv260 part xck26-sfvc784-2LV-c" in message
    with pytest.raises(DeploymentError, match="profile has no accelerator"):
        check_binding(KV260, _accelerators("cpu-x86_64"), board)


def test_a_shell_mismatch_and_a_missing_board_are_refused() -> None:
    profile = _accelerators("xilinx-kria-kv260")
    newer = dict(KV260, shell_version="kv260-base-2024.1")
    assert "needs shell kv260-base-2024.1" in str(binding_problem(newer, profile, []))
    problem = binding_problem(KV260, profile, [DetectedAccelerator("lattice", "icebreaker", "usb")])
    assert problem and "does not have" in problem and "lattice icebreaker (usb)" in problem


def test_simulation_stands_in_for_the_board_only_when_allowed() -> None:
    simulators = [DetectedAccelerator("lattice", "verilator", "verilator"),
                  DetectedAccelerator("xilinx", "emulator", "g++")]
    profile = _accelerators("lattice-ice40-up5k")
    assert binding_problem(ICE40, profile, simulators) is not None
    assert binding_problem(ICE40, profile, simulators, simulated=True) is None
    emulator_bundle = dict(_accelerators("fpga-emulator")[0], board="emulator")
    emulator_bundle.pop("model")
    assert binding_problem(emulator_bundle, _accelerators("fpga-emulator"), simulators) is None


def test_cpu_bundles_bind_anywhere() -> None:
    assert binding_problem(None, _accelerators("cpu-x86_64"), []) is None
