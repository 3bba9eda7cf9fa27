"""Writing bundles: hash the payload into the manifest, sign it, and write deterministic tar.gz bytes.

The format and the order of the checks a reader makes are the device's contract, in
:mod:`edge_agent.bundle`; this module is the one writer of that format.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path

from edge_agent.atomic import fsync_dir
from edge_agent.bundle import (
    MANIFEST_NAME,
    PAYLOAD_PREFIX,
    SIGNATURE_NAME,
    BundleManifest,
    FileEntry,
    bundle_gzip,
    bundle_sha256,
    canonical_json,
    check_payload_path,
    sha256_file,
)
from packager.keys import SigningKey

__all__ = ["PayloadSource", "write_bundle"]


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


PayloadSource = Path | bytes


def write_bundle(
    out_path: Path,
    manifest: BundleManifest,
    payload: Mapping[str, PayloadSource],
    key: SigningKey,
    roles: Mapping[str, str] | None = None,
) -> str:
    """Hash ``payload`` into ``manifest.files``, sign, and write the bundle atomically.

    ``payload`` maps a relative path inside the bundle to a file on disk or to bytes. The same
    manifest, payload and key always give the same bytes. Returns the bundle's sha256.
    """
    roles = roles or {}
    entries = []
    for path in sorted(payload):
        check_payload_path(path)
        source = payload[path]
        if isinstance(source, bytes):
            digest, size = hashlib.sha256(source).hexdigest(), len(source)
        else:
            digest, size = sha256_file(Path(source))
        entries.append(FileEntry(path, digest, size, roles.get(path, "data")))
    manifest.files = entries
    manifest_bytes = canonical_json(manifest.to_dict())
    signature = canonical_json({
        "algorithm": "ed25519",
        "key_id": key.key_id,
        "signature": base64.b64encode(key.sign(manifest_bytes)).decode(),
    })
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            with bundle_gzip(raw) as gz, tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                tar.addfile(_tar_info(MANIFEST_NAME, len(manifest_bytes)), io.BytesIO(manifest_bytes))
                tar.addfile(_tar_info(SIGNATURE_NAME, len(signature)), io.BytesIO(signature))
                for entry in entries:
                    _add_payload(tar, entry, payload[entry.path])
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(out_path.parent)
    return bundle_sha256(out_path)


def _add_payload(tar: tarfile.TarFile, entry: FileEntry, source: PayloadSource) -> None:
    info = _tar_info(PAYLOAD_PREFIX + entry.path, entry.size)
    if isinstance(source, bytes):
        tar.addfile(info, io.BytesIO(source))
    else:
        with open(source, "rb") as handle:
            tar.addfile(info, handle)
