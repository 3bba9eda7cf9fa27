"""Hostile bundles that cost nothing to make and used to cost gigabytes or a traceback to check.

Each archive is written byte by byte as an attacker would (no signing key needed): a tar header bomb
(GNU long name, pax record) and manifests or signatures that are deeply nested or hold numbers out of
range. The device must refuse each with a BundleError while its memory stays flat, and the CLI with one
``error:`` line.
"""

from __future__ import annotations

import base64
import gzip
import io
import subprocess
import sys
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.bundle import BundleManifest, canonical_json, open_bundle, read_manifest, verify_bundle
from edge_agent.errors import BundleError, UnsafeArchiveError, UntrustedKeyError
from edge_agent.trust import TrustStore
from packager.bundle import write_bundle
from packager.keys import SigningKey, generate_key

HEADER_BOMB_BYTES = 64 << 20  # 64 MiB of header data, about 64 KB on disk


def _header_bomb(path: Path, kind: bytes) -> Path:
    """A gzip'd tar whose first member is a huge extended header, then a tiny manifest."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as gz:
        header = tarfile.TarInfo("././@LongLink")
        header.type, header.size = kind, HEADER_BOMB_BYTES
        gz.write(header.tobuf(tarfile.GNU_FORMAT))
        chunk = b"a" * (1 << 20)
        for _ in range(HEADER_BOMB_BYTES >> 20):
            gz.write(chunk)
        manifest = tarfile.TarInfo("manifest.json")
        manifest.size = 2
        gz.write(manifest.tobuf(tarfile.GNU_FORMAT) + b"{}" + b"\0" * 510 + b"\0" * 1024)
    return path


def _raw_bundle(path: Path, manifest: bytes, signature: bytes) -> Path:
    """A bundle of exactly these manifest and signature bytes (and no payload)."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb") as gz, \
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("manifest.json", manifest), ("manifest.sig", signature)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _signature(key: SigningKey, manifest: bytes) -> bytes:
    return canonical_json({"algorithm": "ed25519", "key_id": key.key_id,
                           "signature": base64.b64encode(key.sign(manifest)).decode()})


def _peak_bytes(call: Callable[[], object]) -> tuple[BaseException | None, int]:
    tracemalloc.start()
    error: BaseException | None = None
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - the test inspects whatever was raised
        error = exc
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return error, peak


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE], ids=["gnu-long-name", "pax"])
def test_a_tar_header_bomb_is_refused_before_its_header_is_read(tmp_path: Path, signing_key: SigningKey,
                                                                 kind: bytes) -> None:
    bomb = _header_bomb(tmp_path / "bomb.edb", kind)
    assert bomb.stat().st_size < 1 << 20
    for check in (lambda: verify_bundle(bomb), lambda: open_bundle(bomb, tmp_path / "out"),
                  lambda: read_manifest(bomb)):
        error, peak = _peak_bytes(check)
        assert isinstance(error, UnsafeArchiveError), repr(error)
        # tarfile inflates one 10 KB read at a time: ~10 MB each at deflate's 1000:1, never the header
        assert peak < 48 << 20, f"checking a {HEADER_BOMB_BYTES >> 20} MiB header bomb allocated {peak >> 20} MiB"
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_a_header_bomb_with_one_line(tmp_path: Path, signing_key: SigningKey) -> None:
    bomb = _header_bomb(tmp_path / "bomb.edb", tarfile.XHDTYPE)
    for command in ("verify", "inspect"):
        done = subprocess.run([sys.executable, "-m", "packager.cli.main", "bundle", command, str(bomb)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done
        assert done.stderr.startswith("error: ") and "pax header" in done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1


def test_a_long_payload_path_still_round_trips_through_a_small_pax_header(tmp_path: Path,
                                                                          signing_key: SigningKey) -> None:
    long_path = "model/" + "d" * 90 + "/" + "n" * 90 + "/model.onnx"
    manifest = BundleManifest(model={"name": "m", "version": 1}, profile={"name": "cpu-x86_64"},
                              runtime={"backend": "onnxruntime", "model_path": long_path})
    path = tmp_path / "long.edb"
    write_bundle(path, manifest, {long_path: b"weights"}, signing_key)
    opened = open_bundle(path, tmp_path / "out")
    assert (tmp_path / "out" / long_path).read_bytes() == b"weights"
    assert opened.runtime["model_path"] == long_path


def _hostile_manifests() -> dict[str, bytes]:
    files = '[{"path": "model/m.onnx", "sha256": "' + "0" * 64 + '", "size": 1e400}]'
    head = '{"format": "edgedeploy-bundle", "format_version": 1, "model": {"name": "m"}, "profile": {"name": "p"},' \
           ' "runtime": {}, '
    return {
        "deeply-nested": b"[" * 100_000 + b"]" * 100_000,
        "size-1e400": (head + '"files": ' + files + "}").encode(),
        "size-negative": (head + '"files": [{"path": "a", "sha256": "' + "0" * 64 + '", "size": -5}]}').encode(),
        "nested-model-field": (head.replace('{"name": "m"}', "[" * 5000 + "]" * 5000) + '"files": []}').encode(),
    }


@pytest.mark.parametrize("case", sorted(_hostile_manifests()))
def test_an_untrusted_hostile_manifest_is_refused_as_untrusted_before_it_is_parsed(
        tmp_path: Path, signing_key: SigningKey, case: str) -> None:
    stranger = generate_key("stranger", home=tmp_path / "stranger-home")
    manifest = _hostile_manifests()[case]
    path = _raw_bundle(tmp_path / f"{case}.edb", manifest, _signature(stranger, manifest))
    with pytest.raises(UntrustedKeyError):
        verify_bundle(path)
    with pytest.raises(BundleError) as refused:  # inspect parses it: a clean refusal, not RecursionError
        read_manifest(path)
    assert len(str(refused.value)) < 1100


@pytest.mark.parametrize("case", sorted(_hostile_manifests()))
def test_a_validly_signed_hostile_manifest_is_a_clean_bundle_error(tmp_path: Path, signing_key: SigningKey,
                                                                  case: str) -> None:
    manifest = _hostile_manifests()[case]
    path = _raw_bundle(tmp_path / f"{case}.edb", manifest, _signature(signing_key, manifest))
    with pytest.raises(BundleError) as refused:
        verify_bundle(path, TrustStore([signing_key.public_key]))
    assert not isinstance(refused.value, UntrustedKeyError)


@pytest.mark.parametrize("signature", [b"[" * 3000 + b"]" * 3000, b'{"key_id": ' * 2000, b"x" * 10_000],
                         ids=["nested", "nested-object", "oversized"])
def test_a_hostile_signature_entry_is_a_signature_error(tmp_path: Path, signing_key: SigningKey,
                                                        signature: bytes) -> None:
    path = _raw_bundle(tmp_path / "sig.edb", b"{}", signature)
    with pytest.raises(BundleError):
        verify_bundle(path)
    done = subprocess.run([sys.executable, "-m", "packager.cli.main", "bundle", "verify", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.startswith("error: ") and "internal error" not in done.stderr
