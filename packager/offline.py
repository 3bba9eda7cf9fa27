"""``edgedeploy bundle export BUNDLE --for-offline -o DIR``: a folder for a device with no network (a USB stick).

The folder holds the bundle and the TUF metadata a device needs to trust it, laid out like the
bundle server (``bundles/``, ``metadata/``), plus ``manifest.json`` and ``README.txt``; ``edge-agent
install DIR`` (:mod:`edge_agent.offline`) reads it. The bundle is verified against the local trust
store and published first (which lists it as a TUF target when a repository exists), so the folder
carries every root version, the current timestamp, snapshot and targets. The metadata expires with
the timestamp (1 day by default): ``valid_for`` re-signs snapshot and timestamp for that long first,
which also holds for the online repository until the next ``repo publish``.
"""

from __future__ import annotations

import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from edge_agent.atomic import atomic_write_bytes, atomic_write_json
from edge_agent.bundle import verify_bundle
from edge_agent.errors import AlreadyExistsError
from edge_agent.home import edgedeploy_home
from edge_agent.offline import OFFLINE_FORMAT
from edge_agent.trust import TrustStore
from edge_agent.tuf_fetch import target_name
from packager.bundle_server import publish_bundle
from packager.tuf_repo import TufRepository, repository_exists

__all__ = ["export_offline"]

_README = """This folder installs {model} version {version} on a device without network access.

On the device (the agent daemon stopped, e.g. `systemctl stop edge-agent`):

    edge-agent install {folder_name} --config /etc/edge-agent/agent.yaml
    systemctl start edge-agent

It runs the same checks as an update over the network:
- {checks}
- the bundle's signature and every file's hash
- the A/B install and the health check (the model answers its input sample)
A refusal prints one `error:` line and leaves the installed model as it was. The daemon
reports the install to the controller when it next reaches the broker.
{expiry}"""


def _copy_metadata(repo: TufRepository, out: Path) -> str:
    """Every root version and the current timestamp, snapshot and targets; returns the timestamp's expiry."""
    folder = out / "metadata"
    folder.mkdir(parents=True)
    names = [p.name for p in repo.metadata.glob("*.root.json")]
    timestamp = repo.timestamp().signed
    snapshot = repo.snapshot().signed
    names += ["timestamp.json", f"{timestamp.snapshot_meta.version}.snapshot.json",
              f"{snapshot.meta['targets.json'].version}.targets.json"]
    for name in sorted(names):
        shutil.copyfile(repo.metadata / name, folder / name)
    return timestamp.expires.isoformat()


def export_offline(bundle: Path, out: Path, home: Path | None = None,
                   valid_for: timedelta | None = None) -> dict[str, Any]:
    """Write the offline folder for ``bundle`` into ``out`` (absent or empty); returns its manifest."""
    home = home or edgedeploy_home()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise AlreadyExistsError(f"{out} is not empty; export into a new or empty folder")
    manifest = verify_bundle(Path(bundle), TrustStore.local(home))
    sha, _url = publish_bundle(Path(bundle), home)
    repo = TufRepository.open(home) if repository_exists(home) else None
    if repo is not None and valid_for is not None:
        repo.publish({"snapshot": valid_for, "timestamp": valid_for})
    (out / "bundles").mkdir(parents=True)
    shutil.copyfile(home / "bundles" / f"{sha}.edb", out / target_name(sha))
    expires = _copy_metadata(repo, out) if repo is not None else None
    document = {"format": OFFLINE_FORMAT, "bundle": target_name(sha), "bundle_sha256": sha,
                "model": {"name": manifest.name, "version": manifest.version},
                "metadata": "metadata" if repo is not None else None, "metadata_expires": expires,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_json(out / "manifest.json", document)
    checks = ("the repository's signed TUF metadata: not expired, not older than what the device has seen"
              if repo is not None else "no TUF metadata here (`edgedeploy repo init` was not run): a device with "
              "tuf_root refuses this folder")
    expiry = f"\nThe TUF metadata expires at {expires}; after that, devices refuse this folder.\n" if expires else ""
    atomic_write_bytes(out / "README.txt", _README.format(
        model=manifest.name, version=manifest.version, folder_name=out.name, checks=checks, expiry=expiry).encode())
    return document
