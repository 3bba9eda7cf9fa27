"""A plain HTTP server that hands bundles and their TUF metadata to devices (``edgedeploy serve``).

Bundles are stored content-addressed as ``EDGEDEPLOY_HOME/bundles/<sha256>.edb`` and served at
``/bundles/<sha256>.edb``; the TUF repository's files (:mod:`packager.tuf_repo`) are served from
``EDGEDEPLOY_HOME/metadata/`` at ``/metadata/<name>.json``. Nothing else is served: the folders are
plain files, so any static HTTP server or object store hosting them side by side does the same.
GET and HEAD are supported, with single ``Range: bytes=a-b`` requests (206 + Content-Range; 416
for a range outside the file) so a device can resume a cut download. A bundle's ETag is its
sha256, which never changes for a given path; versioned metadata (``3.targets.json``) never
changes either and may be cached for good, while ``timestamp.json`` and ``root.json`` must not be.
Given a token file (``edgedeploy serve --token-file``, :class:`edge_agent.auth.TokenFile`), every
request must carry ``Authorization: Bearer <token>`` and is answered 401 before anything else
otherwise. Errors are ``{"error": ...}`` JSON bodies.

``/bundles/<new>.edb.delta/<old>`` is the delta that rebuilds bundle ``<new>`` on a device that holds
``<old>`` (:mod:`edge_agent.delta`), made on the first request and cached at that path under the store
(:class:`packager.delta.DeltaCache`), served with the same ranges. When the store lacks either bundle, or
no delta would be smaller than the bundle, the answer is 404 with ``{"error": ...}``: the device then
downloads the whole bundle. Each answer with a body is one INFO line with the bytes sent (``-v``).

Publishing a bundle into the store also lists it as a TUF target when a repository exists there
(``edgedeploy repo init``), so ``fleet rollout`` and ``repo add`` leave devices nothing unsigned.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from edge_agent.atomic import fsync_dir
from edge_agent.auth import TokenFile
from edge_agent.bundle import bundle_sha256
from edge_agent.errors import AuthError, NotFoundError
from edge_agent.home import edgedeploy_home
from packager.delta import DeltaCache
from packager.tuf_repo import TufRepository, metadata_dir, repository_exists

__all__ = ["BundleServer", "bundles_dir", "publish_bundle"]

log = logging.getLogger(__name__)

_PATH = re.compile(r"^/bundles/([0-9a-f]{64})\.edb$")
_DELTA_PATH = re.compile(r"^/bundles/([0-9a-f]{64})\.edb\.delta/([0-9a-f]{64})$")
_METADATA = re.compile(r"^/metadata/((?:[0-9]+\.)?(?:root|timestamp|snapshot|targets)\.json)$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CHUNK = 256 * 1024


def bundles_dir(home: Path | None = None) -> Path:
    """The content-addressed bundle store (created on demand)."""
    folder = (home or edgedeploy_home()) / "bundles"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def publish_bundle(path: Path, home: Path | None = None) -> tuple[str, str]:
    """Copy a bundle into the store under its sha256 (and list it as a TUF target when a repository
    exists); returns (sha256, url path). Idempotent."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"bundle {path} does not exist: give the path of a .edb file")
    sha = bundle_sha256(path)
    folder = bundles_dir(home)
    target = folder / f"{sha}.edb"
    if not target.exists():
        tmp = folder / f".{sha}.{os.getpid()}.tmp"
        shutil.copyfile(path, tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_dir(folder)
    if repository_exists(home):
        TufRepository.open(home).add_bundle(target)
    return sha, f"/bundles/{sha}.edb"


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a single byte range, or None when it cannot be satisfied."""
    match = _RANGE.match(header.strip())
    if not match or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if not first:  # suffix range: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            return None
        return max(0, size - length), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


class _Handler(BaseHTTPRequestHandler):
    """Serves ``/bundles/<sha256>.edb`` from the server's store and ``/metadata/*.json`` beside it."""

    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _error(self, status: HTTPStatus, extra: dict[str, str] | None = None, message: str | None = None) -> None:
        data = json.dumps({"error": message or status.phrase}).encode()
        self.send_response(status)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _resolve(self, url_path: str) -> tuple[Path, str, dict[str, str]] | None:
        """(file, content type, extra headers) for a served path; None for anything else.

        A delta is made (and cached) on its first request; NotFoundError when it cannot be.
        """
        if delta := _DELTA_PATH.match(url_path):
            new, old = delta.groups()
            return self.server.deltas.get(new, old), "application/octet-stream", {"ETag": f'"{new}-{old}"'}
        match = _PATH.match(url_path)
        if match:
            sha = match.group(1)
            return self.server.store / f"{sha}.edb", "application/octet-stream", {"ETag": f'"{sha}"'}
        match = _METADATA.match(url_path)
        if match:
            name = match.group(1)
            cache = "no-cache" if name in ("timestamp.json", "root.json") else "public, max-age=31536000, immutable"
            return self.server.metadata / name, "application/json", {"Cache-Control": cache}
        return None

    def _serve(self, body: bool) -> None:
        if self.server.tokens is not None:
            try:
                self.server.tokens.check(self.headers.get("Authorization"))
            except AuthError as exc:
                self._error(HTTPStatus.UNAUTHORIZED, {"WWW-Authenticate": "Bearer"}, str(exc))
                return
        url_path = self.path.split("?", 1)[0]
        try:
            found = self._resolve(url_path)
        except NotFoundError as exc:
            log.info("no delta for %s: %s", url_path, exc)
            self._error(HTTPStatus.NOT_FOUND, message=str(exc))
            return
        if found is None:
            self._error(HTTPStatus.NOT_FOUND)
            return
        path, content_type, extra = found
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed by the with below; 404 needs the try
        except FileNotFoundError:
            self._error(HTTPStatus.NOT_FOUND)
            return
        with handle:
            size = os.fstat(handle.fileno()).st_size
            start, end, status = 0, size - 1, HTTPStatus.OK
            header, etag = self.headers.get("Range"), extra.get("ETag")
            if header and (etag is None or self.headers.get("If-Range", etag).strip() == etag):
                parsed = _parse_range(header, size)
                if parsed is None:
                    self._error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, {"Content-Range": f"bytes */{size}"})
                    return
                start, end = parsed
                status = HTTPStatus.PARTIAL_CONTENT
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            for key, value in extra.items():
                self.send_header(key, value)
            if status == HTTPStatus.PARTIAL_CONTENT:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if body:
                sent = self._copy(handle, start, end - start + 1)
                log.info("sent %d bytes of %s to %s", sent, self.path.split("?", 1)[0], self.address_string())

    def _copy(self, handle, start: int, remaining: int) -> int:  # type: ignore[no-untyped-def]
        handle.seek(start)
        sent = 0
        try:
            while remaining > 0:
                chunk = handle.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("client went away during a download")
        return sent


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    store: Path
    tokens: TokenFile | None
    deltas: DeltaCache
    metadata: Path


class BundleServer:
    """The bundle server bound to ``host:port`` (0 = a free port); ``start()`` runs it in a thread.

    With ``token_file``, only requests bearing one of its tokens are served.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, home: Path | None = None,
                 token_file: Path | None = None) -> None:
        self._host = host
        tokens = TokenFile(token_file) if token_file is not None else None
        self._httpd = _Server((host, port), _Handler)
        self._httpd.store = bundles_dir(home)
        self._httpd.tokens = tokens
        self._httpd.deltas = DeltaCache(self._httpd.store)
        self._httpd.metadata = metadata_dir(home)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL devices use, e.g. ``http://127.0.0.1:8080``."""
        return f"http://{self._host}:{self.port}"

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="bundle-server", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted."""
        try:
            self._httpd.serve_forever()
        finally:
            self._httpd.server_close()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
