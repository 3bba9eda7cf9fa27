"""The HLS target: an ONNX model to an hls4ml firmware project, with a per-layer precision search.

1. :func:`~packager.fpga.lower.lower_onnx` checks the operators and gives the layer chain.
2. The search picks, per layer, the narrowest ``ap_fixed`` type that keeps at least
   ``target_agreement`` top-1 agreement with fp32 (or a max absolute error) on the calibration set:
   first for the inputs, then each layer's weights, then each hidden activation, the others held
   where they are. Candidates are scored with an exact model of the firmware (products and sums
   exact, as hls4ml's inferred accumulators are; inputs and activations truncated and wrapped to the
   candidate types; weights as hls4ml writes them, rounded to the type's decimals, then truncated), so
   no C++ is compiled per candidate.
3. hls4ml (Vitis backend, ``io_parallel``, latency strategy) writes the firmware project with those
   types; :class:`~packager.fpga.fixed.FirmwareReference` reads the written project back and its
   agreement with fp32 is reported, so the numbers are those of the firmware, not of the search.

A trailing Softmax is left out of the firmware and applied on the host in float32: hls4ml's softmax
is a lookup-table approximation, and the argmax does not need it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import PackagingError
from edge_agent.home import edgedeploy_home
from packager.fpga.fixed import FirmwareReference, FixedType, to_fixed, to_fixed_as_written
from packager.fpga.lower import Conv2D, Dense, Flatten, Layer, MaxPool2D, Relu, Softmax, lower_onnx

__all__ = ["HLS_WIDTHS", "HlsBuild", "HlsPrecision", "compile_hls", "firmware_layout", "float_forward"]

log = logging.getLogger(__name__)

#: total widths tried, widest first (integer bits come from the data's range)
HLS_WIDTHS = (18, 16, 14, 12, 10, 8, 6, 4)
_PROJECT = "myproject"


@dataclass
class HlsPrecision:
    """The chosen types: the inputs, each weighted layer's weights and bias, each hidden activation.

    ``weights[i]`` is the type of the i-th Dense/Conv2D layer's weights and bias (searched per layer);
    ``activations[i]`` that of the i-th ReLU's output. Accumulators and the pre-activation results are
    hls4ml's ``auto`` types, wide enough for the exact sum; :attr:`firmware_types` records them as written.
    """

    input: FixedType
    weights: list[FixedType]
    activations: list[FixedType]
    firmware_types: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self, layer_names: list[str]) -> dict[str, Any]:
        """Per layer: weight, bias, accum and result types (as written in the firmware) and the ReLU after it."""
        written = self.firmware_types if len(self.firmware_types) == len(layer_names) else [{}] * len(layer_names)
        layers: dict[str, dict[str, str]] = {}
        for index, (name, kind, types) in enumerate(zip(layer_names, self.weights, written, strict=True)):
            layers[name] = {"weight": str(kind), "bias": str(kind), **types}
            if index < len(self.activations):
                layers[name]["activation_after"] = str(self.activations[index])
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
    channels_last: bool = False
    layers: list[Layer] = field(default_factory=list)  # the chain the firmware runs (no final Softmax)
    csim_confirmed: bool = False  # the g++ C simulation gave the reference's outputs bit for bit

    @property
    def layer_names(self) -> list[str]:
        """Names of the layers with weights, as the report lists them."""
        return [layer.name for layer in _weighted(self.layers)]

    def report(self, dense_names: list[str]) -> dict[str, Any]:
        """The ``accelerator`` part of the packaging report."""
        return {"toolchain": f"hls4ml {self.hls4ml_version} (Vitis backend, io_parallel, latency)",
                "precision": self.precision.to_dict(dense_names), "agreement_top1": self.agreement,
                "max_abs_error": self.max_abs_error, "search": self.trials, "estimate": self.estimate,
                "host_softmax": self.host_softmax, "csim_confirmed": self.csim_confirmed}


_CHAIN = (Dense, Conv2D, Relu, MaxPool2D, Flatten)


def _chain(layers: list[Layer]) -> tuple[list[Layer], bool]:
    """The layers the firmware runs (a final Softmax goes to the host) and whether there was one."""
    host_softmax = bool(layers) and isinstance(layers[-1], Softmax)
    body = layers[:-1] if host_softmax else layers
    shape = " > ".join(type(layer).__name__ for layer in layers)
    if not body or not isinstance(body[-1], Dense) or any(not isinstance(layer, _CHAIN) for layer in body):
        raise PackagingError(f"the HLS target builds feed-forward chains of Conv2D, ReLU, MaxPool2D, Flatten and "
                             f"Dense ending in Dense [> Softmax]; this model is {shape}")
    return body, host_softmax


def _weighted(body: list[Layer]) -> list[Dense | Conv2D]:
    return [layer for layer in body if isinstance(layer, Dense | Conv2D)]


def _conv_nchw(x: np.ndarray, layer: Conv2D, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    top, left, bottom, right = layer.pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    out_c, _in_c, kh, kw = weight.shape
    sh, sw = layer.strides
    oh, ow = (padded.shape[2] - kh) // sh + 1, (padded.shape[3] - kw) // sw + 1
    out = np.zeros((len(x), out_c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            window = padded[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
            out[:, :, i, j] = np.tensordot(window, weight, axes=([1, 2, 3], [1, 2, 3]))
    return out + bias[None, :, None, None]


def _max_pool_nchw(x: np.ndarray, layer: MaxPool2D) -> np.ndarray:
    (kh, kw), (sh, sw) = layer.kernel, layer.stride
    oh, ow = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    out = np.zeros((len(x), x.shape[1], oh, ow))
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = x[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw].max(axis=(2, 3))
    return out


def _forward(body: Sequence[Layer], x: np.ndarray,
             precision: HlsPrecision | None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits and the ReLU outputs; with ``precision``, inputs, weights and activations take its types."""
    def q(values: np.ndarray, kind: FixedType | None, written: bool = False) -> np.ndarray:
        if kind is None:
            return values
        return (to_fixed_as_written(values, kind) if written else to_fixed(values, kind)) / 2.0 ** kind.fraction

    values = q(np.asarray(x, dtype=np.float64), precision.input if precision else None)
    hidden: list[np.ndarray] = []
    weighted = 0
    for layer in body:
        if isinstance(layer, Dense | Conv2D):
            kind = precision.weights[weighted] if precision else None
            weighted += 1
            # weights reach the firmware through hls4ml's text files, rounded to the type's decimals
            weight, bias = q(layer.weight, kind, written=True), q(layer.bias, kind, written=True)
            values = values @ weight + bias if isinstance(layer, Dense) else _conv_nchw(values, layer, weight, bias)
        elif isinstance(layer, Relu):
            values = np.maximum(values, 0)
            if precision is not None:
                values = q(values, precision.activations[len(hidden)])
            hidden.append(values)
        elif isinstance(layer, MaxPool2D):
            values = _max_pool_nchw(values, layer)
        else:
            values = values.reshape(len(values), -1)
    return values, hidden


def float_forward(layers: Sequence[Layer], x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """fp32 logits and the hidden activations (after each ReLU) of a chain."""
    return _forward(layers, x, None)


def _integer_bits(peak: float) -> int:
    """Integer bits (sign included) that hold values up to ``peak`` in magnitude."""
    return max(1, math.floor(math.log2(peak)) + 2) if peak > 0 else 1


def _kind(width: int, peak: float) -> FixedType:
    return FixedType(width, min(width, _integer_bits(peak)))


def _exact_forward(body: list[Layer], precision: HlsPrecision, x: np.ndarray) -> np.ndarray:
    """The firmware's arithmetic with lossless accumulators, as floats (for scoring candidates)."""
    return _forward(body, x, precision)[0]


def _score(candidate: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    agreement = float((candidate.argmax(axis=1) == reference.argmax(axis=1)).mean())
    return agreement, float(np.abs(candidate - reference).max())


def _search(body: list[Layer], x: np.ndarray, target: float, max_error: float | None,
            widths: tuple[int, ...]) -> tuple[HlsPrecision, list[dict[str, Any]]]:
    reference, hidden = float_forward(body, x)
    weighted = _weighted(body)
    # knobs in the order they are narrowed: inputs, each layer's weights, each hidden activation
    peaks = {"input": float(np.abs(x).max())}
    peaks.update({f"weights[{layer.name}]": float(max(np.abs(layer.weight).max(), np.abs(layer.bias).max()))
                  for layer in weighted})
    peaks.update({f"activation[{i}]": float(h.max()) for i, h in enumerate(hidden)})
    chosen = {knob: widths[0] for knob in peaks}

    def precision_of(widths_now: dict[str, int]) -> HlsPrecision:
        return HlsPrecision(
            _kind(widths_now["input"], peaks["input"]),
            [_kind(widths_now[f"weights[{layer.name}]"], peaks[f"weights[{layer.name}]"]) for layer in weighted],
            [_kind(widths_now[f"activation[{i}]"], peaks[f"activation[{i}]"]) for i in range(len(hidden))])

    def good(agreement: float, error: float) -> bool:
        return error <= max_error if max_error is not None else agreement >= target

    trials: list[dict[str, Any]] = []
    for knob in peaks:
        for width in widths:
            trial = dict(chosen, **{knob: width})
            agreement, error = _score(_exact_forward(body, precision_of(trial), x), reference)
            ok = good(agreement, error)
            trials.append({"knob": knob, "type": str(_kind(width, peaks[knob])), "agreement_top1": agreement,
                           "max_abs_error": error, "kept": ok})
            if not ok:
                break
            chosen = trial
    final = precision_of(chosen)
    agreement, error = _score(_exact_forward(body, final, x), reference)
    if not good(agreement, error):
        goal = f"max abs error {max_error}" if max_error is not None else f"{target:.0%} top-1 agreement"
        raise PackagingError(f"no precision up to {widths[0]} bits reaches {goal} with fp32 "
                             f"(best: {agreement:.1%}, max error {error:.3g})")
    return final, trials


def _chain_onnx(body: list[Layer], input_shape: tuple[int, ...], path: Path) -> None:
    """The chain as a plain ONNX graph with every attribute spelled out, for hls4ml's front end."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, current = [], [], "input"
    for index, layer in enumerate(body):
        out = f"t{index}"
        if isinstance(layer, Dense):
            inits += [numpy_helper.from_array(np.ascontiguousarray(layer.weight.T), f"W{index}"),
                      numpy_helper.from_array(layer.bias, f"b{index}")]
            nodes.append(helper.make_node("Gemm", [current, f"W{index}", f"b{index}"], [out], transB=1))
        elif isinstance(layer, Conv2D):
            inits += [numpy_helper.from_array(layer.weight, f"W{index}"),
                      numpy_helper.from_array(layer.bias, f"b{index}")]
            nodes.append(helper.make_node("Conv", [current, f"W{index}", f"b{index}"], [out],
                                          kernel_shape=list(layer.weight.shape[2:]), strides=list(layer.strides),
                                          pads=list(layer.pads), dilations=[1, 1], group=1))
        elif isinstance(layer, MaxPool2D):
            nodes.append(helper.make_node("MaxPool", [current], [out], kernel_shape=list(layer.kernel),
                                          strides=list(layer.stride), pads=[0, 0, 0, 0]))
        elif isinstance(layer, Relu):
            nodes.append(helper.make_node("Relu", [current], [out]))
        else:
            nodes.append(helper.make_node("Flatten", [current], [out], axis=1))
        current = out
    last = body[-1]
    assert isinstance(last, Dense)
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, *input_shape])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [None, last.weight.shape[1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _write_project(chain: Path, precision: HlsPrecision, out_dir: Path, part: str, channels_last: bool) -> str:
    """hls4ml writes the project with the chosen types; returns hls4ml's version."""
    try:
        import hls4ml
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.transformation.gemm_to_matmul import GemmToMatMul
        from qonnx.util.cleanup import cleanup_model
    except ImportError as exc:
        raise PackagingError("the HLS target needs hls4ml and qonnx: pip install 'edgedeploy[fpga]'") from exc
    chatter = io.StringIO()  # hls4ml prints its topology to stdout: keep it for the debug log, off the CLI
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")
        wrapped = cleanup_model(ModelWrapper(str(chain)))
        if channels_last:
            from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean

            wrapped = wrapped.transform(ConvertToChannelsLastAndClean())
        wrapped = cleanup_model(wrapped.transform(GemmToMatMul()))
        config = hls4ml.utils.config_from_onnx_model(wrapped, granularity="name", backend="Vitis",
                                                     default_precision="ap_fixed<16,6>")
        names = config["LayerName"]
        names["global_in"]["Precision"]["result"] = str(precision.input)
        for index, act in enumerate(precision.activations):
            names[f"Relu_{index}"]["Precision"]["result"] = str(act)
            if f"MaxPool_{index}" in names:  # a max keeps its input's values: keep their type
                names[f"MaxPool_{index}"]["Precision"]["result"] = str(act)
        _set_weight_types(names, precision.weights)
        model = hls4ml.converters.convert_from_onnx_model(
            wrapped, output_dir=str(out_dir), project_name=_PROJECT, backend="Vitis", io_type="io_parallel",
            hls_config=config, part=part)
        model.write()
    log.debug("hls4ml: %s", chatter.getvalue())
    return str(hls4ml.__version__)


def _set_weight_types(names: dict[str, Any], kinds: list[FixedType]) -> None:
    """Each weighted layer's weight and bias types, on the layer itself: hls4ml reads them there when it
    folds ``MatMul`` + ``Add`` into a Dense (or a Conv's bias), not on the constant nodes."""
    matmuls = sorted((k for k in names if re.fullmatch(r"MatMul_\d+", k)), key=lambda k: int(k.split("_")[1]))
    convs = sorted((k for k in names if re.fullmatch(r"Conv_\d+", k)), key=lambda k: int(k.split("_")[1]))
    layers = convs + matmuls  # the chains are Conv... then Dense...
    if len(layers) != len(kinds):
        raise PackagingError(f"hls4ml's configuration has {len(layers)} weighted layers, the search {len(kinds)}")
    for layer, kind in zip(layers, kinds, strict=True):
        names[layer]["Precision"].update(weight=str(kind), bias=str(kind))


def _relocatable(project: Path) -> None:
    """No absolute path of this machine may stay in the project (bundles are unpacked elsewhere), and
    hls4ml's random build stamp becomes a digest of the firmware, so the same model gives the same bytes."""
    stamp = re.search(r"^Stamp: (\w+)$", (project / "hls4ml_config.yml").read_text(), re.M)
    digest = hashlib.sha256()
    for path in sorted((project / "firmware").rglob("*")):
        if path.is_file() and path.suffix not in (".so", ".o"):
            digest.update(path.read_bytes())
    for path in project.rglob("*"):
        if not path.is_file() or path.suffix in (".so", ".o"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        fixed = text.replace(str(project), ".")
        if stamp:
            fixed = fixed.replace(stamp.group(1), digest.hexdigest()[:8])
        if fixed != text:
            path.write_text(fixed, encoding="utf-8")
    for leftover in list(project.rglob("*.so")) + list(project.rglob("*.o")):
        leftover.unlink()


def _estimate(body: list[Layer], precision: HlsPrecision, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Our analytical estimate for reuse factor 1 (hls4ml gives none without the vendor tools)."""
    multipliers, dsp, lut_mults, latency, bits = 0, 0, 0, 0, 0
    kinds = iter(precision.weights)
    data_width = precision.input.width
    spatial = input_shape[1:] if len(input_shape) == 3 else (1, 1)
    hidden = iter(precision.activations)
    for layer in body:
        if isinstance(layer, Dense | Conv2D):
            kind = next(kinds)
            nonzero = int(np.count_nonzero(to_fixed_as_written(layer.weight, kind)))
            positions = 1
            if isinstance(layer, Conv2D):
                top, left, bottom, right = layer.pads
                sh, sw = layer.strides
                spatial = ((spatial[0] + top + bottom - layer.weight.shape[2]) // sh + 1,
                           (spatial[1] + left + right - layer.weight.shape[3]) // sw + 1)
                positions = spatial[0] * spatial[1]
            count = nonzero * positions
            multipliers += count
            # DSP slices take multiplications wider than ~10x10 bits; narrower ones map to LUTs
            if min(data_width, kind.width) > 10:
                dsp += count
            else:
                lut_mults += count * data_width * kind.width // 2
            fan_in = int(np.prod(layer.weight.shape[1:])) if isinstance(layer, Conv2D) else layer.weight.shape[0]
            latency += math.ceil(math.log2(max(fan_in, 2))) + 3
            bits += layer.weight.size * kind.width
        elif isinstance(layer, Relu):
            data_width = next(hidden).width
        elif isinstance(layer, MaxPool2D):
            spatial = ((spatial[0] - layer.kernel[0]) // layer.stride[0] + 1,
                       (spatial[1] - layer.kernel[1]) // layer.stride[1] + 1)
            latency += 2
    return {"source": "edgedeploy analytical estimate (reuse factor 1, io_parallel); run the vendor build "
                      "script for synthesis numbers", "multipliers": multipliers, "dsp": dsp,
            "lut_for_multipliers": lut_mults, "latency_cycles": latency, "weight_bits": bits}


def firmware_layout(x: np.ndarray) -> np.ndarray:
    """Model inputs [N, C, H, W] as the firmware reads them (channels last, flattened); [N, F] unchanged."""
    x = np.asarray(x)
    return x.transpose(0, 2, 3, 1).reshape(len(x), -1) if x.ndim == 4 else x.reshape(len(x), -1)


def _check_written(precision: HlsPrecision, reference: FirmwareReference) -> None:
    """hls4ml must have written the searched types; a config key it ignored would silently change them."""
    written = [(types["weight"], types["bias"]) for types in precision.firmware_types]
    wanted = [(str(kind), str(kind)) for kind in precision.weights]
    if written != wanted or str(reference.input_type) != str(precision.input):
        raise PackagingError(f"hls4ml wrote other types than the search chose: input {reference.input_type}, "
                             f"weights {written}; wanted input {precision.input}, weights {wanted}")


def _default_csim_cache() -> Path:
    """``$EDGEDEPLOY_FPGA_CACHE`` (the agent's cache too, so a host that packages and serves compiles once),
    else ``$EDGEDEPLOY_HOME/fpga-cache``."""
    configured = os.environ.get("EDGEDEPLOY_FPGA_CACHE")
    return Path(configured) if configured else edgedeploy_home() / "fpga-cache"


def _confirm_on_csim(project: Path, x: np.ndarray, expected: np.ndarray, cache: Path) -> bool:
    """Build the firmware's C simulation once (g++, cached by firmware digest) and check that it gives the
    reference's outputs bit for bit; False (logged) when this machine has no C++ compiler."""
    from edge_agent.errors import BundleError
    from edge_agent.fpga.csim import CSimModel, cxx_compiler

    if cxx_compiler() is None:
        log.warning("no C++ compiler: the firmware's C simulation was not run (the integer reference was)")
        return False
    try:
        emulated = CSimModel.build(project, cache, x.shape[1], expected.shape[1]).predict(x)
    except BundleError as exc:
        raise PackagingError(f"the firmware hls4ml wrote does not build: {exc}") from exc
    if not np.array_equal(emulated, expected):
        rows = int((emulated != expected).any(axis=1).sum())
        raise PackagingError(f"the firmware's C simulation differs from the fixed-point reference on {rows} of "
                             f"{len(x)} calibration samples")
    return True


def _calibration_input(first: Dense | Conv2D, calibration: np.ndarray) -> np.ndarray:
    """The calibration set as the first layer takes it: [N, F] for a Dense, [N, C, H, W] for a Conv2D."""
    x = np.asarray(calibration, dtype=np.float32)
    if isinstance(first, Dense):
        flat = x.reshape(len(x), -1)
        if flat.shape[1] != first.weight.shape[0]:
            raise PackagingError(f"the calibration set's samples have {flat.shape[1]} values; the model's first "
                                 f"layer takes {first.weight.shape[0]}")
        return flat
    if x.ndim != 4 or x.shape[1] != first.weight.shape[1]:
        raise PackagingError(f"the calibration set's shape {list(x.shape)[1:]} does not fit the model's first "
                             f"convolution ({first.weight.shape[1]} channels, NCHW)")
    return x


def compile_hls(model: Path, calibration: np.ndarray, out_dir: Path, *, part: str, target_agreement: float = 0.99,
                max_error: float | None = None, widths: tuple[int, ...] = HLS_WIDTHS, confirm: bool = True,
                csim_cache: Path | None = None) -> HlsBuild:
    """Search the precisions on ``calibration``, write the firmware project into ``out_dir`` and measure it.

    ``target_agreement`` is the top-1 agreement with fp32 each narrowing must keep, unless ``max_error``
    (max absolute logit error) is given; ``widths`` are the total widths tried, widest first. The search
    scores candidates with numpy only; the written firmware is then read back by
    :class:`~packager.fpga.fixed.FirmwareReference` for the reported agreement and, with ``confirm``,
    built once into its g++ C simulation (cached by firmware digest in ``csim_cache``, default
    ``$EDGEDEPLOY_FPGA_CACHE`` or ``$EDGEDEPLOY_HOME/fpga-cache``) whose outputs must equal the
    reference's exactly. A trailing Softmax is not in the firmware: its
    outputs are logits, and softmax runs on the host in float32 (``host_softmax``), because hls4ml's
    softmax is a lookup-table approximation that no exact reference could follow.
    """
    body, host_softmax = _chain(lower_onnx(model))
    weighted = _weighted(body)
    first = weighted[0]
    x = _calibration_input(first, calibration)
    precision, trials = _search(body, x, target_agreement, max_error, widths)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    channels_last = isinstance(first, Conv2D)
    with tempfile.TemporaryDirectory(prefix="edgedeploy-hls-") as tmp:
        chain = Path(tmp) / "chain.onnx"
        _chain_onnx(body, tuple(x.shape[1:]), chain)
        version = _write_project(chain, precision, out_dir, part, channels_last)
    _relocatable(out_dir)
    reference, _hidden = float_forward(body, x)
    written = FirmwareReference(out_dir)
    precision.firmware_types = written.layer_types()
    _check_written(precision, written)
    firmware = written.predict(firmware_layout(x))
    agreement, error = _score(firmware, reference)
    if not (error <= max_error if max_error is not None else agreement >= target_agreement):
        raise PackagingError(f"the written firmware misses the goal the search met ({agreement:.1%} top-1 "
                             f"agreement, max error {error:.3g}): hls4ml chose other accumulator or result types")
    cache = Path(csim_cache) if csim_cache is not None else _default_csim_cache()
    confirmed = confirm and _confirm_on_csim(out_dir, firmware_layout(x), firmware, cache)
    last = weighted[-1]
    assert isinstance(last, Dense)
    build = HlsBuild(out_dir, precision, int(np.prod(x.shape[1:])), int(last.weight.shape[1]), host_softmax,
                     agreement, error, trials, _estimate(body, precision, tuple(x.shape[1:])), version)
    build.channels_last, build.layers, build.csim_confirmed = channels_last, body, confirmed
    (out_dir / "precision.json").write_text(json.dumps(build.report(build.layer_names), indent=2,
                                                       sort_keys=True) + "\n")
    log.info("HLS firmware for %s: %s, %.1f%% top-1 agreement with fp32", model, precision.input, agreement * 100)
    return build
