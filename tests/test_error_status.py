"""edge_agent.error_status: one row per error class, the same family on both adapters."""

from __future__ import annotations

import grpc
import pytest

import edge_agent.errors as errors
from edge_agent.error_status import grpc_code_name, http_status

_CLASSES = [getattr(errors, name) for name in errors.__all__
            if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), errors.EdgeDeployError)]


@pytest.mark.parametrize("kind", _CLASSES, ids=lambda kind: kind.__name__)
def test_rest_and_grpc_agree_on_every_error_class(kind: type[errors.EdgeDeployError]) -> None:
    """A client's mistake is never INTERNAL on one adapter and 4xx on the other."""
    error = kind("x")
    code = grpc.StatusCode[grpc_code_name(error)]
    assert (http_status(error) == 500) == (code == grpc.StatusCode.INTERNAL)


@pytest.mark.parametrize("kind", [errors.SignatureError, errors.UntrustedKeyError, errors.IntegrityError,
                                  errors.UnsafeArchiveError, errors.BundleError], ids=lambda kind: kind.__name__)
def test_every_bundle_error_is_a_client_error(kind: type[errors.BundleError]) -> None:
    assert (http_status(kind("x")), grpc_code_name(kind("x"))) == (400, "INVALID_ARGUMENT")


def test_overload_is_503_and_resource_exhausted() -> None:
    assert (http_status(errors.OverloadedError()), grpc_code_name(errors.OverloadedError())) == (
        503, "RESOURCE_EXHAUSTED")
