"""The ``hls4ml`` backend: an HLS firmware served through its bit-accurate C simulation (the FPGA emulator).

The servers see an ordinary model: the same inputs and outputs as the ONNX model it was compiled from.
The firmware computes the logits in fixed point; a Softmax the compiler left out of the firmware runs
here in float32 (``runtime.host_softmax``). On a board the same firmware is loaded by
:mod:`edge_agent.fpga.loaders` instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bundle import BundleManifest
from edge_agent.errors import BundleError
from edge_agent.fpga.csim import CSimModel
from edge_agent.fpga.postprocess import HostOutputs
from edge_agent.runtime.base import ModelInfo, TensorScoring, validate_inputs
from edge_agent.runtime.scoring import parse_score_body

__all__ = ["FirmwareModel", "fpga_cache_dir", "load", "softmax"]


def fpga_cache_dir(info: ModelInfo) -> Path:
    """Where compiled simulations are kept: ``EDGEDEPLOY_FPGA_CACHE``, the agent's workdir, or ~/.cache."""
    configured = os.environ.get("EDGEDEPLOY_FPGA_CACHE")
    if configured:
        return Path(configured)
    if info.workdir is not None:
        return Path(info.workdir) / "fpga-cache"
    return Path.home() / ".cache" / "edgedeploy" / "fpga"


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


class FirmwareModel(TensorScoring):
    """Named tensors in, the firmware's outputs (softmaxed, then labelled on the host when asked) out."""

    def __init__(self, simulation: Any, info: ModelInfo, host_softmax: bool, channels_last: bool = False) -> None:
        self.simulation = simulation
        self.info = info
        self.host_softmax = host_softmax
        self.channels_last = channels_last  # [N, C, H, W] requests, channels-last firmware
        if len(info.inputs) != 1:
            raise BundleError("an FPGA bundle has exactly one input tensor")
        self.host_outputs = HostOutputs.from_runtime(info.manifest.runtime, info.outputs)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.asarray(inputs[self.info.inputs[0].name])
        if self.channels_last and x.ndim == 4:
            x = x.transpose(0, 2, 3, 1)
        values = self.simulation.predict(x.reshape(len(x), -1))
        result = softmax(values) if self.host_softmax else values.astype(np.float32)
        return self.host_outputs.compute(result)

    def score(self, body: Any, content_type: str) -> Any:
        """As :meth:`TensorScoring.score`, with ZipMap outputs as onnxruntime's list of dicts."""
        named = parse_score_body(body, [spec.name for spec in self.info.inputs])
        return self.host_outputs.to_json(self.infer(validate_inputs(self.info.inputs, named)))

    def unload(self) -> None:
        self.simulation = None


def load(bundle_dir: Path, manifest: BundleManifest, info: ModelInfo) -> FirmwareModel:
    """Build (or reuse) the C simulation of the bundle's firmware."""
    project = bundle_dir / str(manifest.runtime.get("firmware", "accelerator/firmware"))
    if not project.is_dir():
        raise BundleError(f"the bundle has no firmware folder at {project.relative_to(bundle_dir)}")
    sizes = manifest.runtime.get("io") or {}
    simulation = CSimModel.build(project, fpga_cache_dir(info), int(sizes["inputs"]), int(sizes["outputs"]))
    info.details["accelerator"] = "fpga emulator (hls4ml C simulation, bit-accurate)"
    return FirmwareModel(simulation, info, bool(manifest.runtime.get("host_softmax")),
                         manifest.runtime.get("layout") == "channels_last")
