"""The bundle server, for real: full and ranged GETs, HEAD, ETag, 404, 416, path traversal and tokens."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.auth import create_token_file, read_token
from edge_agent.download import download_bundle
from edge_agent.errors import DeploymentError, ValidationError
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


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "bundle.token"
    assert create_token_file(path) and not create_token_file(path)  # an existing file is never replaced
    return path


@pytest.fixture
def guarded(edgedeploy_home: Path, token_file: Path) -> Iterator[BundleServer]:
    srv = BundleServer(port=0, token_file=token_file)
    srv.start()
    yield srv
    srv.stop()


def test_a_token_file_makes_every_request_bear_a_token_and_ranges_still_work(
        guarded: BundleServer, bundle: tuple[str, str, bytes], token_file: Path) -> None:
    _, url_path, data = bundle
    token = read_token(token_file)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"},
                    {"Authorization": "Bearer "}):
        for method in ("GET", "HEAD"):
            status, answer, body = request(guarded, method, url_path, headers)
            assert status == 401 and answer["www-authenticate"] == "Bearer", (headers, status)
            if method == "GET":
                assert "error" in json.loads(body) and token not in body.decode()
    bearer = {"Authorization": f"Bearer {token}"}
    assert request(guarded, "GET", f"/bundles/{'0' * 64}.edb", bearer)[0] == 404
    status, _, body = request(guarded, "GET", url_path, bearer)
    assert status == 200 and body == data
    status, _, tail = request(guarded, "GET", url_path, {**bearer, "Range": "bytes=-4"})
    assert status == 206 and tail == b"tail"

    # rotation: a second line is accepted at once, and the first stops working when it is removed
    token_file.write_text(f"{token}\nnew-token-for-the-fleet\n")
    assert request(guarded, "GET", url_path, {"Authorization": "Bearer new-token-for-the-fleet"})[0] == 200
    token_file.write_text("new-token-for-the-fleet\n")
    assert request(guarded, "GET", url_path, bearer)[0] == 401


def test_the_agent_download_sends_the_token_and_resumes_with_range(
        guarded: BundleServer, bundle: tuple[str, str, bytes], token_file: Path, tmp_path: Path) -> None:
    sha, url_path, data = bundle
    folder = tmp_path / "downloads"
    with pytest.raises(DeploymentError, match="HTTP 401"):
        download_bundle(guarded.url + url_path, sha, folder)
    folder.mkdir(exist_ok=True)
    (folder / f"{sha}.part").write_bytes(data[:1000])  # a cut transfer: only the rest is asked for
    path = download_bundle(guarded.url + url_path, sha, folder, token=read_token(token_file))
    assert path.read_bytes() == data


def test_an_empty_token_file_is_refused_at_start(edgedeploy_home: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.token"
    empty.write_text("# no token yet\n")
    with pytest.raises(ValidationError, match="holds no token"):
        BundleServer(port=0, token_file=empty)
