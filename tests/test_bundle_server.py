"""The bundle server, for real: full and ranged GETs, HEAD, ETag, 404, 416 and path traversal."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest

from packager.bundle_server import BundleServer, publish_bundle


@pytest.fixture
def server(edgedeploy_home: Path) -> Iterator[BundleServer]:
    srv = BundleServer(port=0)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def bundle(tmp_path: Path) -> tuple[str, str, bytes]:
    data = bytes(range(256)) * 4000 + b"tail"
    path = tmp_path / "x.edb"
    path.write_bytes(data)
    sha, url_path = publish_bundle(path)
    return sha, url_path, data


def request(srv: BundleServer, method: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_publish_is_content_addressed(bundle: tuple[str, str, bytes], edgedeploy_home: Path) -> None:
    sha, url_path, data = bundle
    assert url_path == f"/bundles/{sha}.edb"
    assert (edgedeploy_home / "bundles" / f"{sha}.edb").read_bytes() == data


def test_full_get_and_head(server: BundleServer, bundle: tuple[str, str, bytes]) -> None:
    sha, url_path, data = bundle
    status, headers, body = request(server, "GET", url_path)
    assert status == 200 and body == data
    assert headers["etag"] == f'"{sha}"' and headers["accept-ranges"] == "bytes"
    status, headers, body = request(server, "HEAD", url_path)
    assert status == 200 and body == b"" and int(headers["content-length"]) == len(data)


def test_range_requests_resume_to_identical_bytes(server: BundleServer, bundle: tuple[str, str, bytes]) -> None:
    sha, url_path, data = bundle
    cut = 123_457
    status, _, first = request(server, "GET", url_path, {"Range": f"bytes=0-{cut - 1}"})
    assert status == 206 and len(first) == cut
    status, headers, rest = request(server, "GET", url_path, {"Range": f"bytes={cut}-"})
    assert status == 206 and headers["content-range"] == f"bytes {cut}-{len(data) - 1}/{len(data)}"
    assert first + rest == data
    status, _, last = request(server, "GET", url_path, {"Range": "bytes=-4"})
    assert status == 206 and last == b"tail"


@pytest.mark.parametrize("header", [lambda n: f"bytes={n}-", lambda n: "bytes=10-5", lambda n: "items=0-1"])
def test_unsatisfiable_ranges_are_416(server: BundleServer, bundle: tuple[str, str, bytes], header) -> None:  # type: ignore[no-untyped-def]
    _, url_path, data = bundle
    status, headers, _ = request(server, "GET", url_path, {"Range": header(len(data))})
    assert status == 416 and headers["content-range"] == f"bytes */{len(data)}"


def test_unknown_bundle_is_404(server: BundleServer) -> None:
    assert request(server, "GET", f"/bundles/{'0' * 64}.edb")[0] == 404


@pytest.mark.parametrize("path", ["/bundles/../../etc/passwd", "/bundles/%2e%2e/secret.edb",
                                  "/../bundles/x.edb", "/etc/passwd", "/bundles/"])
def test_paths_outside_the_store_are_refused(server: BundleServer, bundle: tuple[str, str, bytes],
                                             path: str) -> None:
    assert request(server, "GET", path)[0] == 404
