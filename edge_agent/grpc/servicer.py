"""The gRPC adapter: each RPC converts the request, calls the data plane, converts back.

Errors become gRPC status codes in one place (:func:`_status_of`); auth is one interceptor.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from edge_agent.auth import AuthKeys
from edge_agent.dataplane import DataPlane
from edge_agent.errors import (
    AuthError,
    EdgeDeployError,
    InvalidInputError,
    ModelNotReadyError,
    NotFoundError,
    UsageError,
    ValidationError,
)
from edge_agent.grpc import grpc_service_pb2_grpc as services
from edge_agent.grpc import oip_messages_pb2 as pb
from edge_agent.grpc.converters import request_from_proto, response_to_proto

__all__ = ["AuthInterceptor", "InferenceServicer"]

log = logging.getLogger(__name__)
_OPEN_METHODS = ("/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady",
                 "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")


def _status_of(error: EdgeDeployError) -> grpc.StatusCode:
    if isinstance(error, InvalidInputError | UsageError | ValidationError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, ModelNotReadyError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, AuthError):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(error, EdgeDeployError) and type(error).__name__.endswith("BundleError"):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def _mapped(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except EdgeDeployError as exc:
            await context.abort(_status_of(exc), str(exc))

    return wrapper


def _tensor_metadata(specs: list[dict[str, Any]]) -> list[Any]:
    return [pb.ModelMetadataResponse.TensorMetadata(name=s["name"], datatype=s["datatype"], shape=s["shape"])
            for s in specs]


class InferenceServicer(services.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over a :class:`DataPlane`."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    @_mapped
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    @_mapped
    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    @_mapped
    async def ModelReady(self, request: Any, context: Any) -> Any:
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version or None))

    @_mapped
    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(**self.dataplane.server_metadata())

    @_mapped
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        meta = self.dataplane.model_metadata(request.name, request.version or None)
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=_tensor_metadata(meta["inputs"]),
                                        outputs=_tensor_metadata(meta["outputs"]))

    @_mapped
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        infer_request, raw = request_from_proto(request)
        return response_to_proto(await self.dataplane.infer(infer_request), raw)

    @_mapped
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        models = [m for m in self.dataplane.repository_index() if not request.ready or m["state"] == "READY"]
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**m) for m in models])

    @_mapped
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        parameter = request.parameters.get("bundle")
        bundle = parameter.string_param if parameter is not None else None
        await self.dataplane.load(request.model_name, bundle or None)
        return pb.RepositoryModelLoadResponse()

    @_mapped
    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        await self.dataplane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid ``authorization: Bearer <key>`` metadata entry (health stays open)."""

    def __init__(self, keys: AuthKeys) -> None:
        self.keys = keys

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if not self.keys.enabled or details.method in _OPEN_METHODS:
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        try:
            self.keys.check(metadata.get("authorization"))
        except AuthError as exc:
            message = str(exc)

            async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

            return grpc.unary_unary_rpc_method_handler(deny)
        return await continuation(details)
