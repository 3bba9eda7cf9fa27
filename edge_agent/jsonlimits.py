"""JSON from untrusted senders, parsed only after its size and nesting depth are known to be bounded.

Python's parser recurses once per nesting level: 100,000 ``[`` in a 200 KB message raise
``RecursionError`` (not ``ValueError``) deep inside it. Every document that arrives from a broker, a
request body, or a bundle that is not yet trusted goes through :func:`loads_bounded` instead.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edge_agent.errors import ValidationError, brief

__all__ = ["DEFAULT_MAX_DEPTH", "check_depth", "loads_bounded"]

DEFAULT_MAX_DEPTH = 64  # far beyond any manifest, order or V2 request; far below the interpreter's limit
# A JSON string (escapes included) or a single bracket: strings are skipped whole, so brackets in
# them do not count.
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)
_OPEN = frozenset(b"[{")


def check_depth(data: bytes, max_depth: int = DEFAULT_MAX_DEPTH, what: str = "JSON document") -> None:
    """Raise ValidationError when ``data`` nests arrays/objects more than ``max_depth`` deep."""
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return  # too few brackets to nest that deep, strings or not: the common case, at C speed
    depth = 0
    for match in _TOKENS.finditer(data):
        char = match.group()[0]
        if char in _OPEN:
            depth += 1
            if depth > max_depth:
                raise ValidationError(f"{what} nests deeper than {max_depth} levels")
        elif char != 0x22:  # a closing bracket, not a string
            depth -= 1


def loads_bounded(
    data: bytes | str,
    max_bytes: int | None = None,
    max_depth: int = DEFAULT_MAX_DEPTH,
    what: str = "JSON document",
) -> Any:
    """Parse JSON whose size and depth are checked first; every failure is a ValidationError.

    Numbers too large for a float (``1e400``) parse as infinity in Python's parser; they are refused
    here, since no field of ours means infinity.
    """
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if max_bytes is not None and len(raw) > max_bytes:
        raise ValidationError(f"{what} is {len(raw)} bytes, over the limit of {max_bytes}")
    check_depth(raw, max_depth, what)
    try:
        return _DECODER.decode(data if isinstance(data, str) else raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValidationError(f"{what} is not valid JSON: {brief(exc, 200)}") from None


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


# Built once (json.loads with hooks builds a decoder per call). The C scanner calls the hooks only for
# numbers with a fraction or an exponent and for the NaN/Infinity constants: cheaper than a pass over
# the text to find out whether it has any.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
