"""The HLS target: an ONNX model to an hls4ml firmware project, with a per-layer precision search.

1. :func:`~packager.fpga.lower.lower_onnx` checks the operators and gives the layer chain.
2. The search picks, per layer, the narrowest ``ap_fixed`` type that keeps at least
   ``target_agreement`` top-1 agreement with fp32 (or a max absolute error) on the calibration set:
   first for the inputs, then each layer's weights, then each hidden activation, the others held
   where they are. Candidates are scored with an exact integer model of the firmware (products and
   sums exact, as hls4ml's inferred accumulators are; inputs, weights and activations truncated and
   wrapped to the candidate types), so no C++ is compiled per candidate.
3. hls4ml (Vitis backend, ``io_parallel``, latency strategy) writes the firmware project with those
   types; :class:`~packager.fpga.fixed.FirmwareReference` reads the written project back and its
   agreement with fp32 is reported, so the numbers are those of the firmware, not of the search.

A trailing Softmax is left out of the firmware and applied on the host in float32: hls4ml's softmax
is a lookup-table approximation, and the argmax does not need it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from packager.errors import PackagingError
from packager.fpga.fixed import FirmwareReference, FixedType, to_fixed
from packager.fpga.lower import Dense, Layer, Relu, Softmax, lower_onnx

__all__ = ["HLS_WIDTHS", "HlsBuild", "HlsPrecision", "compile_hls", "float_forward"]

log = logging.getLogger(__name__)

#: total widths tried, widest first (integer bits come from the data's range)
HLS_WIDTHS = (18, 16, 14, 12, 10, 8, 6, 4)
_PROJECT = "myproject"


@dataclass
class HlsPrecision:
    """The chosen types: inputs, weights and biases, and the activation of each hidden layer.

    hls4ml's ONNX front end gives every layer's weights the model's default type, so the weight type is
    searched once for all layers (``weights`` repeats it per layer); activations are per layer.
    """

    input: FixedType
    weights: list[FixedType]
    activations: list[FixedType]

    def to_dict(self, dense_names: list[str]) -> dict[str, Any]:
        layers = {name: {"weight": str(w), "bias": str(w)} for name, w in zip(dense_names, self.weights, strict=True)}
        for name, act in zip(dense_names, self.activations, strict=False):
            layers[name]["result"] = str(act)
        return {"input": str(self.input), "layers": layers, "accumulators": "hls4ml auto (lossless)"}


@dataclass
class HlsBuild:
    """A written firmware project and what the packaging report says about it."""

    project: Path
    precision: HlsPrecision
    inputs: int
    outputs: int
    host_softmax: bool
    agreement: float
    max_abs_error: float
    trials: list[dict[str, Any]] = field(default_factory=list)
    estimate: dict[str, Any] = field(default_factory=dict)
    hls4ml_version: str = ""

    def report(self, dense_names: list[str]) -> dict[str, Any]:
        """The ``accelerator`` part of the packaging report."""
        return {"toolchain": f"hls4ml {self.hls4ml_version} (Vitis backend, io_parallel, latency)",
                "precision": self.precision.to_dict(dense_names), "agreement_top1": self.agreement,
                "max_abs_error": self.max_abs_error, "search": self.trials, "estimate": self.estimate,
                "host_softmax": self.host_softmax}


def _dense_chain(layers: list[Layer]) -> tuple[list[Dense], bool]:
    """The dense layers of an MLP (ReLU between them, an optional final Softmax)."""
    host_softmax = bool(layers) and isinstance(layers[-1], Softmax)
    body = layers[:-1] if host_softmax else layers
    dense = [layer for layer in body if isinstance(layer, Dense)]
    expected: list[type] = []
    for index in range(len(dense)):
        expected += [Dense] + ([Relu] if index < len(dense) - 1 else [])
    if [type(layer) for layer in body] != expected:
        shape = " > ".join(type(layer).__name__ for layer in layers)
        raise PackagingError(f"the HLS target builds dense chains (Dense > ReLU > ... > Dense [> Softmax]); "
                             f"this model is {shape}")
    return dense, host_softmax


def float_forward(dense: list[Dense], x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """fp32 logits and the hidden activations (after ReLU)."""
    hidden = []
    values = np.asarray(x, dtype=np.float32)
    for index, layer in enumerate(dense):
        values = values @ layer.weight + layer.bias
        if index < len(dense) - 1:
            values = np.maximum(values, 0)
            hidden.append(values)
    return values, hidden


def _integer_bits(peak: float) -> int:
    """Integer bits (sign included) that hold values up to ``peak`` in magnitude."""
    return max(1, math.floor(math.log2(peak)) + 2) if peak > 0 else 1


def _kind(width: int, peak: float) -> FixedType:
    return FixedType(width, min(width, _integer_bits(peak)))


def _exact_forward(dense: list[Dense], precision: HlsPrecision, x: np.ndarray) -> np.ndarray:
    """The firmware's arithmetic with lossless accumulators, as floats (for scoring candidates)."""
    values = to_fixed(x, precision.input).astype(np.float64) / 2.0 ** precision.input.fraction
    for index, layer in enumerate(dense):
        kind = precision.weights[index]
        weight = to_fixed(layer.weight, kind) / 2.0 ** kind.fraction
        bias = to_fixed(layer.bias, kind) / 2.0 ** kind.fraction
        values = values @ weight + bias
        if index < len(dense) - 1:
            act = precision.activations[index]
            values = to_fixed(np.maximum(values, 0), act) / 2.0 ** act.fraction
    return values


def _score(candidate: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    agreement = float((candidate.argmax(axis=1) == reference.argmax(axis=1)).mean())
    return agreement, float(np.abs(candidate - reference).max())


def _search(dense: list[Dense], x: np.ndarray, target: float, max_error: float | None,
            widths: tuple[int, ...]) -> tuple[HlsPrecision, list[dict[str, Any]]]:
    reference, hidden = float_forward(dense, x)
    peaks = {"input": float(np.abs(x).max())}
    peaks["weights"] = float(max(max(np.abs(d.weight).max(), np.abs(d.bias).max()) for d in dense))
    peaks.update({f"activation[{i}]": float(h.max()) for i, h in enumerate(hidden)})
    chosen = {knob: widths[0] for knob in peaks}

    def precision_of(widths_now: dict[str, int]) -> HlsPrecision:
        return HlsPrecision(
            _kind(widths_now["input"], peaks["input"]),
            [_kind(widths_now["weights"], peaks["weights"])] * len(dense),
            [_kind(widths_now[f"activation[{i}]"], peaks[f"activation[{i}]"]) for i in range(len(hidden))])

    def good(agreement: float, error: float) -> bool:
        return error <= max_error if max_error is not None else agreement >= target

    trials: list[dict[str, Any]] = []
    for knob in peaks:
        for width in widths:
            trial = dict(chosen, **{knob: width})
            agreement, error = _score(_exact_forward(dense, precision_of(trial), x), reference)
            ok = good(agreement, error)
            trials.append({"knob": knob, "type": str(_kind(width, peaks[knob])), "agreement_top1": agreement,
                           "max_abs_error": error, "kept": ok})
            if not ok:
                break
            chosen = trial
    final = precision_of(chosen)
    agreement, error = _score(_exact_forward(dense, final, x), reference)
    if not good(agreement, error):
        goal = f"max abs error {max_error}" if max_error is not None else f"{target:.0%} top-1 agreement"
        raise PackagingError(f"no precision up to {widths[0]} bits reaches {goal} with fp32 "
                             f"(best: {agreement:.1%}, max error {error:.3g})")
    return final, trials


def _chain_onnx(dense: list[Dense], path: Path) -> None:
    """The dense chain as a plain ONNX graph (Gemm > Relu > ... > Gemm) for hls4ml's front end."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, current = [], [], "input"
    for index, layer in enumerate(dense):
        inits += [numpy_helper.from_array(np.ascontiguousarray(layer.weight.T), f"W{index}"),
                  numpy_helper.from_array(layer.bias, f"b{index}")]
        nodes.append(helper.make_node("Gemm", [current, f"W{index}", f"b{index}"], [f"g{index}"], transB=1))
        current = f"g{index}"
        if index < len(dense) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"r{index}"]))
            current = f"r{index}"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, dense[0].weight.shape[0]])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [None, dense[-1].weight.shape[1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _write_project(chain: Path, precision: HlsPrecision, out_dir: Path, part: str) -> str:
    """hls4ml writes the project with the chosen types; returns hls4ml's version."""
    try:
        import hls4ml
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.transformation.gemm_to_matmul import GemmToMatMul
        from qonnx.util.cleanup import cleanup_model
    except ImportError as exc:
        raise PackagingError("the HLS target needs hls4ml and qonnx: pip install 'edgedeploy[fpga]'") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = cleanup_model(cleanup_model(ModelWrapper(str(chain))).transform(GemmToMatMul()))
        config = hls4ml.utils.config_from_onnx_model(wrapped, granularity="name", backend="Vitis",
                                                     default_precision="ap_fixed<16,6>")
        config["Model"]["Precision"]["default"] = str(precision.weights[0])
        names = config["LayerName"]
        names["global_in"]["Precision"]["result"] = str(precision.input)
        for index, act in enumerate(precision.activations):
            names[f"Relu_{index}"]["Precision"]["result"] = str(act)
        for index, kind in enumerate(precision.weights):
            for param in (f"MatMul_{index}_param0", f"Add_{index}_param0"):
                if param in names:
                    names[param]["Precision"]["result"] = str(kind)
        model = hls4ml.converters.convert_from_onnx_model(
            wrapped, output_dir=str(out_dir), project_name=_PROJECT, backend="Vitis", io_type="io_parallel",
            hls_config=config, part=part)
        model.write()
    return str(hls4ml.__version__)


def _relocatable(project: Path) -> None:
    """No absolute path of this machine may stay in the project (bundles are unpacked elsewhere)."""
    for path in project.rglob("*"):
        if not path.is_file() or path.suffix in (".so", ".o"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if str(project) in text:
            path.write_text(text.replace(str(project), "."), encoding="utf-8")
    for leftover in list(project.rglob("*.so")) + list(project.rglob("*.o")):
        leftover.unlink()


def _estimate(dense: list[Dense], precision: HlsPrecision) -> dict[str, Any]:
    """Our analytical estimate for reuse factor 1 (hls4ml gives none without the vendor tools)."""
    multipliers, dsp, lut_mults = 0, 0, 0
    widths = [precision.input.width, *[a.width for a in precision.activations]]
    for index, layer in enumerate(dense):
        count = int(np.count_nonzero(to_fixed(layer.weight, precision.weights[index])))
        multipliers += count
        # DSP58/48 slices take multiplications wider than ~10x10 bits; narrower ones map to LUTs
        if min(widths[index], precision.weights[index].width) > 10:
            dsp += count
        else:
            lut_mults += count * widths[index] * precision.weights[index].width // 2
    latency = sum(math.ceil(math.log2(layer.weight.shape[0])) + 3 for layer in dense)
    return {"source": "edgedeploy analytical estimate (reuse factor 1, io_parallel); run the vendor build "
                      "script for synthesis numbers", "multipliers": multipliers, "dsp": dsp,
            "lut_for_multipliers": lut_mults, "latency_cycles": latency,
            "weight_bits": sum(d.weight.size * w.width for d, w in zip(dense, precision.weights, strict=True))}


def compile_hls(model: Path, calibration: np.ndarray, out_dir: Path, *, part: str, target_agreement: float = 0.99,
                max_error: float | None = None, widths: tuple[int, ...] = HLS_WIDTHS) -> HlsBuild:
    """Search the precisions, write the firmware project into ``out_dir`` and measure it."""
    dense, host_softmax = _dense_chain(lower_onnx(model))
    x = np.asarray(calibration, dtype=np.float32).reshape(len(calibration), -1)
    if x.shape[1] != dense[0].weight.shape[0]:
        raise PackagingError(f"the calibration set has {x.shape[1]} features; the model takes "
                             f"{dense[0].weight.shape[0]}")
    precision, trials = _search(dense, x, target_agreement, max_error, widths)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    with tempfile.TemporaryDirectory(prefix="edgedeploy-hls-") as tmp:
        chain = Path(tmp) / "chain.onnx"
        _chain_onnx(dense, chain)
        version = _write_project(chain, precision, out_dir, part)
    _relocatable(out_dir)
    reference, _hidden = float_forward(dense, x)
    firmware = FirmwareReference(out_dir).predict(x)
    agreement, error = _score(firmware, reference)
    build = HlsBuild(out_dir, precision, dense[0].weight.shape[0], dense[-1].weight.shape[1], host_softmax,
                     agreement, error, trials, _estimate(dense, precision), version)
    (out_dir / "precision.json").write_text(json.dumps(build.report([d.name for d in dense]), indent=2,
                                                       sort_keys=True) + "\n")
    log.info("HLS firmware for %s: %s, %.1f%% top-1 agreement with fp32", model, precision.input, agreement * 100)
    return build
