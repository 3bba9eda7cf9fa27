"""Bundle download against a real local HTTP server with Range support."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edge_agent.download import DownloadLimits, download_bundle
from edge_agent.errors import DeploymentError, IntegrityError, ValidationError

BLOB = os.urandom(300_000)
SHA = hashlib.sha256(BLOB).hexdigest()


class RangeServer(ThreadingHTTPServer):
    """Serves BLOB at any path; ``cut_after`` drops the connection after that many body bytes once."""

    daemon_threads = True
    cut_after: int | None = None
    ranges: list[str | None]


class Handler(BaseHTTPRequestHandler):
    server: RangeServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence the test server
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        header = self.headers.get("Range")
        self.server.ranges.append(header)
        start = int(header.split("=")[1].rstrip("-")) if header else 0
        if start >= len(BLOB):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(BLOB)}")
            self.end_headers()
            return
        body = BLOB[start:]
        self.send_response(206 if header else 200)
        if header:
            self.send_header("Content-Range", f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut, self.server.cut_after = self.server.cut_after, None
        self.wfile.write(body[:cut] if cut is not None else body)
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True


@pytest.fixture
def server() -> Iterator[RangeServer]:
    httpd = RangeServer(("127.0.0.1", 0), Handler)
    httpd.ranges = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def url(server: RangeServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/bundles/{SHA}.edb"


def test_download_checks_the_sha_and_reuses_a_finished_file(server: RangeServer, tmp_path: Path) -> None:
    path = download_bundle(url(server), SHA, tmp_path)
    assert path.read_bytes() == BLOB and path.name == f"{SHA}.edb"
    assert download_bundle(url(server), SHA, tmp_path) == path
    assert server.ranges == [None]  # the second call did not download again


def test_an_interrupted_download_resumes_with_range(server: RangeServer, tmp_path: Path) -> None:
    server.cut_after = 100_000
    with pytest.raises(DeploymentError, match="resumes"):
        download_bundle(url(server), SHA, tmp_path)
    part = tmp_path / f"{SHA}.part"
    assert part.stat().st_size == 100_000
    path = download_bundle(url(server), SHA, tmp_path)
    assert server.ranges[-1] == "bytes=100000-"
    assert path.read_bytes() == BLOB and not part.exists()


def test_a_sha_mismatch_is_refused(server: RangeServer, tmp_path: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(IntegrityError, match="refused"):
        download_bundle(url(server), wrong, tmp_path)
    assert not (tmp_path / f"{wrong}.edb").exists() and not (tmp_path / f"{wrong}.part").exists()


def test_size_cap_and_bad_orders(server: RangeServer, tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match="limit"):
        download_bundle(url(server), SHA, tmp_path, DownloadLimits(max_bytes=1000))
    with pytest.raises(ValidationError, match="http"):
        download_bundle("file:///etc/passwd", SHA, tmp_path)
    with pytest.raises(ValidationError, match="sha256"):
        download_bundle(url(server), "nothex", tmp_path)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    with pytest.raises(DeploymentError, match="failed"):
        download_bundle(f"http://127.0.0.1:{closed}/bundles/x.edb", SHA, tmp_path / "x")
