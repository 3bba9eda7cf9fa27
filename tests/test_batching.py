"""Dynamic batching: concurrent requests of varying sizes answer exactly as unbatched runs do."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge_agent.batching import BatchSettings, DynamicBatcher
from edge_agent.dataplane import DataPlane
from edge_agent.errors import InferenceError, InvalidInputError
from edge_agent.inference import InferRequest
from edge_agent.metrics import MetricsRegistry
from edge_agent.repository import ModelRepository
from edge_agent.trust import TrustStore
from packager.keys import SigningKey
from tests.test_runtime import make_bundle, raw_run

BATCHING = {"max_batch_size": 16, "max_queue_delay_us": 20000, "preferred_batch_sizes": [8]}


def test_concurrent_requests_are_batched_and_answer_like_unbatched(tmp_path: Path, signing_key: SigningKey,
                                                                  digits_cnn: Path, digits: Any) -> None:
    bundle = make_bundle(tmp_path / "c.edb", signing_key, digits_cnn, name="cnn", batching=BATCHING)
    images = digits.x_test.reshape(-1, 1, 8, 8)
    sizes = [1 + (i % 4) for i in range(48)]
    starts = np.cumsum([0, *sizes[:-1]])
    requests = [images[s:s + n] for s, n in zip(starts, sizes, strict=True)]
    expected = [raw_run(digits_cnn, x)[0] for x in requests]

    async def main() -> None:
        metrics = MetricsRegistry()
        repository = ModelRepository(tmp_path / "work", TrustStore([signing_key.public_key]))
        plane = DataPlane(repository, metrics)
        await repository.load_bundle(bundle)
        try:
            bad = InferRequest("cnn", {"input": np.zeros((2, 1, 8, 7), np.float32)})
            calls = [plane.infer(InferRequest("cnn", {"input": x})) for x in requests]
            results = await asyncio.gather(*calls[:20], plane.infer(bad), *calls[20:], return_exceptions=True)
            assert isinstance(results[20], InvalidInputError) and "'input'" in str(results[20])
            answers = results[:20] + results[21:]
            for answer, want in zip(answers, expected, strict=True):
                assert not isinstance(answer, BaseException), answer
                np.testing.assert_allclose(answer.outputs["probabilities"], want, rtol=1e-5, atol=1e-6)
            batcher = repository.get("cnn").batcher
            assert batcher is not None
            assert max(batcher.batch_sizes) > 1
            assert sum(size * count for size, count in batcher.batch_sizes.items()) == sum(sizes)
            assert max(batcher.batch_sizes) <= 16
            snapshot = metrics.snapshot()["cnn"]
            assert snapshot["requests"] == 49 and snapshot["errors"] == 1 and snapshot["mean_batch_size"] > 1
        finally:
            await repository.close()

    asyncio.run(main())


def test_a_request_that_fails_inference_fails_alone() -> None:
    def infer(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if np.isnan(inputs["x"]).any():
            raise InferenceError("NaN in the input")
        return {"y": inputs["x"] * 2}

    async def main() -> None:
        batcher = DynamicBatcher(infer, BatchSettings(max_batch_size=8, max_queue_delay_us=50000))
        xs = [np.full((1, 3), i, np.float32) for i in range(6)]
        xs[3] = np.full((1, 3), np.nan, np.float32)
        try:
            results = await asyncio.gather(*(batcher.submit({"x": x}) for x in xs), return_exceptions=True)
        finally:
            await batcher.close()
        assert isinstance(results[3], InferenceError)
        for i, result in enumerate(results):
            if i != 3:
                assert not isinstance(result, BaseException), result
                np.testing.assert_array_equal(result["y"], xs[i] * 2)

    asyncio.run(main())


def test_requests_with_other_inner_shapes_do_not_share_a_batch() -> None:
    seen: list[tuple[int, ...]] = []

    def infer(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(inputs["x"].shape)
        return {"y": inputs["x"].sum(axis=1)}

    async def main() -> None:
        batcher = DynamicBatcher(infer, BatchSettings(max_batch_size=4, max_queue_delay_us=50000))
        xs = [np.ones((1, 2 + i % 2), np.float32) * i for i in range(8)]
        try:
            results = await asyncio.gather(*(batcher.submit({"x": x}) for x in xs))
        finally:
            await batcher.close()
        for x, result in zip(xs, results, strict=True):
            np.testing.assert_array_equal(result["y"], x.sum(axis=1))
        assert all(shape[0] <= 4 for shape in seen) and len(seen) < 8

    asyncio.run(main())


def fixed_batch_model(path: Path) -> Path:
    """An Identity model whose first dimension is fixed at 2: it cannot be batched."""
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "fixed",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_models_with_a_fixed_first_dimension_are_not_batched(tmp_path: Path, signing_key: SigningKey) -> None:
    bundle = make_bundle(tmp_path / "f.edb", signing_key, fixed_batch_model(tmp_path / "fixed.onnx"), name="fixed",
                         batching=BATCHING)

    async def main() -> None:
        repository = ModelRepository(tmp_path / "work", TrustStore([signing_key.public_key]))
        plane = DataPlane(repository, MetricsRegistry())
        await repository.load_bundle(bundle)
        try:
            assert repository.get("fixed").batcher is None
            x = np.arange(6, dtype=np.float32).reshape(2, 3)
            answers = await asyncio.gather(*(plane.infer(InferRequest("fixed", {"input": x})) for _ in range(4)))
            for answer in answers:
                np.testing.assert_array_equal(answer.outputs["output"], x)
            with pytest.raises(InvalidInputError, match="shape"):
                await plane.infer(InferRequest("fixed", {"input": np.zeros((3, 3), np.float32)}))
        finally:
            await repository.close()

    asyncio.run(main())


def test_a_lone_request_is_not_held_for_the_queue_delay(tmp_path: Path, signing_key: SigningKey,
                                                        digits_cnn: Path) -> None:
    slow = {"max_batch_size": 16, "max_queue_delay_us": 60_000_000}  # a minute: only a bug would wait it out
    bundle = make_bundle(tmp_path / "c.edb", signing_key, digits_cnn, name="cnn", batching=slow)

    async def main() -> None:
        repository = ModelRepository(tmp_path / "work", TrustStore([signing_key.public_key]))
        plane = DataPlane(repository, MetricsRegistry())
        await repository.load_bundle(bundle)
        try:
            x = np.zeros((1, 1, 8, 8), np.float32)
            answer = await asyncio.wait_for(plane.infer(InferRequest("cnn", {"input": x})), 30)
            assert answer.outputs["probabilities"].shape == (1, 10)
            batcher = repository.get("cnn").batcher
            assert batcher is not None and batcher.batch_sizes == {1: 1}
        finally:
            await repository.close()

    asyncio.run(main())
