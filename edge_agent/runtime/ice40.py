"""The ``ice40`` backend: our int8 MLP design, on an iCE40 board or in its cycle-accurate simulation.

Inputs are quantized here with the bundle's input scale, the design computes int32 outputs, and
they are scaled back to logits (and softmaxed when the model ended with a Softmax) here. With
``EDGEDEPLOY_ICE40_PORT`` set (the board's serial port) the bitstream is programmed with iceprog and
requests go to the board; otherwise the same Verilog answers through verilator.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bundle import BundleManifest
from edge_agent.errors import BundleError
from edge_agent.fpga.verilator_sim import VerilatorModel
from edge_agent.runtime.base import ModelInfo
from edge_agent.runtime.hls import FirmwareModel, fpga_cache_dir

__all__ = ["Int8Design", "load"]


class Int8Design:
    """Float inputs in, float logits out, through the int8 design (simulated or on the board)."""

    def __init__(self, engine: Any, input_scale: float, output_scale: float) -> None:
        self.engine, self.input_scale, self.output_scale = engine, input_scale, output_scale

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Round half up and clamp, as the packager's reference does."""
        return np.clip(np.floor(np.asarray(x, dtype=np.float64) / self.input_scale + 0.5), -128, 127).astype(np.int8)

    def predict(self, x: np.ndarray) -> np.ndarray:
        if hasattr(self.engine, "predict_int8"):
            acc, _cycles = self.engine.predict_int8(self.quantize(x))
        else:
            acc = self.engine.infer(self.quantize(x))
        return np.asarray(acc, dtype=np.float64) * self.output_scale


def _board(bitstream: Path, inputs: int, outputs: int) -> Any:
    from edge_agent.fpga.loaders import Ice40Loader

    board = Ice40Loader(bitstream, os.environ["EDGEDEPLOY_ICE40_PORT"], inputs, outputs)
    board.program()
    return board


def load(bundle_dir: Path, manifest: BundleManifest, info: ModelInfo) -> FirmwareModel:
    """The board when one is configured, else the verilator model of the bundle's RTL."""
    params = manifest.runtime.get("quantization") or {}
    try:
        inputs, outputs = int(params["inputs"]), int(params["outputs"])
        input_scale, output_scale = float(params["input_scale"]), float(params["output_scale"])
    except (KeyError, TypeError, ValueError):
        raise BundleError("the bundle's runtime.quantization lacks inputs, outputs or scales") from None
    if os.environ.get("EDGEDEPLOY_ICE40_PORT"):
        engine = _board(bundle_dir / str(manifest.runtime["bitstream"]), inputs, outputs)
        info.details["accelerator"] = f"iCE40 board on {os.environ['EDGEDEPLOY_ICE40_PORT']}"
    else:
        engine = VerilatorModel.build(bundle_dir / str(manifest.runtime.get("rtl", "accelerator/rtl")),
                                      fpga_cache_dir(info))
        info.details["accelerator"] = "iCE40 design in verilator (cycle-accurate)"
    return FirmwareModel(Int8Design(engine, input_scale, output_scale), info,
                         bool(manifest.runtime.get("host_softmax")))
