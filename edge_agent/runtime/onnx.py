"""The onnxruntime backend: execution providers from the bundle, in order, falling back when missing."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_agent.bundle import BundleManifest
from edge_agent.errors import BundleError
from edge_agent.runtime.base import ModelInfo, TensorScoring
from edge_agent.tensors import V2_TO_NUMPY, onnx_type_to_v2

__all__ = ["OnnxModel", "choose_providers", "load"]

log = logging.getLogger(__name__)
_PROBE_RUNS = 20
_INLINE_BELOW_S = 50e-6  # about the cost of handing a call to a worker thread and back


def choose_providers(wanted: list[str], available: list[str] | None = None) -> list[str]:
    """The wanted providers this machine has, in order; a missing one is skipped with a warning."""
    available = available if available is not None else ort.get_available_providers()
    chosen = []
    for provider in wanted:
        if provider in available:
            chosen.append(provider)
        else:
            log.warning("execution provider %s is not available here; falling back to the next one", provider)
    return chosen or ["CPUExecutionProvider"]


def _intra_op_threads() -> int:
    """EDGEDEPLOY_INTRA_OP_THREADS, else every core up to 4 (small edge CPUs, no spinning pool)."""
    configured = os.environ.get("EDGEDEPLOY_INTRA_OP_THREADS")
    if configured and configured.isdigit():
        return int(configured)
    return max(1, min(os.cpu_count() or 1, 4))


class OnnxModel(TensorScoring):
    """One onnxruntime session; ``infer`` is safe to call from several threads."""

    def __init__(self, path: Path, info: ModelInfo, providers: list[str]) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = _intra_op_threads()
        # requests already run concurrently in worker threads: one inter-op thread avoids oversubscription
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types are not exported
            raise BundleError(f"onnxruntime cannot load {path.name}: {exc}") from None
        self.info = info
        self.info.details["execution_providers"] = self.session.get_providers()
        self._output_names = [o.name for o in self.session.get_outputs()]
        self.inline = self._is_tiny()

    def _is_tiny(self) -> bool:
        """Whether a batch-1 inference takes so little time that a worker-thread hop would cost more.

        Such a model runs on the event loop itself: it blocks the loop for less than the hop.
        """
        rng = np.random.default_rng(0)
        try:
            feed = {arg.name: rng.random([d if isinstance(d, int) and d > 0 else 1 for d in arg.shape or []])
                    .astype(np.dtype(V2_TO_NUMPY[onnx_type_to_v2(arg.type)])) for arg in self.session.get_inputs()}
            self.session.run(self._output_names, feed)
            start = time.perf_counter()
            for runs in range(1, _PROBE_RUNS + 1):
                self.session.run(self._output_names, feed)
                if time.perf_counter() - start > _INLINE_BELOW_S * runs * 4:
                    return False  # clearly not tiny: stop probing a big model early
        except Exception:  # noqa: BLE001 - a probe that cannot run says nothing: keep the safe path
            return False
        return (time.perf_counter() - start) / _PROBE_RUNS < _INLINE_BELOW_S

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self._output_names, inputs)
        return dict(zip(self._output_names, values, strict=True))

    def unload(self) -> None:
        del self.session


def load(bundle_dir: Path, manifest: BundleManifest, info: ModelInfo) -> OnnxModel:
    """Load the bundle's ONNX model with its execution providers (see :func:`choose_providers`)."""
    model_path = bundle_dir / str(manifest.runtime.get("model_path", "model/model.onnx"))
    if not model_path.is_file():
        raise BundleError(f"the bundle has no model file at {model_path.relative_to(bundle_dir)}")
    providers = choose_providers(list(manifest.runtime.get("execution_providers") or ["CPUExecutionProvider"]))
    return OnnxModel(model_path, info, providers)
