"""Runtime and data plane on real onnxruntime sessions: providers, validation, /score, metadata."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edge_agent.bundle import BundleManifest
from edge_agent.dataplane import DataPlane
from edge_agent.errors import InvalidInputError, NotFoundError
from edge_agent.inference import InferRequest
from edge_agent.metrics import MetricsRegistry
from edge_agent.repository import ModelRepository
from edge_agent.runtime.onnx import choose_providers
from edge_agent.tensors import TensorSpec, onnx_type_to_v2
from edge_agent.trust import TrustStore
from packager.bundle import write_bundle
from packager.keys import SigningKey


def specs_of(model: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output specs as onnxruntime reports them (-1 for symbolic dims)."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])

    def spec(arg: Any) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
        return TensorSpec(arg.name, onnx_type_to_v2(arg.type), shape)

    return [spec(a) for a in session.get_inputs()], [spec(a) for a in session.get_outputs()]


def make_bundle(out: Path, key: SigningKey, model: Path | None = None, name: str = "digits", version: int = 1,
                batching: dict[str, Any] | None = None, providers: list[str] | None = None,
                entry: dict[str, Path | str | bytes] | None = None, requirements: str | None = None,
                samples: dict[str, Any] | None = None) -> Path:
    """A signed bundle of ``model`` (ONNX) or of an entry script (``entry``: bundle path -> source)."""
    payload: dict[str, Path | bytes] = {}
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    entry_doc = None
    if model is not None and model.suffix == ".onnx":
        payload["model/model.onnx"] = model
        inputs, outputs = specs_of(model)
    elif model is not None:
        payload[f"model/{model.name}"] = model
    runtime = {"backend": "onnxruntime", "model_path": "model/model.onnx", "precision": "fp32",
               "execution_providers": providers or ["CPUExecutionProvider"], "optimization_level": "all"}
    if entry is not None:
        for path, source in entry.items():
            payload[str(path)] = source.encode() if isinstance(source, str) else source
        runtime["backend"] = "entry-script"
        if model is not None:
            runtime["model_path"] = f"model/{model.name}"
        entry_doc = {"script": "src/score.py", "source_dir": "src", "requirements": None}
        if requirements is not None:
            payload["requirements.txt"] = requirements.encode()
            entry_doc["requirements"] = "requirements.txt"
    samples_doc = None
    if samples is not None:
        payload["samples/input.json"] = json.dumps(samples["input"]).encode()
        payload["samples/output.json"] = json.dumps(samples["output"]).encode()
        samples_doc = {"input": "samples/input.json", "output": "samples/output.json"}
    manifest = BundleManifest(model={"name": name, "version": version}, profile={"name": "cpu-x86_64"},
                              runtime=runtime, inputs=inputs, outputs=outputs, entry_script=entry_doc,
                              samples=samples_doc, batching=batching)
    write_bundle(out, manifest, payload, key)
    return out


def raw_run(model: Path, x: np.ndarray) -> list[np.ndarray]:
    """The reference answer: onnxruntime directly, no agent."""
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": x})


@pytest.fixture
def trust(signing_key: SigningKey) -> TrustStore:
    return TrustStore([signing_key.public_key])


def serve(tmp_path: Path, trust: TrustStore, bundles: dict[str, Path]) -> tuple[DataPlane, ModelRepository]:
    """A data plane over a repository holding ``bundles`` (loaded inside the caller's loop)."""
    repository = ModelRepository(tmp_path / "work", trust)
    return DataPlane(repository, MetricsRegistry()), repository


def test_choose_providers_falls_back_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        chosen = choose_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                                  ["CPUExecutionProvider"])
    assert chosen == ["CPUExecutionProvider"]
    assert "TensorrtExecutionProvider" in caplog.text and "CUDAExecutionProvider" in caplog.text


def test_mlp_infer_matches_onnxruntime_and_reports_metadata(tmp_path: Path, signing_key: SigningKey,
                                                           trust: TrustStore, digits_mlp: Path, digits: Any) -> None:
    bundle = make_bundle(tmp_path / "m.edb", signing_key, digits_mlp,
                         providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    x = digits.x_test[:5]

    async def main() -> None:
        plane, repository = serve(tmp_path, trust, {})
        await repository.load_bundle(bundle)
        try:
            assert plane.live() and plane.ready() and plane.model_ready("digits")
            meta = plane.model_metadata("digits")
            assert meta["versions"] == ["1"] and meta["state"] == "READY" and meta["platform"] == "onnxruntime"
            assert {t["name"] for t in meta["inputs"]} == {"input"}
            assert meta["parameters"]["execution_providers"] == ["CPUExecutionProvider"]
            response = await plane.infer(InferRequest("digits", {"input": x}))
            label, probabilities = raw_run(digits_mlp, x)
            np.testing.assert_array_equal(response.outputs["label"], label)
            np.testing.assert_allclose(response.outputs["probabilities"], probabilities, rtol=1e-6)
            only = await plane.infer(InferRequest("digits", {"input": x}, outputs=["label"]))
            assert list(only.outputs) == ["label"]
            scored = await plane.score("digits", {"data": x.tolist()})
            assert scored["label"] == label.tolist()
            scored = await plane.score("digits", json.dumps({"inputs": {"input": x.tolist()}}).encode())
            assert scored["label"] == label.tolist()
            assert plane.metrics.snapshot()["digits"]["requests"] == 4
        finally:
            await repository.close()

    asyncio.run(main())


def test_json_integers_convert_to_fp32(tmp_path: Path, signing_key: SigningKey, trust: TrustStore,
                                       digits_mlp: Path) -> None:
    bundle = make_bundle(tmp_path / "m.edb", signing_key, digits_mlp)

    async def main() -> None:
        plane, repository = serve(tmp_path, trust, {})
        await repository.load_bundle(bundle)
        try:
            ints = np.zeros((2, 64), dtype=np.int64)
            with pytest.raises(InvalidInputError, match=r"datatype INT64\); the model expects FP32"):
                await plane.infer(InferRequest("digits", {"input": ints}))  # a typed tensor is taken at its word
            scored = await plane.score("digits", {"data": [[0] * 64]})
            assert len(scored["label"]) == 1
        finally:
            await repository.close()

    asyncio.run(main())


@pytest.mark.parametrize(("inputs", "outputs", "needle"), [
    ({"pixels": np.zeros((1, 64), np.float32)}, None, "pixels"),
    ({}, None, "missing"),
    ({"input": np.zeros((1, 63), np.float32)}, None, "'input' has shape [1, 63]"),
    ({"input": np.zeros((64,), np.float32)}, None, "'input' has shape [64]"),
    ({"input": np.array([["a"] * 64])}, None, "'input' has dtype"),
    ({"input": np.zeros((1, 64), np.float64) + 0.1}, None, "'input' has dtype float64"),
    ({"input": np.zeros((1, 64), np.float32)}, ["logits"], "logits"),
])
def test_bad_requests_are_invalid_input_naming_the_problem(tmp_path: Path, signing_key: SigningKey,
                                                           trust: TrustStore, digits_mlp: Path,
                                                           inputs: dict[str, np.ndarray], outputs: list[str] | None,
                                                           needle: str) -> None:
    bundle = make_bundle(tmp_path / "m.edb", signing_key, digits_mlp)

    async def main() -> None:
        plane, repository = serve(tmp_path, trust, {})
        await repository.load_bundle(bundle)
        try:
            with pytest.raises(InvalidInputError, match=needle.replace("[", r"\[").replace("]", r"\]")):
                await plane.infer(InferRequest("digits", inputs, outputs=outputs))
            good = await plane.infer(InferRequest("digits", {"input": np.zeros((1, 64), np.float32)}))
            assert good.outputs["label"].shape == (1,)
            assert plane.metrics.snapshot()["digits"]["errors"] == 1
        finally:
            await repository.close()

    asyncio.run(main())


def test_bad_score_bodies_and_unknown_models(tmp_path: Path, signing_key: SigningKey, trust: TrustStore,
                                             digits_mlp: Path) -> None:
    bundle = make_bundle(tmp_path / "m.edb", signing_key, digits_mlp)

    async def main() -> None:
        plane, repository = serve(tmp_path, trust, {})
        await repository.load_bundle(bundle)
        try:
            deep = b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # recursed past Python's stack before
            for body in (b"{not json", {"rows": [[0] * 64]}, {"data": [[0] * 10]}, {"data": "abc"}, deep,
                         b'{"data": [[1e400]]}'):
                with pytest.raises(InvalidInputError):
                    await plane.score("digits", body)
            with pytest.raises(NotFoundError):
                await plane.infer(InferRequest("nope", {"input": np.zeros((1, 64), np.float32)}))
            with pytest.raises(NotFoundError):
                plane.model_metadata("digits", "7")
        finally:
            await repository.close()

    asyncio.run(main())


def test_cnn_and_samples(tmp_path: Path, signing_key: SigningKey, trust: TrustStore, digits_cnn: Path,
                         digits: Any) -> None:
    x = digits.x_test[:3].reshape(3, 1, 8, 8)
    sample_in = {"data": x.tolist()}
    sample_out = {"probabilities": raw_run(digits_cnn, x)[0].tolist()}
    bundle = make_bundle(tmp_path / "c.edb", signing_key, digits_cnn, name="cnn",
                         samples={"input": sample_in, "output": sample_out})

    async def main() -> None:
        plane, repository = serve(tmp_path, trust, {})
        await repository.load_bundle(bundle)
        try:
            assert plane.model_samples("cnn") == (sample_in, sample_out)
            scored = await plane.score("cnn", sample_in)
            np.testing.assert_allclose(scored["probabilities"], sample_out["probabilities"], rtol=1e-5)
            assert plane.model_schema("cnn") is None
        finally:
            await repository.close()

    asyncio.run(main())


def test_unknown_backend_is_refused_with_the_known_ones(tmp_path: Path, signing_key: SigningKey,
                                                        trust: TrustStore, digits_mlp: Path) -> None:
    from edge_agent.bundle import read_manifest
    from edge_agent.errors import BundleError

    bundle = make_bundle(tmp_path / "m.edb", signing_key, digits_mlp)
    manifest, _ = read_manifest(bundle, trust)
    manifest.runtime["backend"] = "tflite"
    payload = {"model/model.onnx": digits_mlp}
    write_bundle(tmp_path / "t.edb", manifest, payload, signing_key)

    async def main() -> None:
        repository = ModelRepository(tmp_path / "work", trust)
        try:
            with pytest.raises(BundleError, match="tflite.*onnxruntime"):
                await repository.load_bundle(tmp_path / "t.edb")
            assert repository.index() == []
        finally:
            await repository.close()

    asyncio.run(main())


def test_metrics_histogram_percentiles_and_batches_are_consistent() -> None:
    metrics = MetricsRegistry()
    for ms in range(1, 101):
        metrics.observe("m", float(ms), ok=ms % 10 != 0)
    metrics.observe_batch("m", 4)
    metrics.observe_batch("m", 8)
    summary = metrics.snapshot()["m"]
    assert summary["requests"] == 100 and summary["errors"] == 10
    assert 49 <= summary["p50_ms"] <= 51 and 94 <= summary["p95_ms"] <= 96 and 98 <= summary["p99_ms"] <= 100
    assert summary["batches"] == 2 and summary["mean_batch_size"] == 6
    cumulative, total, count, errors = metrics.histograms()["m"]
    assert cumulative[-1] == count == 100 and errors == 10 and total == sum(range(1, 101))
    assert cumulative == sorted(cumulative) and cumulative[2] == 1  # only 1 ms falls in the <= 1 ms bucket
