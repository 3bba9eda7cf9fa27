"""Fuzz the controller's API from its own OpenAPI document: whatever schemathesis sends, never a 5xx,
and every answer has a documented status, content type and body.

Its own controller and broker, with no device: fuzzed deployments and rollouts order nobody.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.controller_env import TOKEN, ControllerFleet, controller_fleet

pytestmark = [pytest.mark.e2e, pytest.mark.soak]  # make soak: schemathesis over every operation
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerFleet]:
    with controller_fleet(tmp_path_factory.mktemp("control-fuzz"), (), [TOKEN]) as running:
        yield running


@pytest.fixture(scope="module")
def api_schema(fleet: ControllerFleet) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_dict(fleet.get("/openapi.json", token=None))
    schema.config.update(base_url=fleet.url)
    return schema


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_answers_as_documented(api_schema: schemathesis.BaseSchema, mode: GenerationMode) -> None:
    seen: dict[str, set[int]] = {}
    unsatisfiable: list[str] = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    if mode is GenerationMode.NEGATIVE:  # only what takes input can be given bad input
        operations = [op for op in operations if list(op.iter_parameters()) or list(op.body)]
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            response = case.call(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
            seen.setdefault(case.operation.label, set()).add(response.status_code)
            case.validate_response(response, checks=CHECKS)

        try:
            check()
        except Unsatisfiable:  # every input of it takes any string (a path id, a free-text filter)
            assert mode is GenerationMode.NEGATIVE, operation.label
            unsatisfiable.append(operation.label)
    assert len(seen) + len(unsatisfiable) == len(operations) and len(seen) >= 10  # every operation was reached
    if mode is GenerationMode.NEGATIVE:  # invalid input was refused as bad input, never with a 5xx
        assert sum(400 in codes for codes in seen.values()) >= 5
