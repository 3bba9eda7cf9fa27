"""Measurements of a model on this machine: predictions, accuracy or agreement, batch-1 latency."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

__all__ = ["Predictor", "accuracy_points", "agreement_points", "batch1_latency_ms"]


class Predictor:
    """An onnxruntime session on the CPU that returns class predictions for a batch."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.session.run(None, inputs))

    def classes(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Predicted class per row: an integer label output, else argmax of a [N, C] float output."""
        outputs = self.run(inputs)
        for out in outputs:
            if out.ndim == 1 and np.issubdtype(out.dtype, np.integer):
                return out
        for out in outputs:
            if out.ndim == 2 and np.issubdtype(out.dtype, np.floating):
                return np.asarray(out.argmax(axis=1))
        return np.asarray(outputs[0]).reshape(len(outputs[0]), -1).argmax(axis=1)


def accuracy_points(predictor: Predictor, inputs: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """Top-1 accuracy in percentage points."""
    return float((predictor.classes(inputs) == labels.reshape(-1)).mean() * 100.0)


def agreement_points(reference: Predictor, candidate: Predictor, inputs: dict[str, np.ndarray]) -> float:
    """How often (percent) the candidate's top-1 prediction equals the reference's."""
    return float((reference.classes(inputs) == candidate.classes(inputs)).mean() * 100.0)


def batch1_latency_ms(predictor: Predictor, inputs: dict[str, np.ndarray], runs: int = 50) -> float:
    """Median latency of a batch-1 inference in milliseconds, after a short warm-up."""
    one = {name: value[:1] for name, value in inputs.items()}
    for _ in range(5):
        predictor.run(one)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predictor.run(one)
        times.append((time.perf_counter() - start) * 1000.0)
    return round(statistics.median(times), 4)
