"""Entry-script models: Azure ML-style score.py with init()/run(), pickled scikit-learn, inference-schema."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from edge_agent.dataplane import DataPlane
from edge_agent.errors import BundleError, InferenceError, ModelNotReadyError
from edge_agent.inference import InferRequest
from edge_agent.metrics import MetricsRegistry
from edge_agent.repository import ModelRepository
from edge_agent.runtime.entry_script import ensure_requirements
from edge_agent.trust import TrustStore
from packager.keys import SigningKey
from tests.test_runtime import make_bundle

SKLEARN_SCORE = '''
import json
import os
import joblib
from helpers.prep import to_rows
from edge_agent.runtime import get_model_dir

def init():
    global model, api_dir
    model = joblib.load(os.path.join(os.environ["AZUREML_MODEL_DIR"], "model.pkl"))
    api_dir = str(get_model_dir())
    assert api_dir == os.environ["EDGEDEPLOY_MODEL_DIR"] == os.environ["AZUREML_MODEL_DIR"]

def run(raw_data):
    if isinstance(raw_data, bytes):
        return {"bytes": len(raw_data), "head": raw_data[:4].hex()}
    data = json.loads(raw_data)["data"]
    if data == "boom":
        raise ValueError("cannot score boom")
    return {"labels": model.predict(to_rows(data)).tolist(), "model_dir": api_dir}
'''

SCHEMA_SCORE = '''
import numpy as np
import pandas as pd
from inference_schema.schema_decorators import input_schema, output_schema
from inference_schema.parameter_types.numpy_parameter_type import NumpyParameterType
from inference_schema.parameter_types.pandas_parameter_type import PandasParameterType
from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType

def init():
    pass

@input_schema("data", NumpyParameterType(np.array([[1.0, 2.0, 3.0]])))
@input_schema("frame", PandasParameterType(pd.DataFrame({"a": [1.0], "b": [2.0]})))
@input_schema("scale", StandardPythonParameterType(1.0))
@output_schema(StandardPythonParameterType({"row_sums": [6.0], "frame_sum": 3.0}))
def run(data, frame, scale):
    assert isinstance(data, np.ndarray) and isinstance(frame, pd.DataFrame)
    return {"row_sums": (data.sum(axis=1) * scale).tolist(), "frame_sum": float(frame.to_numpy().sum())}
'''


@pytest.fixture(scope="module")
def sklearn_model(tmp_path_factory: pytest.TempPathFactory, digits: Any) -> tuple[Path, LogisticRegression]:
    estimator = LogisticRegression(max_iter=300).fit(digits.x_train, digits.y_train)
    path = tmp_path_factory.mktemp("sk") / "model.pkl"
    joblib.dump(estimator, path)
    return path, estimator


def loaded(tmp_path: Path, key: SigningKey, bundles: dict[str, Path]) -> tuple[DataPlane, ModelRepository]:
    repository = ModelRepository(tmp_path / "work", TrustStore([key.public_key]))
    return DataPlane(repository, MetricsRegistry()), repository


def test_pickled_sklearn_script_scores_json_and_bytes(tmp_path: Path, signing_key: SigningKey, digits: Any,
                                                      sklearn_model: tuple[Path, LogisticRegression]) -> None:
    model_file, estimator = sklearn_model
    bundle = make_bundle(tmp_path / "s.edb", signing_key, model_file, name="sk", requirements="scikit-learn\njoblib\n",
                         entry={"src/score.py": SKLEARN_SCORE,
                                "src/helpers/__init__.py": "",
                                "src/helpers/prep.py": "import numpy as np\n\ndef to_rows(d):\n"
                                                       "    return np.asarray(d, dtype=np.float32)\n"})
    x = digits.x_test[:6]

    async def main() -> None:
        plane, repository = loaded(tmp_path, signing_key, {})
        await repository.load_bundle(bundle)
        try:
            meta = plane.model_metadata("sk")
            assert meta["state"] == "READY" and meta["platform"] == "entry-script"
            answer = await plane.score("sk", {"data": x.tolist()})
            assert answer["labels"] == estimator.predict(x).tolist()
            assert answer["model_dir"].endswith("/model") and Path(answer["model_dir"], "model.pkl").is_file()
            image = b"\x89PNG\r\n\x1a\n" + bytes(100)
            assert await plane.score("sk", image, "image/png") == {"bytes": 108, "head": "89504e47"}
            with pytest.raises(InferenceError, match="cannot score boom"):
                await plane.score("sk", {"data": "boom"})
            again = await plane.score("sk", b'{"data": ' + str(x[:1].tolist()).encode() + b"}", "application/json")
            assert again["labels"] == estimator.predict(x[:1]).tolist()
            assert not (tmp_path / "work" / "deps").exists()  # requirements already satisfied
            assert plane.metrics.snapshot()["sk"]["errors"] == 1
        finally:
            await repository.close()

    asyncio.run(main())


def test_failing_init_leaves_model_unavailable_with_reason(tmp_path: Path, signing_key: SigningKey,
                                                           digits_mlp: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken = make_bundle(tmp_path / "b.edb", signing_key, None, name="broken",
                         entry={"src/score.py": "def init():\n    raise FileNotFoundError('no weights.bin')\n\n"
                                                "def run(data):\n    return data\n"})
    healthy = make_bundle(tmp_path / "h.edb", signing_key, digits_mlp, name="mlp")

    async def main() -> None:
        plane, repository = loaded(tmp_path, signing_key, {})
        with caplog.at_level(logging.ERROR):
            await repository.load_bundle(broken)
        await repository.load_bundle(healthy)
        try:
            assert "no weights.bin" in caplog.text
            meta = plane.model_metadata("broken")
            assert meta["state"] == "UNAVAILABLE" and "no weights.bin" in meta["reason"]
            assert not plane.model_ready("broken") and not plane.ready()
            assert repository.index()[0] == {"name": "broken", "version": "1", "state": "UNAVAILABLE",
                                             "reason": "init() failed: FileNotFoundError: no weights.bin"}
            with pytest.raises(ModelNotReadyError, match="no weights.bin"):
                await plane.score("broken", {"data": 1})
            answer = await plane.infer(InferRequest("mlp", {"input": np.zeros((1, 64), np.float32)}))
            assert answer.outputs["label"].shape == (1,)
        finally:
            await repository.close()

    asyncio.run(main())


def test_a_failing_new_version_does_not_replace_a_ready_one(tmp_path: Path, signing_key: SigningKey) -> None:
    good = make_bundle(tmp_path / "g.edb", signing_key, None, name="echo", version=1,
                       entry={"src/score.py": "import json\n\ndef run(raw):\n"
                                             "    return {'echo': json.loads(raw)['data']}\n"})
    bad = make_bundle(tmp_path / "b.edb", signing_key, None, name="echo", version=2,
                      entry={"src/score.py": "def init():\n    1 / 0\n\ndef run(data):\n    return data\n"})

    async def main() -> None:
        plane, repository = loaded(tmp_path, signing_key, {})
        await repository.load_bundle(good)
        try:
            with pytest.raises(ModelNotReadyError, match="ZeroDivisionError"):
                await repository.load_bundle(bad)
            assert await plane.score("echo", {"data": [1, 2]}) == {"echo": [1, 2]}
            assert plane.model_metadata("echo")["versions"] == ["1"]
        finally:
            await repository.close()

    asyncio.run(main())


def test_inference_schema_script_runs_unchanged_and_exposes_its_schema(tmp_path: Path,
                                                                       signing_key: SigningKey) -> None:
    bundle = make_bundle(tmp_path / "s.edb", signing_key, None, name="schema", entry={"src/score.py": SCHEMA_SCORE})

    async def main() -> None:
        plane, repository = loaded(tmp_path, signing_key, {})
        await repository.load_bundle(bundle)
        try:
            body = {"data": [[1, 2, 3], [4, 5, 6]], "frame": [{"a": 1.5, "b": 2.5}], "scale": 2.0}
            assert await plane.score("schema", body) == {"row_sums": [12.0, 30.0], "frame_sum": 4.0}
            schema = plane.model_schema("schema")
            assert schema is not None
            properties = schema["input"]["properties"]
            assert set(properties) == {"data", "frame", "scale"}
            assert properties["data"]["type"] == "array" and properties["scale"]["type"] == "number"
            assert schema["output"]["type"] == "object"
        finally:
            await repository.close()

    asyncio.run(main())


def test_unsatisfied_requirements_fail_clearly_when_pip_cannot_install(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no network here: pip must fail fast, not retry a mirror
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("numpy>=1.0  # satisfied\nedgedeploy-no-such-package==9.9\n")
    with pytest.raises(BundleError, match="edgedeploy-no-such-package"):
        ensure_requirements(requirements, tmp_path / "deps")
    requirements.write_text("numpy\npackaging>=20\n")
    assert ensure_requirements(requirements, tmp_path / "deps") is None
    assert not (tmp_path / "deps").exists()


def test_replacing_a_script_imports_the_new_versions_helpers(tmp_path: Path, signing_key: SigningKey) -> None:
    def bundle(version: int, factor: int) -> Path:
        return make_bundle(tmp_path / f"v{version}.edb", signing_key, None, name="scaled", version=version,
                           entry={"src/score.py": "import json\n"
                                                  "from helpers.prep import FACTOR\n\n"
                                                  "def run(raw):\n"
                                                  "    return [x * FACTOR for x in json.loads(raw)['data']]\n",
                                  "src/helpers/__init__.py": "", "src/helpers/prep.py": f"FACTOR = {factor}\n"})

    async def main() -> None:
        plane, repository = loaded(tmp_path, signing_key, {})
        await repository.load_bundle(bundle(1, 2))
        try:
            assert await plane.score("scaled", {"data": [1, 2]}) == [2, 4]
            await repository.load_bundle(bundle(2, 10))
            assert await plane.score("scaled", {"data": [1, 2]}) == [10, 20]
            assert plane.model_metadata("scaled")["versions"] == ["2"]
        finally:
            await repository.close()

    asyncio.run(main())
