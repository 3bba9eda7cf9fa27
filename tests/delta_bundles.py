"""Bundles for the delta-update tests: a digits MLP (skl2onnx) in an onnxruntime bundle, and its updates.

``DigitsModels`` holds three exports of one network shape: the base, the same network with only its last
layer retrained (``head``), and a network trained from another seed (``full``). ``onnx_bundle`` signs one
of them into a bundle with an input sample, so a real agent can load and health-check it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_agent.bundle import BundleManifest, canonical_json
from edge_agent.profiles import load_profile
from edge_agent.tensors import TensorSpec
from packager.bundle import write_bundle
from packager.examples import build_digits_deep_mlp, digits_data
from packager.keys import SigningKey

__all__ = ["DigitsModels", "build_digits_models", "onnx_bundle"]

HIDDEN = (128, 64)  # 68 KB of weights, 2.5 KB of them in the last layer


@dataclass(frozen=True)
class DigitsModels:
    base: Path
    head: Path
    full: Path


def build_digits_models(folder: Path) -> DigitsModels:
    """The three ONNX files (a few seconds of training, so build them once per session)."""
    return DigitsModels(build_digits_deep_mlp(folder / "base.onnx", HIDDEN, max_iter=60),
                        build_digits_deep_mlp(folder / "head.onnx", HIDDEN, head_seed=1, max_iter=60),
                        build_digits_deep_mlp(folder / "full.onnx", HIDDEN, seed=1, max_iter=60))


def onnx_bundle(out: Path, model: Path, key: SigningKey, version: int, sample_row: int = 0,
                script: bytes | None = None) -> Path:
    """A signed onnxruntime bundle of ``model`` (model name ``digits``) with one test digit as input sample.

    With ``script`` the bundle runs that entry script (``src/score.py``) beside the model.
    """
    row = [round(float(v), 4) for v in digits_data().x_test[sample_row]]
    manifest = BundleManifest(
        model={"name": "digits", "version": version}, profile=load_profile("cpu-x86_64").to_dict(),
        runtime={"backend": "onnxruntime", "model_path": "model/model.onnx", "precision": "fp32",
                 "execution_providers": ["CPUExecutionProvider"], "optimization_level": "basic"},
        inputs=[TensorSpec("input", "FP32", (-1, 64))],
        outputs=[TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 10))],
        samples={"input": "samples/input.json", "output": None},
        entry_script=None if script is None else {"script": "src/score.py", "source_dir": "src", "requirements": None},
    )
    if script is not None:
        manifest.runtime["backend"] = "entry-script"
    payload: dict[str, Path | bytes] = {"model/model.onnx": model,
                                        "samples/input.json": canonical_json({"data": [row]})}
    if script is not None:
        payload["src/score.py"] = script
    write_bundle(out, manifest, payload, key, {"model/model.onnx": "model", "samples/input.json": "sample"})
    return out
