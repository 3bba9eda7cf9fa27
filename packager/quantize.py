"""Quantization stages: dynamic int8, static int8 with a calibration set, and fp16."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx

from edge_agent.errors import UsageError, ValidationError

__all__ = ["PRECISION_OF", "QUANTIZATIONS", "quantize_model"]

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "dynamic-int8", "static-int8", "fp16")
PRECISION_OF = {"none": "fp32", "dynamic-int8": "int8", "static-int8": "int8", "fp16": "fp16"}
_CALIBRATION_BATCH = 16


class _ArrayReader:
    """Feeds calibration arrays to onnxruntime in small batches."""

    def __init__(self, inputs: dict[str, np.ndarray]) -> None:
        count = min(len(v) for v in inputs.values())
        self._batches = iter(
            {name: value[i:i + _CALIBRATION_BATCH] for name, value in inputs.items()}
            for i in range(0, count, _CALIBRATION_BATCH)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _preprocess(source: Path, target: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
    return target


def _opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _static(source: Path, target: Path, calibration: dict[str, np.ndarray]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    CalibrationDataReader.register(_ArrayReader)
    if _opset(source) < 13:
        # per-channel QDQ needs DequantizeLinear's axis attribute, added in opset 13
        quantize_static(str(source), str(target), _ArrayReader(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=False)
        return
    try:
        quantize_static(str(source), str(target), _ArrayReader(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True)
    except ValueError as exc:
        # onnxruntime's per-channel path fails on some Gemm/MatMul graphs (its bias-scale
        # adjustment compares arrays); per-tensor scales are the documented fallback.
        log.info("per-channel static quantization failed (%s); using per-tensor scales", exc)
        quantize_static(str(source), str(target), _ArrayReader(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=False)


def quantize_model(
    source: Path, target: Path, mode: str, calibration: dict[str, np.ndarray] | None = None
) -> Path:
    """Write ``source`` quantized with ``mode`` (one of :data:`QUANTIZATIONS`) to ``target``."""
    if mode not in QUANTIZATIONS:
        raise UsageError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if mode == "none":
        target.write_bytes(source.read_bytes())
        return target
    if mode == "fp16":
        from onnxconverter_common import float16

        with warnings.catch_warnings(record=True) as caught:
            # the converter warns once per weight it clamps into fp16's range; say it once
            warnings.simplefilter("always")
            model = float16.convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        if caught:
            log.info("fp16: %d weights were clamped into the fp16 range", len(caught))
        onnx.save(model, str(target))
        return target
    if mode == "static-int8" and not calibration:
        raise UsageError("static-int8 needs a calibration set: pass --calibration FILE.npz or a folder of .npy")
    with tempfile.TemporaryDirectory() as scratch:
        prepared = _preprocess(source, Path(scratch) / "prepared.onnx")
        try:
            if mode == "dynamic-int8":
                from onnxruntime.quantization import QuantType, quantize_dynamic

                quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)
            else:
                assert calibration is not None
                _static(prepared, target, calibration)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise ValidationError(f"{mode} quantization failed: {exc}") from None
    return target
