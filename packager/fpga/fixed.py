"""A bit-accurate reference of an hls4ml firmware project, in integer numpy, read from the project itself.

:class:`FirmwareReference` reads the types (``defines.h``), the layer configs (``parameters.h``),
the layer calls (``myproject.cpp``) and the weight files the C simulation loads, and computes what
the firmware computes with ``ap_fixed`` semantics: values are integers scaled by ``2**-fraction``,
products are exact, every assignment to a narrower type truncates toward minus infinity (AP_TRN)
and wraps (AP_WRAP), hls4ml's defaults. It does not run any of the firmware's code, so agreeing
with the C simulation bit for bit is evidence that both implement the chosen precisions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.errors import PackagingError

__all__ = ["FixedType", "FirmwareReference", "parse_fixed", "to_fixed", "to_fixed_as_written"]


@dataclass(frozen=True)
class FixedType:
    """``ap_fixed<width, integer>`` (``signed``) or ``ap_ufixed``; ``ap_uint<n>`` is fraction 0."""

    width: int
    integer: int
    signed: bool = True

    @property
    def fraction(self) -> int:
        return self.width - self.integer

    def __str__(self) -> str:
        return f"ap_{'' if self.signed else 'u'}fixed<{self.width},{self.integer}>"


_TYPE = re.compile(r"ap_(u?)(fixed|int)<\s*(\d+)\s*(?:,\s*(-?\d+))?[^>]*>")


def parse_fixed(text: str) -> FixedType:
    """``ap_fixed<16,6>`` / ``ap_ufixed<8,4>`` / ``ap_uint<1>`` / ``ap_int<8>`` as a FixedType."""
    match = _TYPE.fullmatch(text.strip())
    if match is None:
        raise PackagingError(f"not a fixed-point type the reference knows: {text!r}")
    unsigned, kind, width, integer = match.groups()
    width_i = int(width)
    return FixedType(width_i, width_i if kind == "int" else int(integer), not unsigned)


def _wrap(values: np.ndarray, kind: FixedType) -> np.ndarray:
    modulus = 1 << kind.width
    if kind.signed:
        half = modulus >> 1
        return ((values + half) % modulus) - half
    return values % modulus


def requantize(values: np.ndarray, source_fraction: int, kind: FixedType) -> np.ndarray:
    """Integers with ``source_fraction`` bits assigned to ``kind``: truncate (floor), then wrap."""
    shift = kind.fraction - source_fraction
    scaled = values << shift if shift >= 0 else values >> -shift  # >> on int64 floors, as AP_TRN does
    return _wrap(scaled, kind)


def to_fixed(values: np.ndarray, kind: FixedType) -> np.ndarray:
    """Floats converted to ``kind`` (AP_TRN, AP_WRAP) as int64 integers scaled by 2**-fraction."""
    scaled = np.floor(np.asarray(values, dtype=np.float64) * 2.0 ** kind.fraction).astype(np.int64)
    return _wrap(scaled, kind)


def to_fixed_as_written(values: np.ndarray, kind: FixedType) -> np.ndarray:
    """Weights as the firmware holds them: hls4ml writes each value with ``kind.fraction`` decimals
    (correctly rounded, so ``-1e-9`` becomes ``-0.000``) and the C simulation reads the text back with
    AP_TRN and AP_WRAP. That differs from :func:`to_fixed` of the float for values just below a grid point."""
    decimals = max(0, kind.fraction)
    array = np.asarray(values, dtype=np.float64)
    written = np.array([float(f"{value:.{decimals}f}") for value in array.ravel()]).reshape(array.shape)
    return to_fixed(written, kind)


_CALL = re.compile(r"nnet::(\w+)<([^;]*?)>\(([^;]*)\);")
_TYPEDEF = re.compile(r"typedef\s+(ap_\w+<[^>]*>)\s+(\w+);")
_CONFIG = re.compile(r"struct\s+(\w+)\s*:[^{]*\{(.*?)\n\};", re.S)


@dataclass
class _Step:
    function: str
    source: FixedType
    result: FixedType
    config: dict[str, str]
    weights: list[str]


class FirmwareReference:
    """The firmware's forward pass in exact integer arithmetic (dense, conv, max pool, normalize, relu)."""

    def __init__(self, project: Path) -> None:
        firmware = Path(project) / "firmware"
        self.types = {name: parse_fixed(text) for text, name in _TYPEDEF.findall((firmware / "defines.h").read_text())}
        self.configs = self._configs((firmware / "parameters.h").read_text())
        self.weights_dir = firmware / "weights"
        self.steps = self._steps((firmware / "myproject.cpp").read_text())
        self.input_type = self.steps[0].source

    def _configs(self, text: str) -> dict[str, dict[str, str]]:
        configs = {}
        for name, body in _CONFIG.findall(text):
            fields = re.findall(r"typedef\s+([\w:<>, ]+?)\s+(\w+);", body)
            configs[name] = {field: kind.strip() for kind, field in fields}
            configs[name].update(dict(re.findall(r"static const unsigned (\w+) = (\d+);", body)))
        return configs

    def _steps(self, text: str) -> list[_Step]:
        body = text.split("NETWORK INSTANTIATION", 1)[-1]
        steps = []
        for function, template, arguments in _CALL.findall(body):
            if function.startswith("load_weights"):
                continue
            kinds = [part.strip() for part in template.split(",")]
            args = [part.strip() for part in arguments.split(",")]
            steps.append(_Step(function, self.types[kinds[0]], self.types[kinds[1]],
                               self.configs.get(kinds[-1], {}), args[2:]))
        if not steps:
            raise PackagingError("no layer calls found in the firmware's myproject.cpp")
        return steps

    def _weight(self, name: str, kind: FixedType) -> np.ndarray:
        text = (self.weights_dir / f"{name}.txt").read_text()
        return to_fixed(np.array([float(v) for v in text.replace("\n", "").split(",") if v.strip()]), kind)

    def _type_of(self, config: dict[str, str], field: str) -> FixedType:
        name = config[field]
        return self.types[name] if name in self.types else parse_fixed(name)

    def layer_types(self) -> list[dict[str, str]]:
        """The types each weighted layer was written with, in order: weight, bias, accum and result."""
        types = []
        for step in self.steps:
            if step.function in ("dense", "dense_latency", "conv_2d_cl"):
                types.append({
                    "weight": str(self._type_of(step.config, "weight_t")), "bias": str(self._type_of(step.config,
                                                                                                     "bias_t")),
                    "accum": str(self._type_of(step.config, "accum_t")), "result": str(step.result)})
        return types

    def forward_fixed(self, x: np.ndarray) -> tuple[np.ndarray, FixedType]:
        """Integer outputs (and their type) for float inputs ``x`` [N, inputs]."""
        values = to_fixed(x, self.input_type)
        fraction = self.input_type.fraction
        for step in self.steps:
            values, fraction = self._apply(step, values, fraction)
        return values, self.steps[-1].result

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Float64 outputs, exactly what the firmware's ``double`` bridge returns."""
        values, kind = self.forward_fixed(np.asarray(x, dtype=np.float64).reshape(len(x), -1))
        return values.astype(np.float64) / 2.0 ** kind.fraction

    def _apply(self, step: _Step, values: np.ndarray, fraction: int) -> tuple[np.ndarray, int]:
        if step.function in ("dense", "dense_latency"):
            return self._dense(step, values, fraction)
        if step.function == "normalize":
            scale_t, bias_t = self._type_of(step.config, "scale_t"), self._type_of(step.config, "bias_t")
            scale = self._weight(step.weights[0], scale_t)
            bias = self._weight(step.weights[1], bias_t)
            product = values * scale  # exact, fraction + scale fraction bits
            total = product + (bias << (fraction + scale_t.fraction - bias_t.fraction)
                               if fraction + scale_t.fraction >= bias_t.fraction else bias)
            return requantize(total, fraction + scale_t.fraction, step.result), step.result.fraction
        if step.function == "conv_2d_cl":
            return self._conv(step, values, fraction)
        if step.function == "pooling2d_cl":
            return self._max_pool(step, values, fraction)
        if step.function == "relu":
            return requantize(np.where(values > 0, values, 0), fraction, step.result), step.result.fraction
        if step.function == "linear":
            return requantize(values, fraction, step.result), step.result.fraction
        raise PackagingError(f"the bit-accurate reference does not model nnet::{step.function}")

    def _conv(self, step: _Step, values: np.ndarray, fraction: int) -> tuple[np.ndarray, int]:
        """conv_2d_cl: channels-last data, weights [fh][fw][c][f], zero padding, dense-like accumulation."""
        c = {k: int(v) for k, v in step.config.items() if v.isdigit()}
        weight_t, bias_t = self._type_of(step.config, "weight_t"), self._type_of(step.config, "bias_t")
        accum_t = self._type_of(step.config, "accum_t")
        data = values.reshape(len(values), c["in_height"], c["in_width"], c["n_chan"])
        data = np.pad(data, ((0, 0), (c["pad_top"], c["pad_bottom"]), (c["pad_left"], c["pad_right"]), (0, 0)))
        weights = self._weight(step.weights[0], weight_t).reshape(c["filt_height"], c["filt_width"], c["n_chan"],
                                                                  c["n_filt"])
        bias = requantize(self._weight(step.weights[1], bias_t), bias_t.fraction, accum_t)
        out = np.zeros((len(values), c["out_height"], c["out_width"], c["n_filt"]), dtype=np.int64)
        for oh in range(c["out_height"]):
            for ow in range(c["out_width"]):
                top, left = oh * c["stride_height"], ow * c["stride_width"]
                window = data[:, top:top + c["filt_height"], left:left + c["filt_width"], :]
                products = window[..., None] * weights[None]  # [N, fh, fw, c, f], exact
                mult = requantize(products, fraction + weight_t.fraction, accum_t)
                out[:, oh, ow, :] = requantize(bias[None, :] + mult.sum(axis=(1, 2, 3)), accum_t.fraction, accum_t)
        return requantize(out.reshape(len(values), -1), accum_t.fraction, step.result), step.result.fraction

    def _max_pool(self, step: _Step, values: np.ndarray, fraction: int) -> tuple[np.ndarray, int]:
        """pooling2d_cl with Max: the largest value of each window, assigned to the result type."""
        c = {k: int(v) for k, v in step.config.items() if v.isdigit()}
        if any(c.get(k, 0) for k in ("pad_top", "pad_bottom", "pad_left", "pad_right")):
            raise PackagingError("the bit-accurate reference models unpadded max pooling only")
        data = values.reshape(len(values), c["in_height"], c["in_width"], c["n_filt"])
        out = np.zeros((len(values), c["out_height"], c["out_width"], c["n_filt"]), dtype=np.int64)
        for oh in range(c["out_height"]):
            for ow in range(c["out_width"]):
                top, left = oh * c["stride_height"], ow * c["stride_width"]
                out[:, oh, ow, :] = data[:, top:top + c["pool_height"], left:left + c["pool_width"], :].max(axis=(1, 2))
        return requantize(out.reshape(len(values), -1), fraction, step.result), step.result.fraction

    def _dense(self, step: _Step, values: np.ndarray, fraction: int) -> tuple[np.ndarray, int]:
        weight_t, bias_t = self._type_of(step.config, "weight_t"), self._type_of(step.config, "bias_t")
        accum_t = self._type_of(step.config, "accum_t")
        n_in, n_out = int(step.config["n_in"]), int(step.config["n_out"])
        weights = self._weight(step.weights[0], weight_t).reshape(n_in, n_out)
        bias = self._weight(step.weights[1], bias_t)
        # mult[i][j] = (accum_t)(x[i] * w[i][j]); acc[j] = (accum_t)b[j] + sum_i mult[i][j], wrapping in accum_t
        products = values[:, :, None] * weights[None, :, :]
        mult = requantize(products, fraction + weight_t.fraction, accum_t)
        acc = requantize(bias.astype(np.int64), bias_t.fraction, accum_t)
        # wrapping after every addition, as the accumulator does, equals wrapping the exact sum once
        acc = requantize(acc[None, :] + mult.sum(axis=1), accum_t.fraction, accum_t)
        return requantize(acc, accum_t.fraction, step.result), step.result.fraction
