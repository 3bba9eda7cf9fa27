"""The ``/score`` body of tensor backends, parsed into named inputs (no backend imported here).

Accepted shapes: ``{"data": x}`` for a single-input model, ``{"data": {name: x, ...}}`` or
``{"inputs": {name: x, ...}}`` for any model. The body arrives from the network: it is parsed with
bounded size and depth, and every refusal is an InvalidInputError (HTTP 400).
"""

from __future__ import annotations

from typing import Any

from edge_agent.errors import InvalidInputError, ValidationError
from edge_agent.jsonlimits import loads_bounded

__all__ = ["parse_score_body"]


def parse_score_body(body: Any, input_names: list[str]) -> dict[str, Any]:
    """``body`` (JSON bytes/str or an already parsed object) as ``{input name: value}``."""
    if isinstance(body, bytes | bytearray | str):
        try:
            body = loads_bounded(bytes(body) if isinstance(body, bytearray) else body, what="the /score body")
        except ValidationError as exc:
            raise InvalidInputError(f"{exc}; send JSON such as {{\"data\": [[...]]}}") from None
    if not isinstance(body, dict) or not ({"data", "inputs"} & set(body)):
        raise InvalidInputError("the /score body must be a JSON object with a 'data' (or 'inputs') field")
    value = body.get("inputs", body.get("data"))
    if isinstance(value, dict):
        return value
    if len(input_names) != 1:
        raise InvalidInputError(f"this model has several inputs {input_names}: send {{\"data\": {{name: value}}}}")
    return {input_names[0]: value}
