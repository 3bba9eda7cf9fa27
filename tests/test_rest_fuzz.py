"""Fuzz the REST API from its own OpenAPI document: whatever schemathesis sends, never a 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from packager.examples import build_digits_mlp, digits_data
from packager.keys import generate_key
from packager.packaging import package
from tests.servers import get, serving


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("fuzz")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEDEPLOY_HOME", str(folder / "home"))
    try:
        generate_key()
        data = digits_data()
        (folder / "sample.json").write_text(json.dumps({"data": data.x_test[:1].tolist()}))
        bundle = package(build_digits_mlp(folder / "digits.onnx"), "cpu-x86_64", folder / "digits.edb",
                         quantize="none", input_sample=folder / "sample.json").bundle_path
        with serving(folder / "work", [bundle]) as running:
            yield running.http
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def api_schema(live_api: str) -> schemathesis.BaseSchema:
    document = json.loads(get(live_api + "/swagger.json")[1])
    schema = schemathesis.openapi.from_dict(document)
    schema.config.update(base_url=live_api)
    return schema


def test_score_never_answers_5xx(api_schema: schemathesis.BaseSchema) -> None:
    operation = api_schema["/score"]["POST"]
    seen: set[int] = set()

    @given(case=operation.as_strategy())
    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: schemathesis.Case) -> None:
        response = case.call()
        seen.add(response.status_code)
        assert response.status_code < 500, response.text
        assert response.status_code in (200, 400, 413), response.text

    check()
    assert 400 in seen  # the fuzzer did reach the model with bodies it refuses
