"""Hardware binding: a bundle compiled for an accelerator runs only where that accelerator is.

The manifest's ``accelerator`` section names the board, the part, the shell (overlay / bitstream
interface) version and the digest of the firmware or bitstream. Before a bundle is installed the
agent compares it with its device profile and with the hardware it detects, and refuses a mismatch
with one message that says what the bundle wants and what the device has; nothing is unpacked.

Detection reads only the file system (sysfs, /dev), so it is cheap and safe to run on every install:
Xilinx boards show an FPGA manager or an XRT device node, iCE40 boards their FTDI USB bridge, and the
emulator needs a C++ compiler. ``EDGEDEPLOY_ACCELERATORS`` (a JSON list) overrides detection, for a
device whose board is known but not visible to these probes.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.errors import DeploymentError

__all__ = ["DetectedAccelerator", "binding_problem", "check_binding", "detect_accelerators"]

#: USB vendor:product ids of the FTDI bridges on iCE40 boards (iCEBreaker, iCEstick, UPduino)
_ICE40_USB_IDS = {("0403", "6010"), ("0403", "6014")}


@dataclass(frozen=True)
class DetectedAccelerator:
    """One accelerator found on this machine: vendor, board model, and how it was found."""

    vendor: str
    model: str
    evidence: str


def _xilinx(root: Path) -> list[DetectedAccelerator]:
    found = []
    managers = sorted(glob.glob(str(root / "sys/class/fpga_manager/*")))
    nodes = sorted(glob.glob(str(root / "dev/xclmgmt*"))) + sorted(glob.glob(str(root / "dev/dri/renderD*")))
    board = _read(root / "proc/device-tree/model") or ""
    for manager in managers:
        model = "kria-kv260" if "kv260" in board.lower() else "zynqmp"
        found.append(DetectedAccelerator("xilinx", model, f"{manager} ({board.strip() or 'no board name'})"))
    if not managers and any("xclmgmt" in node for node in nodes):
        found.append(DetectedAccelerator("xilinx", "alveo", nodes[0]))
    return found


def _lattice(root: Path) -> list[DetectedAccelerator]:
    found = []
    for device in sorted(glob.glob(str(root / "sys/bus/usb/devices/*"))):
        ids = (_read(Path(device) / "idVendor"), _read(Path(device) / "idProduct"))
        if ids[0] and ids[1] and (ids[0].strip(), ids[1].strip()) in _ICE40_USB_IDS:
            product = (_read(Path(device) / "product") or "").strip().lower()
            model = "icebreaker" if "icebreaker" in product else "ice40-ftdi"
            found.append(DetectedAccelerator("lattice", model, f"USB {ids[0].strip()}:{ids[1].strip()} at {device}"))
    return found


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").rstrip("\x00")
    except OSError:
        return None


def detect_accelerators(root: Path = Path("/")) -> list[DetectedAccelerator]:
    """The accelerators this machine has (``root`` lets tests point at a prepared tree)."""
    override = os.environ.get("EDGEDEPLOY_ACCELERATORS")
    if override:
        return [DetectedAccelerator(str(item["vendor"]), str(item["model"]), "EDGEDEPLOY_ACCELERATORS")
                for item in json.loads(override)]
    found = _xilinx(root) + _lattice(root)
    if shutil.which("g++"):
        found.append(DetectedAccelerator("xilinx", "emulator", "g++ (bit-accurate C simulation)"))
    if shutil.which("verilator"):
        found.append(DetectedAccelerator("lattice", "verilator", "verilator (cycle-accurate simulation)"))
    return found


def _describe(item: dict[str, Any]) -> str:
    parts = [str(item.get("vendor", "?")), str(item.get("board") or item.get("model") or "?")]
    if item.get("part"):
        parts.append(f"part {item['part']}")
    if item.get("shell_version"):
        parts.append(f"shell {item['shell_version']}")
    return " ".join(parts)


def binding_problem(accelerator: dict[str, Any] | None, profile_accelerators: list[dict[str, Any]],
                    detected: list[DetectedAccelerator], simulated: bool = False) -> str | None:
    """Why a bundle's ``accelerator`` cannot run here, or None when it can.

    ``simulated`` accepts the simulator of the board (emulator/verilator) in place of the board:
    it is how the build machines and CI serve FPGA bundles.
    """
    if not accelerator:
        return None
    wanted = _describe(accelerator)
    board = accelerator.get("board")
    matches = [a for a in profile_accelerators
               if a.get("kind") == accelerator.get("kind") and a.get("vendor") == accelerator.get("vendor")
               and a.get("model") == board and a.get("part") == accelerator.get("part")]
    if not matches:
        have = "; ".join(_describe(a) for a in profile_accelerators) or "no accelerator"
        return f"the bundle is built for {wanted}, but this device's profile has {have}"
    shell = accelerator.get("shell_version")
    if shell and matches[0].get("shell_version") and matches[0]["shell_version"] != shell:
        return (f"the bundle needs shell {shell} on {board}, but this device's profile has shell "
                f"{matches[0]['shell_version']}")
    simulators = {"xilinx": "emulator", "lattice": "verilator"}
    accepted = {board, simulators.get(str(accelerator.get("vendor")))} if simulated or board == "emulator" \
        else {board}
    if not any(d.vendor == accelerator.get("vendor") and d.model in accepted for d in detected):
        seen = "; ".join(f"{d.vendor} {d.model} ({d.evidence})" for d in detected) or "none"
        return f"the bundle needs {wanted}, which this device does not have (detected: {seen})"
    return None


def check_binding(accelerator: dict[str, Any] | None, profile_accelerators: list[dict[str, Any]],
                  detected: list[DetectedAccelerator] | None = None, simulated: bool = False) -> None:
    """Raise DeploymentError (``refused: ...``) when the bundle's accelerator is not on this device."""
    problem = binding_problem(accelerator, profile_accelerators,
                              detect_accelerators() if detected is None else detected, simulated)
    if problem:
        raise DeploymentError(f"refused: {problem}")
