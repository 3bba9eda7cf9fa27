"""The one table from error class to wire status, read by both serving adapters.

REST answers the HTTP status, gRPC the status code named here (a name, so this module imports no
transport). Rows are matched in order with ``isinstance``: a subclass gets its own row only where
it must answer differently from its parent; every :class:`~edge_agent.errors.BundleError` (signature,
trust, integrity, unsafe archive) answers like its base.
"""

from __future__ import annotations

from edge_agent.errors import (
    AlreadyExistsError,
    AuthError,
    BundleError,
    EdgeDeployError,
    InferenceError,
    InvalidInputError,
    ModelNotReadyError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    UnavailableError,
    UsageError,
    ValidationError,
)

__all__ = ["STATUS_TABLE", "WireStatus", "grpc_code_name", "http_status"]

WireStatus = tuple[int, str]  # (HTTP status, gRPC status code name)

STATUS_TABLE: tuple[tuple[type[EdgeDeployError], WireStatus], ...] = (
    (PayloadTooLargeError, (413, "RESOURCE_EXHAUSTED")),  # what grpc answers for its own size limit
    (OverloadedError, (503, "RESOURCE_EXHAUSTED")),
    (InvalidInputError, (400, "INVALID_ARGUMENT")),
    (UsageError, (400, "INVALID_ARGUMENT")),
    (ValidationError, (400, "INVALID_ARGUMENT")),
    (BundleError, (400, "INVALID_ARGUMENT")),
    (AuthError, (401, "UNAUTHENTICATED")),
    (NotFoundError, (404, "NOT_FOUND")),
    (AlreadyExistsError, (409, "ALREADY_EXISTS")),
    (ModelNotReadyError, (503, "UNAVAILABLE")),
    (UnavailableError, (503, "UNAVAILABLE")),
    (InferenceError, (500, "INTERNAL")),
)
_DEFAULT: WireStatus = (500, "INTERNAL")


def _row(error: BaseException) -> WireStatus:
    return next((status for kind, status in STATUS_TABLE if isinstance(error, kind)), _DEFAULT)


def http_status(error: BaseException) -> int:
    """The HTTP status REST answers for ``error``."""
    return _row(error)[0]


def grpc_code_name(error: BaseException) -> str:
    """The name of the ``grpc.StatusCode`` gRPC answers for ``error``."""
    return _row(error)[1]
