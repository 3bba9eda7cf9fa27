"""The one exception hierarchy of edgedeploy.

Every adapter (CLI, REST, gRPC, MQTT) maps these to its own status in exactly one place:
the CLI to an exit code, REST to an HTTP status, gRPC to a status code. The types stay
neutral: nothing here knows about any transport.
"""

from __future__ import annotations

__all__ = [
    "MAX_ERROR_CHARS",
    "AccuracyError",
    "AlreadyExistsError",
    "AuthError",
    "BundleError",
    "DeltaError",
    "DeploymentError",
    "EdgeDeployError",
    "IntegrityError",
    "InferenceError",
    "InvalidInputError",
    "ModelNotReadyError",
    "NotFoundError",
    "OverloadedError",
    "PackagingError",
    "PayloadTooLargeError",
    "SignatureError",
    "UnsafeArchiveError",
    "UpdateMetadataError",
    "UntrustedKeyError",
    "UnavailableError",
    "UsageError",
    "ValidationError",
    "brief",
]

MAX_ERROR_CHARS = 1000  # an error text reaches MQTT messages (256 KiB), files and HTTP bodies: keep it a line


def brief(text: object, limit: int = MAX_ERROR_CHARS) -> str:
    """``str(text)`` cut to ``limit`` characters, saying how much was left out.

    Error messages quote what was wrong (a name, a path); an attacker chooses how long that is.
    """
    value = str(text)
    if len(value) <= limit:
        return value
    return f"{value[:limit]}... ({len(value) - limit} more characters)"


class EdgeDeployError(Exception):
    """Base class: a failure the user can act on. The message says what and what to do.

    The message is cut to :data:`MAX_ERROR_CHARS`, whatever it quotes.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(brief(message))


class UsageError(EdgeDeployError):
    """The command or call was used wrongly (bad option value, missing argument)."""


class ValidationError(EdgeDeployError):
    """A document (device profile, config, manifest) does not match its schema."""


class NotFoundError(EdgeDeployError):
    """A named thing (model, version, profile, key, service) does not exist."""


class AlreadyExistsError(EdgeDeployError):
    """A named thing that must be new exists already."""


class BundleError(EdgeDeployError):
    """A bundle is malformed or cannot be trusted; nothing from it was installed."""


class SignatureError(BundleError):
    """The bundle's signature is missing or does not match its manifest."""


class UntrustedKeyError(BundleError):
    """The bundle is signed by a key that is not in the trust store."""


class IntegrityError(BundleError):
    """A file in the bundle does not match the hash or size in the manifest."""


class UnsafeArchiveError(BundleError):
    """The archive holds an entry that could escape or abuse its target folder."""


class UpdateMetadataError(BundleError):
    """The repository's signed update metadata (TUF) is expired, older than what was seen, inconsistent,
    oversized or not signed by enough trusted keys, or does not list the bundle: nothing was trusted."""


class DeploymentError(EdgeDeployError):
    """A service could not be started, reached or changed on its deploy target."""


class DeltaError(BundleError):
    """A delta cannot rebuild the ordered bundle from the one a device holds; it downloads the whole bundle."""


class PackagingError(EdgeDeployError):
    """The model cannot be built for the profile: an unsupported operator, a design that does not fit,
    a compiler or tool that failed or is missing."""


class AccuracyError(EdgeDeployError):
    """Optimization or quantization lost more accuracy than allowed."""


class InvalidInputError(EdgeDeployError):
    """An inference request has a wrong name, shape, dtype or encoding."""


class PayloadTooLargeError(InvalidInputError):
    """An inference request is larger than the configured limit."""


class OverloadedError(EdgeDeployError):
    """The server already holds as many request bytes as its limit allows; retry later."""


class ModelNotReadyError(EdgeDeployError):
    """The model exists but is not loaded or failed to initialise."""


class InferenceError(EdgeDeployError):
    """The model (or its entry script) raised while answering a valid request."""


class AuthError(EdgeDeployError):
    """A request lacks a valid key."""


class UnavailableError(EdgeDeployError):
    """The service cannot act now (a standby controller, a broker that is down, a device that does not
    answer, a model being deployed); retry or ask another."""
