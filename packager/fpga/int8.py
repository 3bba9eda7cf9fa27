"""An MLP quantized to integers for our iCE40 design, and its exact integer reference.

Inputs and hidden activations are int8 with zero point 0 (symmetric; ReLU outputs are >= 0), weights
int8 per tensor, biases int32 in the accumulator's scale, accumulators int32. Between layers the
accumulator is requantized with a 16-bit multiplier and a right shift, rounding half up
(``(acc * m + 2**(s-1)) >> s``) and clamped to [0, 127] by the ReLU every hidden layer has. The last
layer's int32 accumulators are the design's outputs (no requantization: exact logits for the argmax);
the host scales them back to float logits (and applies a Softmax the model ends with).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import PackagingError
from packager.fpga.lower import Dense, Layer, Relu, Softmax, lower_onnx

__all__ = ["FloatLayer", "QuantizedLayer", "QuantizedMLP", "dense_chain", "quantize_layers", "quantize_mlp",
           "reference", "requantize_int"]

FloatLayer = tuple[np.ndarray, np.ndarray, bool]  # (weight [in, out], bias [out], relu after it)

_MULTIPLIER_BITS = 15  # m in [2**14, 2**15): a 16-bit signed operand, one DSP on the UP5K


def requantize_int(acc: np.ndarray, multiplier: int, shift: int, relu: bool) -> np.ndarray:
    """``clamp((acc * m + 2**(shift-1)) >> shift)`` in exact integers (what the Verilog computes)."""
    scaled = (acc.astype(np.int64) * multiplier + (1 << (shift - 1))) >> shift
    return np.clip(scaled, 0 if relu else -128, 127).astype(np.int64)


@dataclass(frozen=True)
class QuantizedLayer:
    """One dense layer: int8 ``weight`` [in, out], int32 ``bias``, requantization to int8 (not on the last)."""

    weight: np.ndarray
    bias: np.ndarray
    multiplier: int
    shift: int
    relu: bool
    accumulator_scale: float  # real value of one accumulator unit


@dataclass(frozen=True)
class QuantizedMLP:
    """The integer model, the float model it came from, and what the host needs around it."""

    layers: list[QuantizedLayer]
    input_scale: float
    float_layers: list[Dense]
    host_softmax: bool

    @property
    def inputs(self) -> int:
        return int(self.layers[0].weight.shape[0])

    @property
    def outputs(self) -> int:
        return int(self.layers[-1].weight.shape[1])

    @property
    def cycles(self) -> int:
        """Clock cycles per inference of the generated design (one MAC per cycle, 3 cycles per output)."""
        return sum(int(layer.weight.shape[1]) * (int(layer.weight.shape[0]) + 3) for layer in self.layers) + 1

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """Float inputs to the design's int8 inputs (round half up, clamp)."""
        scaled = np.floor(np.asarray(x, dtype=np.float64) / self.input_scale + 0.5)
        return np.clip(scaled, -128, 127).astype(np.int8)

    def reference(self, x_int8: np.ndarray) -> np.ndarray:
        """The last layer's int32 accumulators for int8 inputs [N, in]: exactly what the design outputs."""
        values = np.asarray(x_int8, dtype=np.int64)
        for index, layer in enumerate(self.layers):
            acc = values @ layer.weight.astype(np.int64) + layer.bias.astype(np.int64)
            if index == len(self.layers) - 1:
                return acc
            values = requantize_int(acc, layer.multiplier, layer.shift, layer.relu)
        raise PackagingError("a quantized MLP has at least one layer")

    def dequantize(self, acc: np.ndarray) -> np.ndarray:
        """The design's int32 outputs as float32 logits."""
        return (np.asarray(acc, dtype=np.float64) * self.layers[-1].accumulator_scale).astype(np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Float logits through the integer model."""
        return self.dequantize(self.reference(self.quantize_input(x)))

    def float_logits(self, x: np.ndarray) -> np.ndarray:
        """The fp32 model's logits."""
        values = np.asarray(x, dtype=np.float32)
        for index, layer in enumerate(self.float_layers):
            values = values @ layer.weight + layer.bias
            if index < len(self.float_layers) - 1:
                values = np.maximum(values, 0)
        return values

    def describe(self) -> dict[str, Any]:
        """For the packaging report."""
        return {"inputs": "int8 (symmetric, zero point 0)", "weights": "int8 per tensor", "accumulators": "int32",
                "input_scale": self.input_scale,
                "layers": [{"shape": list(layer.weight.shape), "multiplier": layer.multiplier, "shift": layer.shift,
                            "relu": layer.relu} for layer in self.layers]}

    def runtime_params(self) -> dict[str, Any]:
        """What the agent needs around the design: input scale, output scale, sizes."""
        return {"input_scale": self.input_scale, "output_scale": self.layers[-1].accumulator_scale,
                "inputs": self.inputs, "outputs": self.outputs, "cycles_per_inference": self.cycles}


_MAX_SHIFT = 46  # (acc * m + 2**(shift-1)) stays inside the design's 48-bit product; the shift fits 6 bits


def reference(qmodel: QuantizedMLP, x_int8: np.ndarray) -> np.ndarray:
    """The design's int32 outputs [N, outputs] for int8 inputs [N, inputs], in exact int64 arithmetic."""
    return qmodel.reference(x_int8)


def _multiplier(real: float) -> tuple[int, int]:
    """``real ~= m / 2**shift`` with m in [2**14, 2**15): m stays a positive 16-bit signed operand."""
    if not 0 < real < 1:
        raise PackagingError(f"a requantization scale of {real:.3g} is outside (0, 1); the layer's ranges are odd")
    shift = 0
    while real * (1 << (shift + 1)) < (1 << _MULTIPLIER_BITS):
        shift += 1
    multiplier = int(round(real * (1 << shift)))
    if multiplier == 1 << _MULTIPLIER_BITS:  # rounding reached 2**15, which is -32768 in 16 signed bits
        multiplier, shift = multiplier >> 1, shift - 1
    if shift > _MAX_SHIFT:
        raise PackagingError(f"a requantization scale of {real:.3g} needs a shift of {shift} (> {_MAX_SHIFT}); "
                             "the layer's output range is far wider than its input range")
    return multiplier, shift


def dense_chain(layers: Sequence[FloatLayer | Layer]) -> tuple[list[Dense], bool]:
    """The Dense layers of ``Dense > ReLU > ... > Dense [> Softmax]`` and whether it ends in a Softmax.

    Takes :func:`packager.fpga.lower.lower_onnx` layers or ``(weight [in, out], bias, relu)`` tuples;
    the design applies ReLU after every hidden layer and never after the last one.
    """
    items = [_as_layers(item, index) for index, item in enumerate(layers)]
    flat = [layer for group in items for layer in group]
    host_softmax = bool(flat) and isinstance(flat[-1], Softmax)
    body = flat[:-1] if host_softmax else flat
    dense = [layer for layer in body if isinstance(layer, Dense)]
    expected = [t for i in range(len(dense)) for t in ([Dense, Relu] if i < len(dense) - 1 else [Dense])]
    if not dense or [type(layer) for layer in body] != expected:
        raise PackagingError("the iCE40 target builds dense chains (Dense > ReLU > ... > Dense [> Softmax]); "
                             f"this model is {' > '.join(type(layer).__name__ for layer in flat) or 'empty'}")
    for before, after in zip(dense, dense[1:], strict=False):
        if before.weight.shape[1] != after.weight.shape[0]:
            raise PackagingError(f"layer {after.name} takes {after.weight.shape[0]} inputs, "
                                 f"{before.name} gives {before.weight.shape[1]}")
    return dense, host_softmax


def _as_layers(item: FloatLayer | Layer, index: int) -> list[Layer]:
    if not isinstance(item, tuple):
        return [item]
    weight, bias, relu = item
    dense = Dense(f"dense{index}", np.asarray(weight, dtype=np.float32), np.asarray(bias, dtype=np.float32))
    return [dense, Relu(f"relu{index}")] if relu else [dense]


def quantize_mlp(model: Path, calibration: np.ndarray) -> QuantizedMLP:
    """Quantize an ONNX ``Dense > ReLU > ... > Dense [> Softmax]`` model with scales from ``calibration``."""
    return quantize_layers(lower_onnx(model), calibration)


def quantize_layers(layers: Sequence[FloatLayer | Layer], calibration: np.ndarray) -> QuantizedMLP:
    """Quantize float layers (see :func:`dense_chain`) with activation scales from ``calibration`` [N, in].

    Weights: int8 symmetric per tensor. Activations: int8, zero point 0, scale = calibration max / 127.
    Biases: int32 in the accumulator's scale. Raises PackagingError when an accumulator could overflow.
    """
    dense, host_softmax = dense_chain(layers)
    x = np.asarray(calibration, dtype=np.float32).reshape(len(calibration), -1)
    if x.shape[1] != dense[0].weight.shape[0]:
        raise PackagingError(f"the calibration data has {x.shape[1]} features, the model takes "
                             f"{dense[0].weight.shape[0]}")
    scale_in = float(np.abs(x).max()) / 127 or 1.0
    quantized, values, scale = [], x, scale_in
    for index, layer in enumerate(dense):
        last = index == len(dense) - 1
        weight, bias, acc_scale = _quantize_dense(layer, scale)
        values = values @ layer.weight + layer.bias
        if not last:
            values = np.maximum(values, 0)
        out_scale = float(values.max()) / 127 if not last and values.max() > 0 else 1.0
        multiplier, shift = (0, 0) if last else _multiplier(acc_scale / out_scale)
        quantized.append(QuantizedLayer(weight, bias, multiplier, shift, not last, acc_scale))
        scale = out_scale
    return QuantizedMLP(quantized, scale_in, dense, host_softmax)


def _quantize_dense(layer: Dense, input_scale: float) -> tuple[np.ndarray, np.ndarray, float]:
    """int8 weights, int32 biases and the accumulator's scale; refuses a layer whose sums could overflow."""
    w_scale = float(np.abs(layer.weight).max()) / 127 or 1.0
    weight = np.clip(np.floor(layer.weight / w_scale + 0.5), -127, 127).astype(np.int8)
    acc_scale = input_scale * w_scale
    bias = np.floor(layer.bias.astype(np.float64) / acc_scale + 0.5)
    # worst case: every input at -128 against a weight of -127, plus the bias
    bound = float(np.abs(bias).max(initial=0)) + 128 * 127 * weight.shape[0]
    if bound >= 2**31:
        raise PackagingError(f"layer {layer.name}: its bias and {weight.shape[0]} products could overflow "
                             "the int32 accumulator")
    return weight, bias.astype(np.int32), acc_scale
