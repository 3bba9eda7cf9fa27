"""edgedeploy's cloud side: registry, device profiles, packager, signed bundles, deploy targets, fleet.

The public Python API is re-exported here; every command of the ``edgedeploy`` CLI has a twin::

    import packager as ed

    ed.generate_key()                                   # edgedeploy keys generate
    ed.register_model("digits", "digits.onnx")          # edgedeploy model register
    path = ed.get_model_path("digits")                  # edgedeploy model path
    result = ed.package("digits", "cpu-arm64", "digits.edb", quantize="dynamic-int8")
    manifest = ed.verify_bundle("digits.edb")           # edgedeploy bundle verify

Heavy modules (onnx, onnxruntime, the MQTT client) are imported on first use, so importing
``packager`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from edge_agent import __version__
from edge_agent.errors import (
    AccuracyError,
    AlreadyExistsError,
    AuthError,
    BundleError,
    DeploymentError,
    EdgeDeployError,
    InferenceError,
    IntegrityError,
    InvalidInputError,
    ModelNotReadyError,
    NotFoundError,
    PayloadTooLargeError,
    SignatureError,
    UnsafeArchiveError,
    UntrustedKeyError,
    UpdateMetadataError,
    UsageError,
    ValidationError,
)

_LAZY = {
    # registry
    "Registry": "packager.registry",
    "register_model": "packager.registry",
    "list_models": "packager.registry",
    "get_model": "packager.registry",
    "get_model_path": "packager.registry",
    "download_model": "packager.registry",
    "delete_model": "packager.registry",
    # keys and bundles
    "generate_key": "packager.keys",
    "export_public_key": "packager.keys",
    "trust_key": "packager.keys",
    "list_keys": "packager.keys",
    "TrustStore": "edge_agent.trust",
    "BundleManifest": "edge_agent.bundle",
    "open_bundle": "edge_agent.bundle",
    "verify_bundle": "edge_agent.bundle",
    "read_manifest": "edge_agent.bundle",
    # profiles and packaging
    "DeviceProfile": "edge_agent.profiles",
    "load_profile": "edge_agent.profiles",
    "list_profiles": "edge_agent.profiles",
    "package": "packager.packaging",
    "PackageResult": "packager.packaging",
    # services (local now; docker and kubernetes take the same calls)
    "deploy": "packager.services",
    "wait_for_deployment": "packager.services",
    "list_services": "packager.services",
    "get_service": "packager.services",
    # fleet
    "FleetController": "packager.fleet",
    "BundleServer": "packager.bundle_server",
    "publish_bundle": "packager.bundle_server",
    # delivery: TUF repository metadata (edgedeploy repo, keys rotate) and offline export
    "TufRepository": "packager.tuf_repo",
    "export_offline": "packager.offline",
}

__all__ = [
    "AccuracyError",
    "AlreadyExistsError",
    "AuthError",
    "BundleError",
    "DeploymentError",
    "EdgeDeployError",
    "InferenceError",
    "IntegrityError",
    "InvalidInputError",
    "ModelNotReadyError",
    "NotFoundError",
    "PayloadTooLargeError",
    "SignatureError",
    "UnsafeArchiveError",
    "UntrustedKeyError",
    "UpdateMetadataError",
    "UsageError",
    "ValidationError",
    "__version__",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'packager' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
