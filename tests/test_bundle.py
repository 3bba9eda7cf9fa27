"""The bundle format (edge_agent/bundle.py, written by packager/bundle.py): signed and tamper-evident.

Forged archives are built with tarfile directly, the way an attacker would, and each refusal is
checked for its error type and for leaving nothing behind.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.bundle import BundleManifest, canonical_json, open_bundle, read_manifest, verify_bundle
from edge_agent.errors import (
    BundleError,
    IntegrityError,
    NotFoundError,
    SignatureError,
    UnsafeArchiveError,
    UntrustedKeyError,
)
from edge_agent.trust import TrustStore
from packager.bundle import write_bundle
from packager.keys import SigningKey, generate_key

MODEL = b"\x08\x07fake-onnx-bytes" * 100
SAMPLE = b'{"data": [[1, 2, 3]]}'


def _manifest() -> BundleManifest:
    return BundleManifest(model={"name": "digits", "version": 1}, profile={"name": "cpu-x86_64"},
                          runtime={"backend": "onnxruntime", "model_path": "model/model.onnx"})


@pytest.fixture
def bundle(tmp_path: Path, signing_key: SigningKey) -> Path:
    path = tmp_path / "good.edb"
    write_bundle(path, _manifest(), {"model/model.onnx": MODEL, "samples/input.json": SAMPLE}, signing_key)
    return path


def test_same_inputs_give_identical_bytes(tmp_path: Path, signing_key: SigningKey) -> None:
    payload = {"model/model.onnx": MODEL, "samples/input.json": SAMPLE}
    first = write_bundle(tmp_path / "a.edb", _manifest(), payload, signing_key)
    second = write_bundle(tmp_path / "b.edb", _manifest(), dict(reversed(payload.items())), signing_key)
    assert first == second
    assert (tmp_path / "a.edb").read_bytes() == (tmp_path / "b.edb").read_bytes()


def test_open_verifies_and_unpacks(bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    manifest = open_bundle(bundle, dest)
    assert (dest / "model" / "model.onnx").read_bytes() == MODEL
    assert json.loads((dest / "manifest.json").read_text())["model"]["name"] == "digits"
    assert [f.path for f in manifest.files] == ["model/model.onnx", "samples/input.json"]
    assert manifest.file("model/model.onnx").sha256 == hashlib.sha256(MODEL).hexdigest()


def test_read_manifest_reports_an_untrusted_signer_without_raising(bundle: Path) -> None:
    manifest, info = read_manifest(bundle, TrustStore())
    assert manifest.name == "digits"
    assert not info.trusted and not info.valid


# --- forging ---------------------------------------------------------------------------------


def _entry(name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    return info, data


def _forge(path: Path, key: SigningKey | None, files: dict[str, bytes], extra: list[tuple[tarfile.TarInfo, bytes]],
           edit: Callable[[dict], None] | None = None, signature: bytes | None = None) -> Path:
    """Write a bundle by hand: a manifest listing ``files`` (after ``edit``), signed by ``key``."""
    document = _manifest().to_dict()
    document["files"] = [{"path": p, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d), "role": "data"}
                         for p, d in sorted(files.items())]
    if edit:
        edit(document)
    manifest = canonical_json(document)
    entries = [_entry("manifest.json", manifest)]
    if key is not None:
        sig = signature if signature is not None else key.sign(manifest)
        entries.append(_entry("manifest.sig", canonical_json(
            {"algorithm": "ed25519", "key_id": key.key_id, "signature": base64.b64encode(sig).decode()})))
    entries += [_entry(f"payload/{p}", d) for p, d in sorted(files.items())] + extra
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    path.write_bytes(gzip.compress(raw.getvalue()))
    return path


GOOD = {"model/model.onnx": MODEL}


def _cases(key: SigningKey, other: SigningKey) -> dict[str, tuple[dict, list, Callable | None, bytes | None, type]]:
    def set_hash(doc: dict) -> None:
        doc["files"][0]["sha256"] = "0" * 64

    def set_size(doc: dict) -> None:
        doc["files"][0]["size"] += 1

    def list_file(path: str) -> Callable[[dict], None]:
        def edit(doc: dict) -> None:
            doc["files"].append({"path": path, "sha256": "0" * 64, "size": 1, "role": "data"})
        return edit

    def version(doc: dict) -> None:
        doc["format_version"] = 99

    return {
        "bad signature": (GOOD, [], None, b"\x00" * 64, SignatureError),
        "altered content": (GOOD, [], set_hash, None, IntegrityError),
        "size mismatch": (GOOD, [], set_size, None, IntegrityError),
        "missing listed file": (GOOD, [], list_file("model/extra.bin"), None, IntegrityError),
        "unlisted extra entry": (GOOD, [_entry("payload/evil.py", b"x")], None, None, IntegrityError),
        "dot-dot path": (GOOD, [_entry("payload/../../evil.py", b"x")], None, None, UnsafeArchiveError),
        "absolute path": (GOOD, [_entry("/tmp/evil.py", b"x")], None, None, UnsafeArchiveError),
        "dot-dot in manifest": (GOOD, [], list_file("../outside.txt"), None, UnsafeArchiveError),
        "symlink": (GOOD, [_entry("payload/link", b"", tarfile.SYMTYPE, "/etc/passwd")], None, None,
                    UnsafeArchiveError),
        "hardlink": (GOOD, [_entry("payload/hard", b"", tarfile.LNKTYPE, "payload/model/model.onnx")], None, None,
                     UnsafeArchiveError),
        "device file": (GOOD, [_entry("payload/dev", b"", tarfile.CHRTYPE)], None, None, UnsafeArchiveError),
        "fifo": (GOOD, [_entry("payload/fifo", b"", tarfile.FIFOTYPE)], None, None, UnsafeArchiveError),
        "duplicate entry": (GOOD, [_entry("payload/model/model.onnx", MODEL)], None, None, UnsafeArchiveError),
        "unknown format version": (GOOD, [], version, None, BundleError),
    }


CASE_NAMES = ["bad signature", "altered content", "size mismatch", "missing listed file", "unlisted extra entry",
              "dot-dot path", "absolute path", "dot-dot in manifest", "symlink", "hardlink", "device file", "fifo",
              "duplicate entry", "unknown format version"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_tampered_bundles_are_refused_and_leave_nothing(case: str, tmp_path: Path, signing_key: SigningKey) -> None:
    files, extra, edit, signature, error = _cases(signing_key, signing_key)[case]
    forged = _forge(tmp_path / "forged.edb", signing_key, files, extra, edit, signature)
    with pytest.raises(error):
        verify_bundle(forged)
    dest = tmp_path / "target" / "out"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(error):
        open_bundle(forged, dest)
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == [n for n in before]
    assert not Path("/tmp/evil.py").exists()


def test_a_genuine_forged_bundle_is_accepted(tmp_path: Path, signing_key: SigningKey) -> None:
    forged = _forge(tmp_path / "ok.edb", signing_key, GOOD, [])
    assert verify_bundle(forged).name == "digits"


def test_missing_signature_is_refused(tmp_path: Path, signing_key: SigningKey) -> None:
    unsigned = _forge(tmp_path / "unsigned.edb", None, GOOD, [])
    with pytest.raises(SignatureError):
        verify_bundle(unsigned)


def test_untrusted_key_is_refused(tmp_path: Path, signing_key: SigningKey) -> None:
    stranger = generate_key("stranger", home=tmp_path / "elsewhere")
    forged = _forge(tmp_path / "stranger.edb", stranger, GOOD, [])
    with pytest.raises(UntrustedKeyError, match="keys trust"):
        verify_bundle(forged)


def test_existing_target_folder_is_left_empty_on_refusal(tmp_path: Path, signing_key: SigningKey) -> None:
    forged = _forge(tmp_path / "bad.edb", signing_key, GOOD, [_entry("payload/evil.py", b"x")])
    dest = tmp_path / "slot"
    dest.mkdir()
    with pytest.raises(IntegrityError):
        open_bundle(forged, dest)
    assert dest.is_dir() and not any(dest.iterdir())


def test_non_empty_target_is_refused(bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="not empty"):
        open_bundle(bundle, dest)
    assert (dest / "keep.txt").read_text() == "mine"


def test_expansion_limit(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsafeArchiveError, match="over the limit"):
        open_bundle(bundle, tmp_path / "out", max_expanded_bytes=len(MODEL))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cut", [0.3, 0.9])
def test_truncated_bundle_is_refused(bundle: Path, tmp_path: Path, cut: float) -> None:
    data = bundle.read_bytes()
    truncated = tmp_path / "cut.edb"
    truncated.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(BundleError):
        open_bundle(truncated, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_bundle(tmp_path: Path) -> None:
    junk = tmp_path / "junk.edb"
    junk.write_bytes(b"this is not a gzip tar")
    with pytest.raises(BundleError, match="not a bundle"):
        verify_bundle(junk)
    with pytest.raises(NotFoundError):
        verify_bundle(tmp_path / "absent.edb")


def test_cli_verify_inspect_extract(bundle: Path, tmp_path: Path) -> None:
    run = [sys.executable, "-m", "packager.cli.main", "bundle"]
    assert subprocess.run([*run, "verify", str(bundle)], capture_output=True).returncode == 0
    shown = json.loads(subprocess.run([*run, "inspect", str(bundle), "--json"], capture_output=True, text=True,
                                      check=True).stdout)
    assert shown["signature"]["trusted"] and shown["signature"]["valid"]
    assert shown["manifest"]["model"]["name"] == "digits"
    assert subprocess.run([*run, "extract", str(bundle), "-o", str(tmp_path / "x")]).returncode == 0
    assert (tmp_path / "x" / "model" / "model.onnx").read_bytes() == MODEL
    tampered = tmp_path / "tampered.edb"
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    result = subprocess.run([*run, "verify", str(tampered)], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("error:")
