"""Packager benchmark: fp32 vs dynamic int8 vs static int8 vs fp16 on real models.

Models: the digits CNN and MLP built here from scikit-learn's digits (accuracy on held-out digits),
and PP-OCRv4's text recognizer (a 10.9 MB conv network shipped inside the ``rapidocr_onnxruntime``
wheel; ``make bench`` installs it without dependencies), measured as agreement with fp32 of the
decoded text on strips of six handwritten digits. Each row: file size, onnxruntime batch-1 and
batch-32 latency on this machine.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.common import median, print_table, time_calls, write_results
from packager.examples import build_digits_cnn, build_digits_mlp, digits_data
from packager.optimize import optimize_model
from packager.quantize import quantize_model

MODES = ("none", "dynamic-int8", "static-int8", "fp16")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _packaged(source: Path, mode: str, calibration: dict[str, np.ndarray], scratch: Path) -> Path:
    target = scratch / f"{source.stem}-{mode}.onnx"
    if mode == "none":
        return optimize_model(source, target, "extended")
    prepared = source if mode.endswith("int8") else optimize_model(source, scratch / f"{source.stem}-b.onnx", "basic")
    return quantize_model(prepared, target, mode, calibration)


def _ctc_text(logits: np.ndarray) -> np.ndarray:
    """Greedy CTC decoding (collapse repeats, drop blank 0): one class sequence per image, as a string."""
    best = logits.argmax(axis=-1)
    texts = []
    for row in best:
        keep = [c for i, c in enumerate(row) if c != 0 and (i == 0 or c != row[i - 1])]
        texts.append(",".join(map(str, keep)))
    return np.asarray(texts)


def _top1(outputs: list[np.ndarray]) -> np.ndarray:
    if outputs[0].ndim == 3:
        return _ctc_text(outputs[0])
    for out in outputs:
        if out.ndim == 1 and np.issubdtype(out.dtype, np.integer):
            return out
    last = np.asarray(outputs[-1] if outputs[-1].ndim >= 2 else outputs[0])
    return last.argmax(axis=-1)


def _row(name: str, mode: str, path: Path, feed: dict[str, np.ndarray], labels: np.ndarray | None,
         reference: np.ndarray | None, runs: tuple[int, int]) -> dict[str, Any]:
    session = _session(path)
    one = {k: v[:1] for k, v in feed.items()}
    batch = {k: v[:32] for k, v in feed.items()}
    predictions = _top1(session.run(None, feed))
    row: dict[str, Any] = {
        "model": name, "precision": mode, "size_kib": path.stat().st_size / 1024,
        "b1_ms": median(time_calls(lambda: session.run(None, one), runs[0])),
        "b32_ms": median(time_calls(lambda: session.run(None, batch), runs[1], warmup=2)),
    }
    if labels is not None:
        row["accuracy_%"] = float((predictions == labels).mean() * 100)
    if reference is not None:
        row["agreement_%"] = float((predictions == reference).mean() * 100)
    return row


def _bench_model(name: str, source: Path, feed: dict[str, np.ndarray], calibration: dict[str, np.ndarray],
                 labels: np.ndarray | None, runs: tuple[int, int], scratch: Path) -> list[dict[str, Any]]:
    rows = []
    reference = None
    for mode in MODES:
        path = _packaged(source, mode, calibration, scratch)
        row = _row(name, mode, path, feed, labels, reference, runs)
        if mode == "none":
            reference = _top1(_session(path).run(None, feed))
            row["agreement_%"] = 100.0
        row["size_ratio"] = rows[0]["size_kib"] / row["size_kib"] if rows else 1.0
        row["b1_speedup"] = rows[0]["b1_ms"] / row["b1_ms"] if rows else 1.0
        rows.append(row)
    return rows


def _ocr_model() -> Path | None:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "ch_PP-OCRv4_rec_infer.onnx"
    return path if path.is_file() else None


def _digit_strips(digits: np.ndarray, count: int) -> np.ndarray:
    """Text-line images for the recognizer: six handwritten digits, dark on white, 48 x 320, in [-1, 1]."""
    strips = np.ones((count, 3, 48, 320), np.float32)
    for i in range(count):
        for j in range(6):
            glyph = np.kron(digits[(i * 6 + j) % len(digits)].reshape(8, 8), np.ones((6, 6), np.float32))
            strips[i, :, :, 8 + j * 50: 8 + j * 50 + 48] = 1.0 - glyph
    return strips * 2 - 1


def main() -> None:
    data = digits_data()
    rows: list[dict[str, Any]] = []
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        cnn = build_digits_cnn(scratch / "digits_cnn.onnx")
        cnn_feed = {"input": data.x_test.reshape(-1, 1, 8, 8)}
        rows += _bench_model("digits-cnn", cnn, cnn_feed, {"input": data.x_train[:256].reshape(-1, 1, 8, 8)},
                             data.y_test, (300, 100), scratch)
        mlp = build_digits_mlp(scratch / "digits_mlp512.onnx", hidden=512)
        rows += _bench_model("digits-mlp-512", mlp, {"input": data.x_test}, {"input": data.x_train[:256]},
                             data.y_test, (300, 100), scratch)
        ocr = _ocr_model()
        if ocr is None:
            notes.append("PP-OCRv4 recognizer skipped: pip install --no-deps rapidocr_onnxruntime (make bench does)")
        else:
            images = _digit_strips(data.x_test, 64)
            calibration = {"x": _digit_strips(data.x_train, 32)}
            rows += _bench_model("ppocr-v4-rec (10.9 MB)", ocr, {"x": images}, calibration, None, (20, 3), scratch)
    columns = ["model", "precision", "size_kib", "size_ratio", "b1_ms", "b1_speedup", "b32_ms", "accuracy_%",
               "agreement_%"]
    print_table(rows, columns)
    for note in notes:
        print(note)
    write_results("packager", {"rows": rows, "notes": notes, "ort_version": ort.__version__})


if __name__ == "__main__":
    main()
