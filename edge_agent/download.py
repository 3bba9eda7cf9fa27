"""Download a bundle over HTTP into ``<sha>.part``, resuming with ``Range``, then check its sha256.

An interrupted transfer keeps its ``.part`` file; the next call asks for the remaining bytes only.
The finished file is renamed to ``<sha>.edb`` only after its sha256 matches the order.
"""

from __future__ import annotations

import http.client
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from edge_agent.bundle import bundle_sha256
from edge_agent.errors import DeploymentError, IntegrityError, ValidationError

__all__ = ["CHUNK_BYTES", "download_bundle"]

log = logging.getLogger(__name__)
CHUNK_BYTES = 1024 * 1024
_SHA = set("0123456789abcdef")


def _check_order(url: str, sha256: str) -> None:
    if not url.startswith(("http://", "https://")):
        raise ValidationError(f"bundle URL {url!r} is not http(s)")
    if len(sha256) != 64 or not set(sha256) <= _SHA:
        raise ValidationError(f"bundle sha256 {sha256!r} is not 64 lowercase hex digits")


def _fetch(url: str, part: Path, max_bytes: int, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - scheme checked above
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # we already hold every byte
            exc.close()
            return
        exc.close()
        raise DeploymentError(f"download of {url} failed: HTTP {exc.code}") from None
    with response:
        if have and response.status != 206:
            log.info("server ignored Range for %s; downloading from the start", url)
            have = 0
        total = response.headers.get("Content-Length")
        if total is not None and have + int(total) > max_bytes:
            raise DeploymentError(f"bundle at {url} is {have + int(total)} bytes, over the {max_bytes} limit")
        with open(part, "ab" if have else "wb") as sink:
            written = have
            for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                written += len(chunk)
                if written > max_bytes:
                    raise DeploymentError(f"bundle at {url} is over the {max_bytes} byte limit")
                sink.write(chunk)
            sink.flush()
            os.fsync(sink.fileno())
        if total is not None and written < have + int(total):
            raise DeploymentError(f"download of {url} broke off after {written} bytes; it resumes on the next try")


def download_bundle(url: str, sha256: str, folder: Path, max_bytes: int = 2 * 1024**3,
                    timeout: float = 30.0) -> Path:
    """Fetch ``url`` into ``folder/<sha256>.edb`` (resuming a ``.part``); IntegrityError on a hash mismatch.

    A finished file already present is reused. Network errors raise DeploymentError and keep the
    ``.part`` file so the next attempt resumes.
    """
    _check_order(url, sha256)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{sha256}.edb"
    if final.is_file() and bundle_sha256(final) == sha256:
        return final
    part = folder / f"{sha256}.part"
    try:
        _fetch(url, part, max_bytes, timeout)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise DeploymentError(f"download of {url} failed: {exc}; it resumes on the next try") from None
    actual = bundle_sha256(part)
    if actual != sha256:
        part.unlink(missing_ok=True)  # a wrong file cannot be resumed into a right one
        raise IntegrityError(f"bundle from {url} has sha256 {actual}, the order says {sha256}; refused")
    os.replace(part, final)
    return final
