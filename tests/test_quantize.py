"""The optimize and quantize stages on their own (packager/optimize.py, packager/quantize.py), and the
calibration/validation data loaders (packager/samples.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edge_agent.errors import NotFoundError, UsageError, ValidationError
from packager.examples import DigitsData
from packager.optimize import operator_counts, optimize_model
from packager.quantize import quantize_model
from packager.samples import load_arrays, load_sample, match_inputs, split_labels


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def _cnn_input(digits: DigitsData, count: int) -> np.ndarray:
    return digits.x_test[:count].reshape(-1, 1, 8, 8).astype(np.float32)


def test_optimized_model_gives_the_same_answers(digits_cnn: Path, digits: DigitsData, tmp_path: Path) -> None:
    out = optimize_model(digits_cnn, tmp_path / "opt.onnx", "all")
    x = _cnn_input(digits, 50)
    np.testing.assert_allclose(_run(out, x)[0], _run(digits_cnn, x)[0], rtol=1e-5, atol=1e-6)
    assert sum(operator_counts(out).values()) <= sum(operator_counts(digits_cnn).values())


def test_dynamic_int8_shrinks_weights_and_adds_integer_ops(digits_mlp: Path, tmp_path: Path) -> None:
    out = quantize_model(digits_mlp, tmp_path / "dyn.onnx", "dynamic-int8")
    ops = Counter(operator_counts(out))
    assert any("Integer" in op or "Quant" in op for op in ops), ops
    assert out.stat().st_size < digits_mlp.stat().st_size


def test_static_int8_is_qdq_and_keeps_the_predictions(digits_cnn: Path, digits: DigitsData, tmp_path: Path) -> None:
    out = quantize_model(digits_cnn, tmp_path / "static.onnx", "static-int8",
                         calibration={"input": _cnn_input(digits, 100)})
    ops = operator_counts(out)
    assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0
    x = _cnn_input(digits, 200)
    agree = (_run(out, x)[0].argmax(1) == _run(digits_cnn, x)[0].argmax(1)).mean()
    assert agree >= 0.95


def test_fp16_keeps_float32_io_and_close_outputs(digits_cnn: Path, digits: DigitsData, tmp_path: Path) -> None:
    out = quantize_model(digits_cnn, tmp_path / "half.onnx", "fp16")
    model = onnx.load(str(out))
    float16_inits = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert float16_inits
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = _cnn_input(digits, 20)
    np.testing.assert_allclose(_run(out, x)[0], _run(digits_cnn, x)[0], atol=5e-3)


def test_none_copies_the_model(digits_mlp: Path, tmp_path: Path) -> None:
    out = quantize_model(digits_mlp, tmp_path / "same.onnx", "none")
    assert out.read_bytes() == digits_mlp.read_bytes()


def test_static_without_calibration_and_unknown_mode_are_refused(digits_mlp: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="calibration"):
        quantize_model(digits_mlp, tmp_path / "x.onnx", "static-int8")
    with pytest.raises(UsageError, match="int4"):
        quantize_model(digits_mlp, tmp_path / "x.onnx", "int4")
    assert not (tmp_path / "x.onnx").exists()


def test_calibration_folder_npz_and_single_unnamed_array(tmp_path: Path) -> None:
    x = np.ones((3, 4), np.float32)
    folder = tmp_path / "calib"
    folder.mkdir()
    np.save(folder / "input.npy", x)
    assert match_inputs(load_arrays(folder), ["input"], "calibration")["input"].shape == (3, 4)
    np.save(tmp_path / "whatever.npy", x)
    assert list(match_inputs(load_arrays(tmp_path / "whatever.npy"), ["input"], "calibration")) == ["input"]
    np.savez(tmp_path / "val.npz", a=x, b=x, labels=np.arange(3))
    inputs, labels = split_labels(load_arrays(tmp_path / "val.npz"))
    assert labels is not None and list(labels) == [0, 1, 2]
    assert match_inputs(inputs, ["a", "b"], "validation").keys() == {"a", "b"}
    with pytest.raises(ValidationError, match="name the arrays"):
        match_inputs(inputs, ["input"], "validation")


def test_bad_data_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        load_arrays(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValidationError):
        load_arrays(tmp_path / "bad.npz")
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(UsageError):
        load_arrays(tmp_path / "data.csv")
    (tmp_path / "s.json").write_text("{nope")
    with pytest.raises(ValidationError):
        load_sample(tmp_path / "s.json")


def test_npy_and_npz_samples_become_score_bodies(tmp_path: Path) -> None:
    np.save(tmp_path / "one.npy", np.zeros((1, 2), np.float32))
    assert load_sample(tmp_path / "one.npy") == {"data": [[0.0, 0.0]]}
    np.savez(tmp_path / "two.npz", a=np.zeros(1), b=np.ones(1))
    assert load_sample(tmp_path / "two.npz") == {"inputs": {"a": [0.0], "b": [1.0]}}
