"""An example runtime backend from a third-party package: ``y = x @ W + b`` with numpy alone.

The bundle carries ``model/affine.npz`` (arrays ``weights`` [in, out] and ``bias`` [out]) and its
manifest says ``"runtime": {"backend": "affine", "model_path": "model/affine.npz"}``. The package
declares the backend with one entry point::

    [project.entry-points."edgedeploy.runtimes"]
    affine = "edgedeploy_affine:load"

``TensorScoring`` gives ``/score`` (``{"data": ...}`` in, every output as lists out), ``inputs``,
``outputs``, ``schema`` and the ``inline``/``failure`` defaults; the backend supplies ``infer``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_agent.bundle import BundleManifest
from edge_agent.errors import BundleError
from edge_agent.runtime import ModelInfo, TensorScoring


class AffineModel(TensorScoring):
    """One matrix product and a bias: far cheaper than a hop to a worker thread, so it runs inline."""

    def __init__(self, weights: np.ndarray, bias: np.ndarray, info: ModelInfo) -> None:
        self.weights, self.bias, self.info = weights, bias, info
        self.inline = True

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The single input times the weights, plus the bias, as the single output."""
        x = inputs[self.info.inputs[0].name]
        return {self.info.outputs[0].name: (x @ self.weights + self.bias).astype(np.float32)}

    def unload(self) -> None:
        """Nothing to release beyond the arrays."""


def load(bundle_dir: Path, manifest: BundleManifest, info: ModelInfo) -> AffineModel:
    """Read the bundle's weights; a missing or malformed file refuses the bundle."""
    path = bundle_dir / str(manifest.runtime.get("model_path", "model/affine.npz"))
    try:
        with np.load(path) as arrays:
            weights, bias = arrays["weights"].astype(np.float32), arrays["bias"].astype(np.float32)
    except (OSError, KeyError, ValueError) as exc:
        raise BundleError(f"the affine backend cannot read {path.name}: {exc}") from None
    info.details["accelerator"] = "numpy"
    return AffineModel(weights, bias, info)
