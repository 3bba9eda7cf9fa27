"""Delta updates: made by packager.delta, applied by edge_agent.delta, served by the bundle server and fetched
by edge_agent.fetch, with real bundles of a digits MLP (skl2onnx) and real HTTP servers on loopback.

The whole-fleet path (a real agent against ``edgedeploy serve``) is in tests/e2e/test_delta_update.py.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import http.client
import json
import logging
import random
import re
import struct
import threading
import tracemalloc
import zlib
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import bsdiff4.core
import pytest

from edge_agent.bundle import MANIFEST_NAME, bundle_sha256, open_bundle, verify_bundle
from edge_agent.delta import COPY, LITERAL, MAGIC, OP, PATCH, DeltaBase, DeltaHeader, apply_delta
from edge_agent.errors import BundleError, DeltaError, DeploymentError
from edge_agent.fetch import delta_url, fetch_bundle
from packager.bundle_server import BundleServer, bundles_dir, publish_bundle
from packager.delta import DeltaCache, delta_cache_path, make_delta
from packager.keys import SigningKey
from tests.delta_bundles import DigitsModels, build_digits_models, onnx_bundle

SCRIPT = b"def init():\n    pass\n\n\ndef run(data):\n    return {'version': %d}\n"
UPDATES = ("new entry script", "new samples", "last layer retrained", "fully retrained")
LIMIT = 1 << 30


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> DigitsModels:
    return build_digits_models(tmp_path_factory.mktemp("delta-models"))


@pytest.fixture
def bundles(models: DigitsModels, signing_key: SigningKey, tmp_path: Path) -> dict[str, Path]:
    """Version 1, and each kind of update to it as version 2."""
    folder = tmp_path / "bundles"
    return {
        "v1": onnx_bundle(folder / "v1.edb", models.base, signing_key, 1, script=SCRIPT % 1),
        "new entry script": onnx_bundle(folder / "script.edb", models.base, signing_key, 2, script=SCRIPT % 2),
        "new samples": onnx_bundle(folder / "samples.edb", models.base, signing_key, 2, sample_row=7,
                                   script=SCRIPT % 1),
        "last layer retrained": onnx_bundle(folder / "head.edb", models.head, signing_key, 2, script=SCRIPT % 1),
        "fully retrained": onnx_bundle(folder / "full.edb", models.full, signing_key, 2, script=SCRIPT % 1),
    }


def installed(bundle: Path, folder: Path) -> DeltaBase:
    """The bundle unpacked as an agent's active slot holds it."""
    open_bundle(bundle, folder)
    return DeltaBase(bundle_sha256(bundle), folder)


@pytest.mark.parametrize("update", UPDATES)
def test_a_delta_rebuilds_the_exact_bundle(update: str, bundles: dict[str, Path], models: DigitsModels,
                                           tmp_path: Path) -> None:
    old, new = bundles["v1"], bundles[update]
    summary = make_delta(old, new, tmp_path / "v1-to-v2.delta")
    base = installed(old, tmp_path / "slot")
    rebuilt = apply_delta(summary.path, base, bundle_sha256(new), tmp_path / "rebuilt.edb", LIMIT)
    assert rebuilt.read_bytes() == new.read_bytes()
    assert verify_bundle(rebuilt).version == 2  # signature, trust and every file's hash, as for a download
    model_size = models.base.stat().st_size
    if update == "fully retrained":  # every weight differs: the model travels whole, as a literal
        assert summary.patched == 0 and summary.literal > model_size and summary.ratio > 0.8
    elif update == "last layer retrained":
        assert summary.patched == model_size and summary.ratio <= 0.2, summary
    else:  # the model file is copied from the base
        assert summary.copied >= model_size and summary.patched == 0 and summary.ratio <= 0.1, summary


def test_a_delta_applies_only_to_its_base_and_target(bundles: dict[str, Path], tmp_path: Path) -> None:
    old, new = bundles["v1"], bundles["last layer retrained"]
    delta = make_delta(old, new, tmp_path / "d.delta").path
    base = installed(old, tmp_path / "slot")
    out = tmp_path / "out.edb"
    other = installed(bundles["new samples"], tmp_path / "other")
    with pytest.raises(DeltaError, match="applies to bundle"):
        apply_delta(delta, other, bundle_sha256(new), out, LIMIT)
    with pytest.raises(DeltaError, match="the order is for"):
        apply_delta(delta, base, "0" * 64, out, LIMIT)
    with pytest.raises(DeltaError, match="over the .* byte limit"):
        apply_delta(delta, base, bundle_sha256(new), out, 1000)
    manifest = base.folder / MANIFEST_NAME
    original = manifest.read_bytes()
    manifest.write_bytes(original + b" ")
    with pytest.raises(DeltaError, match="not the one the delta was made against"):
        apply_delta(delta, base, bundle_sha256(new), out, LIMIT)
    manifest.write_bytes(original)
    model = base.folder / "model" / "model.onnx"
    model.write_bytes(b"\0" + model.read_bytes()[1:])  # the file a patch applies to was changed on the device
    with pytest.raises(DeltaError, match="no longer matches its manifest"):
        apply_delta(delta, base, bundle_sha256(new), out, LIMIT)
    assert not out.exists()


def test_a_copy_from_a_changed_base_file_ends_in_a_sha256_mismatch(bundles: dict[str, Path], tmp_path: Path) -> None:
    old, new = bundles["v1"], bundles["new samples"]
    delta = make_delta(old, new, tmp_path / "d.delta").path
    base = installed(old, tmp_path / "slot")
    model = base.folder / "model" / "model.onnx"
    model.write_bytes(b"\0" + model.read_bytes()[1:])
    # the changed byte compresses to other bytes: a wrong hash at the end, or a size past the declared one
    with pytest.raises(DeltaError, match="the rebuilt bundle (has sha256|grows past)"):
        apply_delta(delta, base, bundle_sha256(new), tmp_path / "out.edb", LIMIT)
    assert not (tmp_path / "out.edb").exists()


def _first_op_at(data: bytes) -> int:
    (length,) = struct.unpack(">I", data[8:12])
    return 12 + length


def test_every_flipped_byte_and_every_truncation_is_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    """Copy, literal and patch ops all appear; a change anywhere is refused or, where it decodes to the same
    bytes (bz2's block-size digit, padding bits), rebuilds the exact bundle: never anything else, never a crash."""
    old, new = bundles["v1"], bundles["last layer retrained"]
    summary = make_delta(old, new, tmp_path / "d.delta")
    assert summary.copied and summary.patched and summary.literal
    data = summary.path.read_bytes()
    base = installed(old, tmp_path / "slot")
    sha = bundle_sha256(new)
    first_op = _first_op_at(data)
    rng = random.Random(0)
    flips = set(range(12)) | set(range(first_op, first_op + 2 * OP.size)) | set(rng.sample(range(len(data)), 80))
    flips |= set(rng.sample(range(12, first_op), 20))
    cuts = {0, 5, 11, 12, first_op - 1, first_op, first_op + 3, first_op + OP.size, len(data) - 1}
    cuts |= set(rng.sample(range(len(data)), 20))
    hostile, out = tmp_path / "hostile.delta", tmp_path / "out.edb"
    refused = 0
    for i in sorted(flips):
        hostile.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])
        try:
            rebuilt = apply_delta(hostile, base, sha, out, LIMIT)
        except DeltaError:
            assert not out.exists(), f"byte {i}"
            refused += 1
            continue
        assert rebuilt.read_bytes() == new.read_bytes(), f"byte {i} flipped: applied to other bytes"
        rebuilt.unlink()
    assert refused >= 0.9 * len(flips)
    for n in sorted(cuts):
        hostile.write_bytes(data[:n])
        with pytest.raises(DeltaError):
            apply_delta(hostile, base, sha, out, LIMIT)
        assert not out.exists(), f"cut at {n}"
    hostile.write_bytes(data + b"\0")
    with pytest.raises(DeltaError, match="follow the delta's last op"):
        apply_delta(hostile, base, sha, out, LIMIT)


@pytest.fixture
def hostile_case(bundles: dict[str, Path], tmp_path: Path) -> tuple[DeltaBase, str, Path]:
    old = bundles["v1"]
    return installed(old, tmp_path / "slot"), bundle_sha256(bundles["new samples"]), tmp_path / "hostile.delta"


def _header(base: DeltaBase, target: str, tar_size: int, ops: int, target_size: int = 10_000) -> bytes:
    manifest = hashlib.sha256((base.folder / MANIFEST_NAME).read_bytes()).hexdigest()
    return DeltaHeader(base.bundle_sha256, manifest, target, target_size, tar_size, ops).encode()


def _bsdiff(length: int, control: bytes, diff: bytes) -> bytes:
    """A BSDIFF40 patch from raw blocks (``diff`` already bz2-compressed) with an empty extra block."""
    control = bz2.compress(control)
    encode = bsdiff4.core.encode_int64
    return b"BSDIFF40" + encode(len(control)) + encode(len(diff)) + encode(length) + control + diff + bz2.compress(b"")


def _hostile_deltas(base: DeltaBase, target: str) -> list[tuple[str, bytes]]:
    """Deltas an attacker writes: each declares more than it holds, or more than a device can give."""
    huge = 1 << 62
    one_op = _header(base, target, 100, 1)
    encode = bsdiff4.core.encode_int64
    bomb = _bsdiff(10_000, encode(10_000) + encode(0) + encode(0), bz2.compress(b"\0" * 16_000_000))
    zlib_bomb = zlib.compress(b"\0" * 16_000_000)
    return [
        ("wrong magic", b"NOTDELTA" + b"\0" * 40),
        ("header length 2 GiB", MAGIC + struct.pack(">I", 1 << 31) + b"{}"),
        ("header not JSON", MAGIC + struct.pack(">I", 3) + b"{[}"),
        ("10^12 ops", _header(base, target, 100, 10**12)),
        ("a 4 EiB bundle", _header(base, target, 100, 1, target_size=huge)),
        ("a 4 EiB tar stream", _header(base, target, huge, 1)),
        ("a literal of 4 EiB", one_op + OP.pack(LITERAL, 0, 0, huge, 10)),
        ("a literal storing 4 EiB", one_op + OP.pack(LITERAL, 0, 0, 100, huge)),
        ("a copy from file 10^6", one_op + OP.pack(COPY, 10**6, 0, 100, 0)),
        ("a copy past the file's end", one_op + OP.pack(COPY, 0, huge, 100, 0)),
        ("a copy carrying data", one_op + OP.pack(COPY, 0, 0, 100, 1) + b"x"),
        ("a literal naming a file", one_op + OP.pack(LITERAL, 3, 0, 100, 0)),
        ("an op of kind X", one_op + OP.pack(b"X", 0, 0, 100, 0)),
        ("a patch making 8 GiB", _header(base, target, 8 << 30, 1) + OP.pack(PATCH, 0, 0, 8 << 30, 32)
         + _bsdiff(8 << 30, b"", b"")[:32]),
        ("a bz2 bomb in a patch", _header(base, target, 10_000, 1) + OP.pack(PATCH, 0, 0, 10_000, len(bomb)) + bomb),
        ("a zlib bomb in a literal", _header(base, target, 1000, 1) + OP.pack(LITERAL, 0, 0, 1000, len(zlib_bomb))
         + zlib_bomb),
    ]


def test_hostile_deltas_are_refused_before_they_allocate(hostile_case: tuple[DeltaBase, str, Path]) -> None:
    base, target, path = hostile_case
    out = path.with_name("out.edb")
    cases = _hostile_deltas(base, target)
    tracemalloc.start()
    try:
        for what, content in cases:
            path.write_bytes(content)
            tracemalloc.reset_peak()
            with pytest.raises(DeltaError) as refused:
                apply_delta(path, base, target, out, LIMIT, patch_budget=512 << 20)
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < 8 << 20, f"{what}: {peak} bytes allocated"
            assert "\n" not in str(refused.value) and not out.exists(), what
    finally:
        tracemalloc.stop()


def test_a_patch_over_the_memory_budget_is_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    old, new = bundles["v1"], bundles["last layer retrained"]
    delta = make_delta(old, new, tmp_path / "d.delta").path
    base = installed(old, tmp_path / "slot")
    with pytest.raises(DeltaError, match="needs about .* bytes of memory, over this device's budget of 100000"):
        apply_delta(delta, base, bundle_sha256(new), tmp_path / "out.edb", LIMIT, patch_budget=100_000)


def test_no_delta_is_made_for_a_bundle_that_does_not_compress_back(bundles: dict[str, Path], tmp_path: Path) -> None:
    """A bundle gzip'ed at another level holds the same tar stream, but no device could rebuild its bytes."""
    other = tmp_path / "level9.edb"
    other.write_bytes(gzip.compress(gzip.decompress(bundles["new samples"].read_bytes()), 9, mtime=0))
    verify_bundle(other)  # a valid bundle all the same
    with pytest.raises(BundleError, match="does not compress back to its own bytes"):
        make_delta(bundles["v1"], other, tmp_path / "d.delta")
    garbage = tmp_path / "garbage.edb"
    garbage.write_bytes(b"not a bundle")
    with pytest.raises(BundleError, match="not a readable bundle"):
        make_delta(garbage, bundles["new samples"], tmp_path / "d.delta")


# --- served and fetched -------------------------------------------------------------------------------


@pytest.fixture
def server(edgedeploy_home: Path) -> Iterator[BundleServer]:
    srv = BundleServer(port=0)
    srv.start()
    yield srv
    srv.stop()


def sent(caplog: pytest.LogCaptureFixture) -> dict[str, int]:
    """Bytes the bundle server sent, by URL path (its INFO access lines)."""
    totals: dict[str, int] = {}
    for record in caplog.records:
        if record.name == "packager.bundle_server" and (m := re.match(r"sent (\d+) bytes of (\S+)", record.message)):
            totals[m.group(2)] = totals.get(m.group(2), 0) + int(m.group(1))
    return totals


def fetch_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.message for r in caplog.records if r.name == "edge_agent.fetch"]


def test_fetch_rebuilds_from_a_delta_and_the_server_sends_a_fraction(
        server: BundleServer, bundles: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    old, new = bundles["v1"], bundles["last layer retrained"]
    publish_bundle(old)
    sha, url_path = publish_bundle(new)
    base = installed(old, tmp_path / "slot")
    path = fetch_bundle(server.url + url_path, sha, tmp_path / "downloads", base=base)
    assert path == tmp_path / "downloads" / f"{sha}.edb" and path.read_bytes() == new.read_bytes()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no delta or partial file left
    delta_path = f"{url_path}.delta/{base.bundle_sha256}"
    assert list(sent(caplog)) == [delta_path]  # the bundle itself never travelled
    assert sent(caplog)[delta_path] <= 0.2 * new.stat().st_size
    assert any("rebuilt from a" in line for line in fetch_log(caplog))
    assert delta_cache_path(bundles_dir(), sha, base.bundle_sha256).is_file()  # cached for the next device


def test_a_server_without_the_base_bundle_falls_back_to_the_whole_bundle(
        server: BundleServer, bundles: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    old, new = bundles["v1"], bundles["new entry script"]
    sha, url_path = publish_bundle(new)  # the server never held v1
    path = fetch_bundle(server.url + url_path, sha, tmp_path / "downloads", base=installed(old, tmp_path / "slot"))
    assert path.read_bytes() == new.read_bytes()
    assert sent(caplog) == {url_path: new.stat().st_size}
    (line,) = fetch_log(caplog)
    assert "HTTP 404" in line and "downloading the whole bundle" in line


def test_a_corrupt_cached_delta_falls_back_to_the_whole_bundle(
        server: BundleServer, bundles: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    old, new = bundles["v1"], bundles["last layer retrained"]
    old_sha, _ = publish_bundle(old)
    sha, url_path = publish_bundle(new)
    cached = DeltaCache(bundles_dir()).get(sha, old_sha)
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0x40
    cached.write_bytes(bytes(data))
    path = fetch_bundle(server.url + url_path, sha, tmp_path / "downloads", base=installed(old, tmp_path / "slot"))
    assert path.read_bytes() == new.read_bytes()
    assert sent(caplog)[url_path] == new.stat().st_size
    (line,) = fetch_log(caplog)
    assert "no delta update" in line and "downloading the whole bundle" in line


def test_no_delta_is_served_when_it_would_not_be_smaller(
        server: BundleServer, bundles: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    old, new = bundles["v1"], bundles["fully retrained"]
    old_sha, _ = publish_bundle(old)
    sha, url_path = publish_bundle(new)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", f"{url_path}.delta/{old_sha}")
    response = conn.getresponse()
    assert response.status == 404 and "no smaller than the bundle" in json.loads(response.read())["error"]
    conn.close()
    path = fetch_bundle(server.url + url_path, sha, tmp_path / "downloads", base=installed(old, tmp_path / "slot"))
    assert path.read_bytes() == new.read_bytes()


def test_delta_ranges_head_and_unknown_bundles(server: BundleServer, bundles: dict[str, Path]) -> None:
    old_sha, _ = publish_bundle(bundles["v1"])
    sha, url_path = publish_bundle(bundles["new samples"])
    delta_path = f"{url_path}.delta/{old_sha}"

    def request(method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.request(method, path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    status, headers, whole = request("GET", delta_path)
    assert status == 200 and whole.startswith(MAGIC) and headers["etag"] == f'"{sha}-{old_sha}"'
    status, headers, body = request("HEAD", delta_path)
    assert status == 200 and body == b"" and int(headers["content-length"]) == len(whole)
    status, _, tail = request("GET", delta_path, {"Range": "bytes=10-"})
    assert status == 206 and tail == whole[10:]
    status, headers, body = request("GET", f"{url_path}.delta/{'0' * 64}")
    assert status == 404 and headers["content-type"] == "application/json"
    assert "no bundle 000" in json.loads(body)["error"]
    assert request("GET", f"{url_path}.delta/../../x")[0] == 404


class _StaticServer(ThreadingHTTPServer):
    daemon_threads = True
    paths: list[str]


class _Static(SimpleHTTPRequestHandler):
    """Python's static file server: what a CDN or object store holding the bundle folder does."""

    server: _StaticServer

    def log_message(self, format: str, *args: object) -> None:
        self.server.paths.append(self.path)


@pytest.fixture
def static_server(edgedeploy_home: Path) -> Iterator[str]:
    httpd = _StaticServer(("127.0.0.1", 0), functools.partial(_Static, directory=str(edgedeploy_home)))
    httpd.paths = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_a_static_server_serves_cached_deltas_and_without_one_the_device_downloads_the_bundle(
        static_server: str, bundles: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    old, new = bundles["v1"], bundles["new samples"]
    old_sha, _ = publish_bundle(old)
    sha, url_path = publish_bundle(new)
    base = installed(old, tmp_path / "slot")
    first = fetch_bundle(static_server + url_path, sha, tmp_path / "first", base=base)
    assert first.read_bytes() == new.read_bytes() and "HTTP 404" in fetch_log(caplog)[0]
    DeltaCache(bundles_dir()).get(sha, old_sha)  # what edgedeploy serve keeps, or a publisher precomputes
    caplog.clear()
    second = fetch_bundle(static_server + url_path, sha, tmp_path / "second", base=base)
    assert second.read_bytes() == new.read_bytes() and "rebuilt from a" in fetch_log(caplog)[0]


def test_a_newer_order_abandons_the_delta_instead_of_falling_back(
        server: BundleServer, bundles: dict[str, Path], tmp_path: Path) -> None:
    old, new = bundles["v1"], bundles["new samples"]
    publish_bundle(old)
    sha, url_path = publish_bundle(new)
    with pytest.raises(DeploymentError, match="abandoned"):
        fetch_bundle(server.url + url_path, sha, tmp_path / "downloads", base=installed(old, tmp_path / "slot"),
                     abandon=lambda: True)
    assert not any((tmp_path / "downloads").iterdir())


def test_the_delta_url_keeps_the_query() -> None:
    old = "a" * 64
    assert delta_url("https://cdn.example/b/x.edb?token=t", old) == f"https://cdn.example/b/x.edb.delta/{old}?token=t"

