"""The gRPC adapter: each RPC converts the request, calls the data plane, converts back.

Errors become gRPC status codes in one place (:func:`_mapped`, from ``edge_agent.error_status``);
auth is one interceptor. Requests are parsed here rather than by grpc (:func:`add_to_server`), so a
malformed protobuf answers INVALID_ARGUMENT instead of grpc's own UNKNOWN.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from edge_agent.auth import AuthKeys
from edge_agent.dataplane import DataPlane, InflightBytes
from edge_agent.error_status import grpc_code_name
from edge_agent.errors import AuthError, EdgeDeployError, InvalidInputError
from edge_agent.grpc import grpc_service_pb2_grpc as services
from edge_agent.grpc import oip_messages_pb2 as pb
from edge_agent.grpc.converters import request_from_proto, response_to_proto

__all__ = ["AuthInterceptor", "InferenceServicer", "add_to_server"]

log = logging.getLogger(__name__)
_OPEN_METHODS = ("/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady",
                 "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")


def _status_of(error: EdgeDeployError) -> grpc.StatusCode:
    return grpc.StatusCode[grpc_code_name(error)]


class _Refused:
    """What a request parses to when it is refused unparsed; the handler answers ``error``."""

    def __init__(self, error: EdgeDeployError) -> None:
        self.error = error


def _lenient(parse: Callable[[bytes], Any], inflight: InflightBytes | None = None) -> Callable[[bytes], Any]:
    """A request parser that never raises, and refuses a message beyond ``inflight`` before parsing it
    (parsing copies the message once more: with 100 calls of 10 MB, that is another GB)."""
    def deserialize(data: bytes) -> Any:
        if inflight is not None and not inflight.fits(len(data)):
            return _Refused(inflight.refusal(len(data)))
        try:
            return parse(data)
        except DecodeError as exc:
            return _Refused(InvalidInputError(f"the request is not a valid protobuf message: {exc}"))

    return deserialize


def _mapped(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, _Refused):
                raise request.error
            return await method(self, request, context)
        except EdgeDeployError as exc:
            await context.abort(_status_of(exc), str(exc))

    return wrapper


def _tensor_metadata(specs: list[dict[str, Any]]) -> list[Any]:
    return [pb.ModelMetadataResponse.TensorMetadata(name=s["name"], datatype=s["datatype"], shape=s["shape"])
            for s in specs]


class InferenceServicer(services.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over a :class:`DataPlane`."""

    def __init__(self, dataplane: DataPlane, inflight: InflightBytes | None = None) -> None:
        self.dataplane = dataplane
        self.inflight = inflight or InflightBytes(None)

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
        # grpc has received the whole message by now; refusing it still spares the copies decoding makes
        with self.inflight.hold(request.ByteSize()):
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


class _CapturingServer:
    """Collects the handlers the generated ``add_..._to_server`` registers, so they can be rewrapped."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: the registered handlers below carry the same methods."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service, self.handlers = service, handlers


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` like the generated code does, but with a request parser that never raises."""
    captured = _CapturingServer()
    services.add_GRPCInferenceServiceServicer_to_server(servicer, captured)
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            handler.unary_unary, response_serializer=handler.response_serializer,
            request_deserializer=_lenient(handler.request_deserializer,
                                          servicer.inflight if name == "ModelInfer" else None))
        for name, handler in captured.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(captured.service, handlers),))
    server.add_registered_method_handlers(captured.service, handlers)
