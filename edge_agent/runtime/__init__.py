"""Runtime backends (onnxruntime, entry scripts, FPGA) behind one small interface, found by entry points.

Entry scripts find their model folder with :func:`get_model_dir` or the ``AZUREML_MODEL_DIR`` /
``EDGEDEPLOY_MODEL_DIR`` environment variables.
"""

from __future__ import annotations

import os
from pathlib import Path

from edge_agent.runtime.base import (
    CURRENT_MODEL_DIR,
    LoadedModel,
    ModelInfo,
    ModelSpecs,
    RuntimeBackend,
    TensorScoring,
    installed_backends,
    load_model,
)

__all__ = ["LoadedModel", "ModelInfo", "ModelSpecs", "RuntimeBackend", "TensorScoring", "get_model_dir",
           "installed_backends", "load_model"]


def get_model_dir() -> Path:
    """The folder holding the calling entry script's model files (``<bundle>/model``).

    Inside ``init()`` and ``run()`` this is the folder of the model being called, even with
    several entry-script models loaded; elsewhere it falls back to ``EDGEDEPLOY_MODEL_DIR``.
    """
    current = CURRENT_MODEL_DIR.get()
    if current is not None:
        return current
    value = os.environ.get("EDGEDEPLOY_MODEL_DIR") or os.environ.get("AZUREML_MODEL_DIR")
    if not value:
        raise RuntimeError("no model is being served: EDGEDEPLOY_MODEL_DIR is not set")
    return Path(value)
