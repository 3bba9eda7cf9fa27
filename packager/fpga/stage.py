"""The packaging stage for FPGA profiles: compile, describe the accelerator, and list the artifacts.

The packager calls :func:`compile_for_profile` instead of the onnxruntime stages when a profile's
backend is ``hls4ml`` or ``ice40``. The source ONNX model stays in the bundle (``model/model.onnx``);
the firmware or the RTL and bitstream go under ``accelerator/``, hashed and signed with everything
else, and the manifest's ``accelerator`` section names the board, the part, the shell and the
digest of the artifact, so neither the model nor the hardware image can be swapped alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bundle import tree_sha256
from edge_agent.errors import PackagingError, UsageError
from edge_agent.fpga.postprocess import HostOutputs
from edge_agent.profiles import DeviceProfile
from edge_agent.tensors import TensorSpec, onnx_type_to_v2

__all__ = ["FPGA_BACKENDS", "AcceleratorStage", "compile_for_profile", "input_specs"]

FPGA_BACKENDS = ("hls4ml", "ice40")


@dataclass
class AcceleratorStage:
    """What the stage adds to a bundle."""

    payload: dict[str, Path] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    accelerator: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    outputs: list[TensorSpec] = field(default_factory=list)  # as served: the host computes them (host_outputs)


def input_specs(model: Path) -> list[TensorSpec]:
    """The model's inputs as v2 tensor specs (its outputs may be a ZipMap, which no tensor spec describes)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return [TensorSpec(arg.name, onnx_type_to_v2(arg.type), tuple(d if isinstance(d, int) else -1
                                                                 for d in (arg.shape or [])))
            for arg in session.get_inputs()]


def _board(profile: DeviceProfile) -> dict[str, Any]:
    boards = [a for a in profile.document.get("accelerators", []) if a.get("kind") == "fpga"]
    if not boards:
        raise UsageError(f"profile {profile.name} names no FPGA accelerator")
    board = boards[0]
    return {"kind": "fpga", "vendor": board["vendor"], "board": board["model"], "part": board.get("part"),
            "shell_version": board.get("shell_version")}


def _files(root: Path, prefix: str) -> dict[str, Path]:
    return {f"{prefix}/{p.relative_to(root).as_posix()}": p for p in sorted(root.rglob("*")) if p.is_file()}


def compile_for_profile(model: Path, profile: DeviceProfile, calibration: np.ndarray | None, scratch: Path,
                        labels: tuple[np.ndarray, np.ndarray] | None = None) -> AcceleratorStage:
    """Compile ``model`` for the profile's FPGA; ``labels`` (x, y) adds held-out accuracy to the report."""
    if calibration is None:
        raise UsageError(f"packaging for {profile.name} needs --calibration FILE.npz: the precision search and "
                         "the int8 scales are chosen on it")
    from packager.fpga.lower import lower_model

    host = lower_model(model).host_outputs
    if profile.backend == "hls4ml":
        stage = _hls(model, profile, calibration, scratch, labels, host)
    elif profile.backend == "ice40":
        stage = _ice40(model, profile, calibration, scratch, labels, host)
    else:
        raise PackagingError(f"profile {profile.name}: no FPGA compiler for backend {profile.backend!r}")
    stage.runtime["host_outputs"] = host.to_list()
    return stage


def _classes(host: HostOutputs, width: int) -> np.ndarray:
    """What an argmax index means: the label's class, or the index itself for a model without a label."""
    labels = [output for output in host.outputs if output.kind == "label"]
    return np.asarray(labels[0].classes if labels else range(width))


def _held_out(fixed: Any, fp32: Any, labels: tuple[np.ndarray, np.ndarray] | None,
              host: HostOutputs) -> dict[str, float | None]:
    """Accuracy (label against the validation set's) and agreement with fp32, of the hardware's logits."""
    if labels is None:
        return {"accuracy_fixed": None, "accuracy_fp32": None}
    x, y = labels
    ours, theirs = np.asarray(fixed(x), dtype=np.float64), np.asarray(fp32(x), dtype=np.float64)
    classes = _classes(host, ours.shape[1])
    return {"accuracy_fixed": float((classes[ours.argmax(axis=1)] == y).mean()),
            "accuracy_fp32": float((classes[theirs.argmax(axis=1)] == y).mean()),
            "validation_agreement_top1": float((ours.argmax(axis=1) == theirs.argmax(axis=1)).mean()),
            "validation_max_abs_error": float(np.abs(ours - theirs).max())}


def _hls(model: Path, profile: DeviceProfile, calibration: np.ndarray, scratch: Path,
         labels: tuple[np.ndarray, np.ndarray] | None, host: HostOutputs) -> AcceleratorStage:
    from packager.fpga.fixed import FirmwareReference
    from packager.fpga.hls import compile_hls, firmware_layout, float_forward

    board = _board(profile)
    build = compile_hls(model, calibration, scratch / "firmware", part=str(board["part"]))
    report = build.report(build.layer_names)
    reference = FirmwareReference(build.project)
    report.update(_held_out(lambda x: reference.predict(firmware_layout(x)),
                            lambda x: float_forward(build.layers, x)[0], labels, host))
    accelerator = {**board, "backend": "hls4ml", "firmware": "accelerator/firmware",
                   "firmware_sha256": tree_sha256(build.project), "precision": report["precision"]}
    runtime = {"backend": "hls4ml", "model_path": "model/model.onnx", "precision": "fixed",
               "firmware": "accelerator/firmware", "host_softmax": build.host_softmax,
               "layout": "channels_last" if build.channels_last else "flat",
               "io": {"inputs": build.inputs, "outputs": build.outputs},
               "execution_providers": ["CPUExecutionProvider"]}
    return AcceleratorStage(_files(build.project, "accelerator/firmware"), runtime, accelerator, report,
                            host.specs(build.outputs))


def _ice40(model: Path, profile: DeviceProfile, calibration: np.ndarray, scratch: Path,
           labels: tuple[np.ndarray, np.ndarray] | None, host: HostOutputs) -> AcceleratorStage:
    from packager.fpga.ice40 import build_bitstream, generate_verilog
    from packager.fpga.int8 import quantize_mlp

    board = _board(profile)
    qmodel = quantize_mlp(model, calibration)
    rtl = scratch / "rtl"
    generate_verilog(qmodel, rtl)
    bitstream = build_bitstream(rtl, scratch / "bitstream")
    report = {"toolchain": bitstream.toolchain, "quantization": qmodel.describe(), "resources": bitstream.resources,
              "fmax_mhz": bitstream.fmax_mhz, "cycles_per_inference": qmodel.cycles,
              "inferences_per_second_at_fmax": bitstream.fmax_mhz * 1e6 / qmodel.cycles,
              "agreement_top1": float((qmodel.predict(calibration).argmax(1) == qmodel.float_logits(calibration)
                                       .argmax(1)).mean())}
    held_out = _held_out(qmodel.predict, qmodel.float_logits, labels, host)
    report["accuracy_int8"] = held_out.pop("accuracy_fixed")
    report.update(held_out)
    payload = _files(rtl, "accelerator/rtl")
    payload["accelerator/ice40.bin"] = bitstream.path
    accelerator = {**board, "backend": "ice40", "rtl": "accelerator/rtl", "bitstream": "accelerator/ice40.bin",
                   "bitstream_sha256": bitstream.sha256, "rtl_sha256": tree_sha256(rtl),
                   "resources": bitstream.resources, "fmax_mhz": bitstream.fmax_mhz}
    runtime = {"backend": "ice40", "model_path": "model/model.onnx", "precision": "int8", "rtl": "accelerator/rtl",
               "bitstream": "accelerator/ice40.bin", "host_softmax": qmodel.host_softmax,
               "quantization": qmodel.runtime_params(), "execution_providers": ["CPUExecutionProvider"]}
    return AcceleratorStage(payload, runtime, accelerator, report, host.specs(qmodel.outputs))
