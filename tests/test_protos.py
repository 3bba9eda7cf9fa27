"""The generated gRPC code is current, and our messages are wire-compatible with tritonclient's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ["grpc_service_pb2.py", "grpc_service_pb2.pyi", "grpc_service_pb2_grpc.py", "oip_messages_pb2.py",
             "oip_messages_pb2.pyi", "oip_messages_pb2_grpc.py"]


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "grpc_tools.protoc", "-Iedge_agent/grpc=protos", f"--python_out={tmp_path}",
               f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", "protos/oip_messages.proto",
               "protos/grpc_service.proto"]
    subprocess.run(command, cwd=ROOT, check=True)
    for name in GENERATED:
        fresh = (tmp_path / "edge_agent" / "grpc" / name).read_bytes()
        committed = (ROOT / "edge_agent" / "grpc" / name).read_bytes()
        assert fresh == committed, f"edge_agent/grpc/{name} is stale: run 'make protos' and commit"


def _fields(descriptor: object) -> dict[str, tuple[int, int, str]]:
    return {f.name: (f.number, f.type, f.message_type.name if f.message_type else "")  # type: ignore[attr-defined]
            for f in descriptor.fields}  # type: ignore[attr-defined]


@pytest.mark.parametrize("message", [
    "ModelInferRequest", "ModelInferResponse", "InferTensorContents", "InferParameter", "ServerMetadataResponse",
    "ModelMetadataRequest", "ModelMetadataResponse", "ModelReadyRequest", "RepositoryIndexResponse",
    "RepositoryModelLoadRequest",
])
def test_messages_have_the_standard_field_numbers(message: str) -> None:
    from tritonclient.grpc import service_pb2 as standard

    from edge_agent.grpc import oip_messages_pb2 as ours

    theirs = _fields(getattr(standard, message).DESCRIPTOR)
    mine = _fields(getattr(ours, message).DESCRIPTOR)
    for name, spec in mine.items():
        assert theirs.get(name) == spec, f"{message}.{name}: ours {spec}, standard {theirs.get(name)}"


def test_service_path_is_the_standard_one() -> None:
    from tritonclient.grpc import service_pb2_grpc

    from edge_agent.grpc import grpc_service_pb2_grpc

    ours = Path(grpc_service_pb2_grpc.__file__).read_text()
    theirs = Path(service_pb2_grpc.__file__).read_text()
    for method in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
                   "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"):
        path = f"/inference.GRPCInferenceService/{method}"
        assert path in ours and path in theirs
