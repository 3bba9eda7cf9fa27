"""Model repository: several models, verified unpacking, live replacement with zero failed requests."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.bundle import open_bundle
from edge_agent.dataplane import DataPlane
from edge_agent.errors import BundleError, InvalidInputError, ModelNotReadyError, NotFoundError
from edge_agent.inference import InferRequest
from edge_agent.metrics import MetricsRegistry
from edge_agent.repository import ModelRepository
from edge_agent.trust import TrustStore
from packager.keys import SigningKey, generate_key
from tests.test_runtime import make_bundle, raw_run


@pytest.fixture
def trust(signing_key: SigningKey) -> TrustStore:
    return TrustStore([signing_key.public_key])


def model_dirs(workdir: Path, name: str) -> list[str]:
    folder = workdir / "models" / name
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("batching", [None, {"max_batch_size": 8, "max_queue_delay_us": 2000}])
def test_replace_under_load_fails_no_request(tmp_path: Path, signing_key: SigningKey, trust: TrustStore,
                                            digits_mlp: Path, digits: Any, batching: dict[str, Any] | None) -> None:
    v1 = make_bundle(tmp_path / "v1.edb", signing_key, digits_mlp, version=1, batching=batching)
    v2 = make_bundle(tmp_path / "v2.edb", signing_key, digits_mlp, version=2, batching=batching)
    x = digits.x_test[:4]
    want = raw_run(digits_mlp, x)[0]
    workdir = tmp_path / "work"

    async def main() -> None:
        repository = ModelRepository(workdir, trust)
        plane = DataPlane(repository, MetricsRegistry())
        await repository.load_bundle(v1)
        assert [d.split("-")[0] for d in model_dirs(workdir, "digits")] == ["1"]
        stop = asyncio.Event()
        versions: list[str] = []
        failures: list[BaseException] = []

        async def client() -> None:
            while not stop.is_set():
                try:
                    response = await plane.infer(InferRequest("digits", {"input": x}))
                    np.testing.assert_array_equal(response.outputs["label"], want)
                    versions.append(response.model_version)
                except Exception as exc:  # noqa: BLE001 - every failure is collected and asserted on
                    failures.append(exc)
                await asyncio.sleep(0)

        clients = [asyncio.create_task(client()) for _ in range(8)]
        try:
            while len(versions) < 50:
                await asyncio.sleep(0.001)
            await repository.load_bundle(v2)
            done = len(versions)
            while len(versions) < done + 50:
                await asyncio.sleep(0.001)
        finally:
            stop.set()
            await asyncio.gather(*clients)
        try:
            assert failures == []
            assert versions[0] == "1" and versions[-1] == "2" and set(versions) == {"1", "2"}
            assert [e["version"] for e in repository.index()] == ["2"]
            dirs = model_dirs(workdir, "digits")
            assert len(dirs) == 1 and dirs[0].startswith("2-")  # the old version's folder is gone
        finally:
            await repository.close()

    asyncio.run(main())


def test_several_models_index_and_unload(tmp_path: Path, signing_key: SigningKey, trust: TrustStore,
                                         digits_mlp: Path, digits_cnn: Path) -> None:
    mlp = make_bundle(tmp_path / "m.edb", signing_key, digits_mlp, name="mlp", version=3)
    cnn = make_bundle(tmp_path / "c.edb", signing_key, digits_cnn, name="cnn")

    async def main() -> None:
        repository = ModelRepository(tmp_path / "work", trust)
        plane = DataPlane(repository, MetricsRegistry())
        await repository.load_bundle(mlp)
        await plane.load("vision", cnn)  # the repository extension's load, with a name of our choosing
        try:
            assert repository.index() == [
                {"name": "mlp", "version": "3", "state": "READY", "reason": ""},
                {"name": "vision", "version": "1", "state": "READY", "reason": ""},
            ]
            answer = await plane.infer(InferRequest("vision", {"input": np.zeros((1, 1, 8, 8), np.float32)}))
            assert answer.outputs["probabilities"].shape == (1, 10)
            await plane.unload("mlp")
            assert [e["name"] for e in plane.repository_index()] == ["vision"]
            with pytest.raises(NotFoundError, match="mlp"):
                await plane.infer(InferRequest("mlp", {"input": np.zeros((1, 64), np.float32)}))
            with pytest.raises(NotFoundError):
                await repository.unload("mlp")
            with pytest.raises(InvalidInputError, match="bundle"):
                await plane.load("ghost", tmp_path / "missing.edb")
        finally:
            await repository.close()
        assert model_dirs(tmp_path / "work", "vision") == []

    asyncio.run(main())


def test_untrusted_or_tampered_bundle_is_refused_and_old_model_keeps_serving(
        tmp_path: Path, signing_key: SigningKey, trust: TrustStore, digits_mlp: Path) -> None:
    good = make_bundle(tmp_path / "good.edb", signing_key, digits_mlp)
    stranger = generate_key("stranger")
    untrusted = make_bundle(tmp_path / "untrusted.edb", stranger, digits_mlp, version=2)
    tampered = tmp_path / "tampered.edb"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    workdir = tmp_path / "work"

    async def main() -> None:
        repository = ModelRepository(workdir, trust)
        plane = DataPlane(repository, MetricsRegistry())
        await repository.load_bundle(good)
        try:
            for bad in (untrusted, tampered):
                with pytest.raises(BundleError):
                    await repository.load_bundle(bad)
            assert repository.index()[0]["version"] == "1" and plane.ready()
            assert len(model_dirs(workdir, "digits")) == 1
            staging = workdir / "models" / ".staging"
            assert not staging.exists() or not any(staging.iterdir())
        finally:
            await repository.close()

    asyncio.run(main())


def test_load_dir_serves_an_unpacked_slot(tmp_path: Path, signing_key: SigningKey, trust: TrustStore,
                                          digits_mlp: Path) -> None:
    bundle = make_bundle(tmp_path / "m.edb", signing_key, digits_mlp, version=5)
    slot = tmp_path / "slot-a"
    open_bundle(bundle, slot, trust)

    async def main() -> None:
        repository = ModelRepository(tmp_path / "work", trust)
        plane = DataPlane(repository, MetricsRegistry())
        await repository.load_dir(slot, "digits")
        try:
            assert plane.model_metadata("digits")["versions"] == ["5"]
        finally:
            await repository.close()
        assert (slot / "manifest.json").is_file()  # a slot the agent owns is never deleted by us

    asyncio.run(main())


def test_an_unready_model_answers_not_ready(tmp_path: Path, signing_key: SigningKey, trust: TrustStore,
                                            digits_mlp: Path) -> None:
    bundle = make_bundle(tmp_path / "m.edb", signing_key, digits_mlp)

    async def main() -> None:
        repository = ModelRepository(tmp_path / "work", trust)
        plane = DataPlane(repository, MetricsRegistry())
        await repository.load_bundle(bundle)
        try:
            entry = repository.get("digits")
            entry.state = type(entry.state).UNLOADING
            with pytest.raises(ModelNotReadyError):
                await plane.infer(InferRequest("digits", {"input": np.zeros((1, 64), np.float32)}))
            assert not plane.ready() and not plane.model_ready("digits")
        finally:
            await repository.close()

    asyncio.run(main())


def test_a_staging_candidate_does_not_disturb_score_or_readiness(tmp_path: Path, signing_key: SigningKey,
                                                                 trust: TrustStore, digits_mlp: Path) -> None:
    slot = tmp_path / "slot-b"
    open_bundle(make_bundle(tmp_path / "m.edb", signing_key, digits_mlp, version=2), slot, trust)

    async def main() -> None:
        repository = ModelRepository(tmp_path / "work", trust)
        plane = DataPlane(repository, MetricsRegistry())
        await repository.load_dir(slot, "digits")
        await repository.load_dir(slot, "digits-staging", staging=True)
        try:
            assert plane.default_model() == "digits" and plane.ready()
            answer = await plane.score(plane.default_model(), {"data": np.zeros((1, 64)).tolist()})
            assert len(answer["label"]) == 1
            assert plane.model_ready("digits-staging")  # still reachable by name for the health check
        finally:
            await repository.close()

    asyncio.run(main())
