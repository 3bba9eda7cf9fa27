"""``edge-agent install DIR|BUNDLE --config agent.yaml``: an update from a USB stick, through the daemon's own code.

``DIR`` is what ``edgedeploy bundle export BUNDLE --for-offline -o DIR`` writes::

    DIR/manifest.json        {"format": "edgedeploy-offline/1", "bundle": "bundles/<sha256>.edb",
                              "bundle_sha256", "model": {"name", "version"}, "metadata": "metadata"}
    DIR/bundles/<sha256>.edb the signed bundle
    DIR/metadata/            the TUF repository's root versions, timestamp, snapshot and targets
    DIR/README.txt           what to do with the folder

A bare ``BUNDLE`` file installs too, on a device without ``tuf_root``. The install runs while the
daemon is stopped: it takes ``data_dir``'s lock (and refuses while the daemon holds it), because one
process must own a model's A/B slots and state machine. It builds the daemon's :class:`EdgeAgent`
with an outbox instead of the broker link and, with ``tuf_root``, the TUF client reading the
folder's metadata against the device's own TUF state (a stick cannot roll the device back), copies
the bundle into ``downloads/`` (at most ``max_download_bytes``) and hands the agent an order for it:
the TUF target check, signature and hash verification, A/B install, health check and persisted
state machine of an MQTT order. The result stays in the model's ``deployment.json``, the events in
the outbox; the daemon reports both when it next reaches the broker. The controller's order that
the install replaced is not applied again when its retained copy is redelivered; its next one is.
A refusal is one line (exit 1) and leaves the installed model as it was; one that comes before the
model is known (no export here, a tampered or unsigned bundle) is queued as a ``refused`` event.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from edge_agent.bundle import read_manifest
from edge_agent.errors import (
    DeploymentError,
    EdgeDeployError,
    IntegrityError,
    NotFoundError,
    SignatureError,
    UntrustedKeyError,
    UpdateMetadataError,
    ValidationError,
    brief,
)
from edge_agent.fleet_messages import DeployState, ModelOrder, ModelReport
from edge_agent.jsonlimits import loads_bounded

from .config import AgentConfig
from .daemon import EdgeAgent
from .outbox import DataDirLock, OutboxLink
from .store import BundleStore, Event
from .tuf_fetch import device_metadata

__all__ = ["OFFLINE_FORMAT", "OfflineSource", "install"]

OFFLINE_FORMAT = "edgedeploy-offline/1"
_MANIFEST_MAX_BYTES = 64 * 1024
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class OfflineSource:
    """Where an offline install takes its bundle and (for an export folder) its TUF metadata."""

    bundle: Path
    folder: Path | None  # the export folder (its metadata/ beside bundles/); None for a bare bundle
    expected_sha256: str | None

    @classmethod
    def open(cls, path: Path) -> OfflineSource:
        """An export folder (checked against its manifest.json) or a bundle file; ValidationError otherwise."""
        path = Path(path)
        if path.is_file():
            return cls(path, None, None)
        if not path.is_dir():
            raise NotFoundError(f"{path} does not exist: give an export folder or a bundle file")
        manifest = path / "manifest.json"
        if not manifest.is_file():
            raise ValidationError(f"{path} is not an offline export (no manifest.json): write one with "
                                  "`edgedeploy bundle export BUNDLE --for-offline -o DIR`")
        doc = loads_bounded(manifest.read_bytes(), _MANIFEST_MAX_BYTES, what=str(manifest))
        if not isinstance(doc, dict) or doc.get("format") != OFFLINE_FORMAT:
            raise ValidationError(f"{manifest}: not an {OFFLINE_FORMAT} manifest")
        folder = path.resolve()
        bundle = (folder / str(doc.get("bundle", ""))).resolve()
        if not bundle.is_relative_to(folder) or not bundle.is_file():
            raise ValidationError(f"{manifest}: 'bundle' must name a file inside {path}")
        sha = doc.get("bundle_sha256")
        metadata = doc.get("metadata")
        return cls(bundle, folder if metadata else None, sha if isinstance(sha, str) else None)


def _stage(source: OfflineSource, downloads: Path, max_bytes: int) -> Path:
    """Copy the bundle into ``downloads/<sha256>.edb`` (bounded), where the download step finds it."""
    downloads.mkdir(parents=True, exist_ok=True)
    part = downloads / f".offline-{os.getpid()}.part"
    digest, size = hashlib.sha256(), 0
    try:
        with open(source.bundle, "rb") as src, open(part, "wb") as sink:
            while chunk := src.read(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise DeploymentError(f"{source.bundle} is over the {max_bytes} byte limit (max_download_bytes)")
                digest.update(chunk)
                sink.write(chunk)
            sink.flush()
            os.fsync(sink.fileno())
        sha = digest.hexdigest()
        if source.expected_sha256 is not None and sha != source.expected_sha256:
            raise IntegrityError(f"refused: {source.bundle} has sha256 {sha}, its manifest.json says "
                                 f"{brief(source.expected_sha256, 80)} (tampered)")
        staged = downloads / f"{sha}.edb"
        os.replace(part, staged)
    finally:
        part.unlink(missing_ok=True)
    return staged


def _order(agent: EdgeAgent, staged: Path, allow_downgrade: bool) -> ModelOrder:
    """The order for a staged bundle: its model, as its (trusted, valid) signed manifest names it."""
    manifest, signature = read_manifest(staged, agent.trust)
    if not signature.trusted:
        raise UntrustedKeyError(f"refused: {staged.name} is signed by key {signature.key_id}, not one in trusted_keys")
    if not signature.valid:
        raise SignatureError(f"refused: the signature of {staged.name} does not match its manifest (tampered)")
    # unique per attempt: a retry within the same second is a new deployment, not the failed one again
    deployment_id = f"offline-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"
    return ModelOrder(manifest.name, deployment_id, "", staged.stem, manifest.version,
                      allow_downgrade=allow_downgrade)


def _queue_refusal(link: OutboxLink, config: AgentConfig, line: str) -> None:
    """A refusal before any model is known: one ``refused`` event, as the daemon sends for a bad order."""
    link.publish("events", {"device_id": config.device_id, "model": None, "deployment_id": None, "from": None,
                            "to": "refused", "reason": brief(line), "ts": time.time()})


async def _apply(agent: EdgeAgent, order: ModelOrder) -> ModelReport:
    store: BundleStore = agent.stores.get(order.name)
    store.recover()
    replaced = {store.deployment.get("deployment_id"), (store.active or {}).get("deployment_id")} - {None}
    # The daemon serves every active model at its next start; counted as live here, a failed install
    # ends in "failed" with the old bundle in place, as in the daemon, instead of "restoring" it.
    agent.live.update(name for name, other in agent.stores.items() if other.active)
    try:
        await agent.handle(order)
    finally:
        await agent.repository.close()
    if store.state == DeployState.ACTIVE and (store.active or {}).get("bundle_sha256") == order.bundle_sha256:
        store.deployment["supersedes"] = sorted(replaced)  # the daemon's _skip leaves these orders alone
        store.advance(Event.KEEP)
    return agent.model_report(order.name, store)


def install(config: AgentConfig, path: Path, allow_downgrade: bool = False) -> ModelReport:
    """Install an offline export (or a bundle file) with the daemon stopped; DeploymentError when it failed.

    Returns the model's report (``active`` with the new bundle). Every refusal leaves the installed
    models as they were. A lower model version than the active one needs ``allow_downgrade``.
    """
    with DataDirLock(config.data_dir, "edge-agent install"):
        link = OutboxLink(config.data_dir)
        try:
            source = OfflineSource.open(path)
            if config.tuf_root is not None and source.folder is None:
                raise UpdateMetadataError(f"refused: this device requires TUF metadata (tuf_root is set) and {path} "
                                          "has none: install the folder `edgedeploy bundle export --for-offline` "
                                          "writes")
            agent = EdgeAgent(config, link=link, metadata=device_metadata(config, source.folder))
            staged = _stage(source, agent.stores.downloads, config.max_download_bytes)
            order = _order(agent, staged, allow_downgrade)
        except EdgeDeployError as exc:
            _queue_refusal(link, config, str(exc))
            raise
        report = asyncio.run(_apply(agent, order))
    installed = report.active is not None and report.active.bundle_sha256 == order.bundle_sha256
    if report.state != DeployState.ACTIVE or not installed:
        kept = f"version {report.active.version} keeps serving" if report.active else "nothing was installed"
        raise DeploymentError(f"offline install of {order.name} version {order.version} failed: "
                              f"{report.error or report.state.value}; {kept}")
    return report
