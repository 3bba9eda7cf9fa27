"""Bundle download against a real local HTTP server with Range support."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edge_agent.download import DownloadLimits, download_bundle
from edge_agent.errors import DeploymentError, IntegrityError, ValidationError
from tests.servers import dripping_server

BLOB = os.urandom(300_000)
SHA = hashlib.sha256(BLOB).hexdigest()


class RangeServer(ThreadingHTTPServer):
    """Serves BLOB at any path; ``cut_after`` drops the connection after that many body bytes once."""

    daemon_threads = True
    cut_after: int | None = None
    send_length = True
    ranges: list[str | None]


class Handler(BaseHTTPRequestHandler):
    server: RangeServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
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
        if self.server.send_length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.close_connection = True  # the body ends when the connection does
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
    httpd.send_length = True
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


@pytest.fixture
def drip() -> Iterator[str]:
    with dripping_server(BLOB) as base:
        yield f"{base}/bundles/{SHA}.edb"


def test_a_dripping_server_is_cut_off_at_the_total_deadline(drip: str, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(DeploymentError, match="took over 1s"):
        download_bundle(drip, SHA, tmp_path, DownloadLimits(deadline_s=1, min_bytes_per_s=0))
    assert time.monotonic() - started < 3  # each read is short: nothing waits out the 30 s read timeout
    assert 0 < (tmp_path / f"{SHA}.part").stat().st_size < len(BLOB)  # kept for the resume


def test_a_server_below_the_minimum_rate_is_cut_off(drip: str, tmp_path: Path) -> None:
    started = time.monotonic()
    limits = DownloadLimits(deadline_s=600, min_bytes_per_s=1000, rate_window_s=0.5)
    with pytest.raises(DeploymentError, match="under the minimum of 1000"):
        download_bundle(drip, SHA, tmp_path, limits)
    assert time.monotonic() - started < 3


def test_a_download_is_abandoned_when_the_caller_says_so(drip: str, tmp_path: Path) -> None:
    newer = threading.Timer(0.5, lambda: None)
    newer.start()
    started = time.monotonic()
    with pytest.raises(DeploymentError, match="abandoned: a newer order arrived"):
        download_bundle(drip, SHA, tmp_path, DownloadLimits(min_bytes_per_s=0),
                        abandon=lambda: not newer.is_alive())
    assert time.monotonic() - started < 3


def test_only_the_current_orders_download_is_kept_on_disk(server: RangeServer, tmp_path: Path) -> None:
    """Five over-limit orders with new sha256 values once left five partial files behind."""
    limit = DownloadLimits(max_bytes=len(BLOB) - 1)
    server.send_length = False  # the size shows only while the bytes arrive
    for _ in range(5):
        other = hashlib.sha256(os.urandom(8)).hexdigest()
        with pytest.raises(DeploymentError, match="limit"):
            download_bundle(url(server), other, tmp_path, limit)
    assert list(tmp_path.iterdir()) == []
    stale = tmp_path / f"{'1' * 64}.part"
    stale.write_bytes(b"x" * 1000)  # an abandoned order's partial file; a wrong old bundle too
    (tmp_path / f"{'2' * 64}.edb").write_bytes(b"y" * 1000)
    server.send_length, server.cut_after = True, 100_000
    with pytest.raises(DeploymentError, match="resumes"):
        download_bundle(url(server), SHA, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f"{SHA}.part"]  # only the one being resumed
