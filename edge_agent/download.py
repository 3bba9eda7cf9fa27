"""Download a bundle over HTTP into ``<sha>.part``, resuming with ``Range``, then check its sha256.

An interrupted transfer keeps its ``.part`` file; the next call asks for the remaining bytes only.
The finished file is renamed to ``<sha>.edb`` only after its sha256 matches the order.

A server decides how fast bytes come, so every transfer is bounded by :class:`DownloadLimits`: a
total size, a total deadline and a minimum rate over any window of ``rate_window_s`` (the socket
timeout only bounds one read: a byte every few seconds would hold the agent forever). The caller
may abandon a transfer between reads (a newer order arrived). Only one order's files are kept:
starting a download deletes the partial and finished files of every other order, and a transfer
refused for its size deletes its own, so abandoned orders never fill the disk.
"""

from __future__ import annotations

import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from edge_agent.bundle import bundle_sha256
from edge_agent.errors import DeploymentError, IntegrityError, ValidationError, brief

__all__ = ["CHUNK_BYTES", "DownloadLimits", "check_order", "download_bundle", "fetch_file", "reclaim_downloads"]

log = logging.getLogger(__name__)
CHUNK_BYTES = 1024 * 1024
_SHA = set("0123456789abcdef")


@dataclass(frozen=True)
class DownloadLimits:
    """What one download may take: bytes, seconds in all, and the slowest rate kept going."""

    max_bytes: int = 2 * 1024**3
    deadline_s: float = 3600.0
    min_bytes_per_s: float = 1024.0  # 0: no minimum
    rate_window_s: float = 30.0  # the rate is measured over this long, so a short stall is forgiven
    read_timeout_s: float = 30.0


class _Pace:
    """Raises DeploymentError when a transfer passes its deadline or stays too slow for a window."""

    def __init__(self, url: str, limits: DownloadLimits, abandon: Callable[[], bool] | None) -> None:
        self.url, self.limits, self.abandon = url, limits, abandon
        self.started = self.window_start = time.monotonic()
        self.window_bytes = 0

    def read_timeout(self) -> float:
        """The socket timeout for the next read: never past the deadline."""
        left = self.limits.deadline_s - (time.monotonic() - self.started)
        return max(0.05, min(self.limits.read_timeout_s, left))

    def check(self, received: int) -> None:
        """Account ``received`` new bytes and enforce the deadline, the rate and abandonment."""
        now = time.monotonic()
        self.window_bytes += received
        if self.abandon is not None and self.abandon():
            raise DeploymentError(f"download of {self.url} abandoned: a newer order arrived")
        if now - self.started > self.limits.deadline_s:
            raise DeploymentError(f"download of {self.url} took over {self.limits.deadline_s:g}s; "
                                  "it resumes on the next try")
        elapsed = now - self.window_start
        if elapsed >= self.limits.rate_window_s:
            rate = self.window_bytes / elapsed
            if rate < self.limits.min_bytes_per_s:
                raise DeploymentError(f"download of {self.url} ran at {rate:.0f} bytes/s for {elapsed:.0f}s, "
                                      f"under the minimum of {self.limits.min_bytes_per_s:g}; "
                                      "it resumes on the next try")
            self.window_start, self.window_bytes = now, 0


def check_order(url: str, sha256: str) -> None:
    """ValidationError unless ``url`` is http(s) and ``sha256`` is 64 lower-case hex digits (a file name)."""
    _check_url(url)
    _check_sha(sha256)


def _check_sha(sha256: str) -> None:
    if not isinstance(sha256, str) or len(sha256) != 64 or not set(sha256) <= _SHA:
        raise ValidationError(f"bundle sha256 {sha256!r} is not 64 lowercase hex digits")


def _check_url(url: str) -> None:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValidationError(f"bundle URL {url!r} is not http(s)")


def _set_timeout(response: http.client.HTTPResponse, seconds: float) -> None:
    """Shorten the socket timeout of an open response (it was set once, at connect)."""
    sock = getattr(getattr(response.fp, "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(seconds)


class _TooLarge(DeploymentError):
    """Over the size limit: the partial file can never become a valid bundle."""


def _copy(response: http.client.HTTPResponse, sink: BinaryIO, written: int, max_bytes: int, url: str,
          pace: _Pace) -> int:
    """Copy the body into ``sink`` as it comes (read1: one socket read each, however few bytes)."""
    while True:
        _set_timeout(response, pace.read_timeout())
        try:
            chunk = response.read1(CHUNK_BYTES)
        except TimeoutError:
            pace.check(0)  # says "deadline" when that is why the read timed out
            raise
        if not chunk:
            return written
        written += len(chunk)
        if written > max_bytes:
            raise _TooLarge(f"bundle at {url} is over the {max_bytes} byte limit")
        sink.write(chunk)
        pace.check(len(chunk))


def _fetch(url: str, part: Path, limits: DownloadLimits, pace: _Pace, token: str | None) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    if token is not None:  # not carried over a redirect, which may lead to another host
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    try:
        response = urllib.request.urlopen(request, timeout=pace.read_timeout())
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and have:  # we already hold every byte
            return
        hint = " (the bundle server wants a token: bundle_token_file in agent.yaml)" if exc.code == 401 else ""
        raise DeploymentError(f"download of {url} failed: HTTP {exc.code}{hint}") from None
    with response:
        if have and response.status != 206:
            log.info("server ignored Range for %s; downloading from the start", brief(url, 200))
            have = 0
        total = response.headers.get("Content-Length")
        if total is not None and have + int(total) > limits.max_bytes:
            raise _TooLarge(f"bundle at {url} is {have + int(total)} bytes, over the {limits.max_bytes} limit")
        with open(part, "ab" if have else "wb") as sink:
            try:
                written = _copy(response, sink, have, limits.max_bytes, url, pace)
            finally:  # what arrived is kept for the resume, also when the transfer is cut short
                sink.flush()
                os.fsync(sink.fileno())
        if total is not None and written < have + int(total):
            raise DeploymentError(f"download of {url} broke off after {written} bytes; it resumes on the next try")


def reclaim_downloads(folder: Path, keep_sha256: str | None = None) -> int:
    """Delete every download in ``folder`` but ``keep_sha256``'s; returns the bytes freed."""
    freed = 0
    keep = {f"{keep_sha256}.part", f"{keep_sha256}.edb"} if keep_sha256 else set()
    for path in Path(folder).glob("*"):
        if path.suffix in (".part", ".edb") and path.name not in keep and path.is_file():
            freed += path.stat().st_size
            path.unlink(missing_ok=True)
    if freed:
        log.info("reclaimed %d bytes of abandoned downloads in %s", freed, folder)
    return freed


def fetch_file(url: str, part: Path, limits: DownloadLimits | None = None,
               abandon: Callable[[], bool] | None = None, token: str | None = None) -> None:
    """Fetch ``url`` into ``part`` under ``limits``, resuming what ``part`` already holds (``token``: bearer).

    Network errors, HTTP errors, a passed deadline, a too slow server and ``abandon()`` raise
    DeploymentError and keep ``part``; a transfer over the size limit deletes it.
    """
    limits = limits or DownloadLimits()
    try:
        _fetch(url, part, limits, _Pace(url, limits, abandon), token)
    except _TooLarge:
        part.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise DeploymentError(f"download of {url} failed: {exc}; it resumes on the next try") from None


def download_bundle(url: str, sha256: str, folder: Path, limits: DownloadLimits | None = None,
                    abandon: Callable[[], bool] | None = None, token: str | None = None,
                    length: int | None = None) -> Path:
    """Fetch ``url`` into ``folder/<sha256>.edb`` (resuming a ``.part``); IntegrityError on a hash mismatch.

    ``token`` goes as ``Authorization: Bearer`` (``edgedeploy serve --token-file``).

    A finished file already present is reused (an offline install puts it there); other orders'
    files are deleted first. Network errors, a passed deadline, a too slow server and ``abandon()``
    turning true raise DeploymentError and keep the ``.part`` file so the next attempt resumes; a
    transfer over the size limit deletes it. ``length`` is the exact size the bundle must have (its
    TUF target's, :mod:`edge_agent.tuf_fetch`): a body that runs past it is refused as it arrives.
    """
    _check_sha(sha256)
    limits = limits or DownloadLimits()
    if length is not None:
        if length > limits.max_bytes:
            raise _TooLarge(f"bundle {sha256} is {length} bytes by its TUF target, over the {limits.max_bytes} limit")
        limits = replace(limits, max_bytes=length)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    reclaim_downloads(folder, sha256)
    final = folder / f"{sha256}.edb"
    if final.is_file() and bundle_sha256(final) == sha256:
        return final
    _check_url(url)
    part = folder / f"{sha256}.part"
    try:
        fetch_file(url, part, limits, abandon, token)
    except _TooLarge:
        if length is not None:
            raise IntegrityError(f"refused: bundle at {url} runs past the {length} bytes its TUF target lists "
                                 "(endless data)") from None
        raise
    actual = bundle_sha256(part)
    if actual != sha256:
        part.unlink(missing_ok=True)  # a wrong file cannot be resumed into a right one
        raise IntegrityError(f"bundle from {url} has sha256 {actual}, the order says {sha256}; refused")
    os.replace(part, final)
    return final
