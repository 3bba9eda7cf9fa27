"""The bundle: one signed, reproducible file that carries a packaged model to every target.

A bundle is a gzip-compressed tar archive with deterministic headers. Its first entry is
``manifest.json`` (canonical JSON), its second ``manifest.sig`` (an ed25519 signature of the
manifest's exact bytes), then one ``payload/<path>`` entry per file listed in the manifest, in
sorted order. The manifest holds every file's sha256 and size, so the signature covers the
whole bundle. Opening a bundle verifies the signature before reading anything else, then every
file as it streams; nothing is trusted, and nothing is written outside the target folder.

The order of checks, each bounded before it reads: every tar header is refused before its data is read
when it is a kind the writer never emits (GNU long names, sparse files, global or Solaris headers) or a
pax header over :data:`MAX_PAX_HEADER_BYTES`; ``manifest.sig`` (at most :data:`MAX_SIGNATURE_BYTES`) and
``manifest.json`` (at most :data:`MAX_MANIFEST_BYTES`) are read as raw bytes; the signature is checked
over those bytes; only then is the manifest parsed (depth-bounded), and only then the payload streamed.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import shutil
import tarfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol

from edge_agent.errors import (
    BundleError,
    IntegrityError,
    NotFoundError,
    SignatureError,
    UnsafeArchiveError,
    UntrustedKeyError,
    ValidationError,
    brief,
)
from edge_agent.jsonlimits import loads_bounded
from edge_agent.tensors import TensorSpec
from edge_agent.trust import TrustStore

__all__ = [
    "BUNDLE_FORMAT",
    "FORMAT_VERSION",
    "BundleManifest",
    "ByteSink",
    "FileEntry",
    "SignatureInfo",
    "bundle_gzip",
    "bundle_sha256",
    "canonical_json",
    "load_extracted",
    "open_bundle",
    "read_manifest",
    "tree_sha256",
    "verify_bundle",
]

BUNDLE_FORMAT = "edgedeploy-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
PAYLOAD_PREFIX = "payload/"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_SIGNATURE_BYTES = 4096  # the signature entry is about 150 bytes of JSON
MAX_PAX_HEADER_BYTES = 64 * 1024  # the writer emits pax records only for long or non-ASCII paths
_SHA256_HEX = frozenset("0123456789abcdef")
MAX_FILES = 20_000
DEFAULT_MAX_EXPANDED_BYTES = 8 * 1024**3
_RESERVED = {MANIFEST_NAME, SIGNATURE_NAME}
_CHUNK = 1024 * 1024
GZIP_LEVEL = 6


class ByteSink(Protocol):
    """Where compressed bytes go: a file, or anything with ``write`` and ``flush``."""

    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> object: ...


def bundle_gzip(sink: ByteSink) -> gzip.GzipFile:
    """The gzip layer of every bundle: level 6, no file name, mtime 0.

    One definition for the writer and for a device rebuilding a bundle from a delta
    (:mod:`edge_agent.delta`): the same tar stream through it gives the same bytes.
    """
    return gzip.GzipFile(filename="", mode="wb", fileobj=sink, mtime=0, compresslevel=GZIP_LEVEL)


def canonical_json(document: Any) -> bytes:
    """The one byte encoding of a JSON document that is signed and hashed."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class FileEntry:
    """One payload file: relative path, sha256, size and what it is for."""

    path: str
    sha256: str
    size: int
    role: str = "data"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size, "role": self.role}


@dataclass
class BundleManifest:
    """Everything a target needs to know about a bundle, signed as one document.

    ``runtime`` names the backend (``onnxruntime``, ``entry-script``, ``hls4ml``, ``ice40``), the
    model's path inside the payload (``model_path``), the precision and the execution providers;
    ``accelerator`` is the place for FPGA firmware, bitstreams and the hardware they bind to.
    """

    model: dict[str, Any]
    profile: dict[str, Any]
    runtime: dict[str, Any]
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    entry_script: dict[str, Any] | None = None
    samples: dict[str, Any] | None = None
    batching: dict[str, Any] | None = None
    accelerator: dict[str, Any] | None = None
    report: dict[str, Any] = field(default_factory=dict)
    files: list[FileEntry] = field(default_factory=list)
    created_by: str = "edgedeploy"
    format_version: int = FORMAT_VERSION

    @property
    def name(self) -> str:
        return str(self.model["name"])

    @property
    def version(self) -> int | None:
        version = self.model.get("version")
        return None if version is None else int(version)

    @property
    def profile_name(self) -> str:
        return str(self.profile["name"])

    def file(self, path: str) -> FileEntry:
        """The entry for ``path``; raises BundleError when the manifest does not list it."""
        for entry in self.files:
            if entry.path == path:
                return entry
        raise BundleError(f"the bundle has no file {path!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "format_version": self.format_version,
            "created_by": self.created_by,
            "model": self.model,
            "profile": self.profile,
            "runtime": self.runtime,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "entry_script": self.entry_script,
            "samples": self.samples,
            "batching": self.batching,
            "accelerator": self.accelerator,
            "report": self.report,
            "files": [f.to_dict() for f in self.files],
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> BundleManifest:
        """Parse a manifest, refusing an unknown format or format version."""
        if not isinstance(doc, Mapping) or doc.get("format") != BUNDLE_FORMAT:
            raise BundleError("not an edgedeploy bundle manifest (missing 'format': 'edgedeploy-bundle')")
        if doc.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {doc.get('format_version')!r} is not supported "
                f"(this edgedeploy reads version {FORMAT_VERSION}); upgrade edgedeploy"
            )
        try:
            files = [_file_entry(f) for f in doc["files"]]
            manifest = cls(
                model=dict(doc["model"]),
                profile=dict(doc["profile"]),
                runtime=dict(doc["runtime"]),
                inputs=[TensorSpec.from_dict(t) for t in doc.get("inputs", [])],
                outputs=[TensorSpec.from_dict(t) for t in doc.get("outputs", [])],
                entry_script=doc.get("entry_script"),
                samples=doc.get("samples"),
                batching=doc.get("batching"),
                accelerator=doc.get("accelerator"),
                report=dict(doc.get("report") or {}),
                files=files,
                created_by=str(doc.get("created_by", "")),
            )
        except (KeyError, TypeError, ValueError, OverflowError, ValidationError) as exc:
            raise BundleError(f"malformed bundle manifest: {exc!r}") from None
        for entry in manifest.files:
            check_payload_path(entry.path)
        if len({f.path for f in manifest.files}) != len(manifest.files):
            raise UnsafeArchiveError("the manifest lists a file twice")
        return manifest


def _file_entry(doc: Mapping[str, Any]) -> FileEntry:
    size, sha256 = doc["size"], str(doc["sha256"])
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"file size {brief(size, 40)} is not a non-negative integer")
    if len(sha256) != 64 or not set(sha256) <= _SHA256_HEX:
        raise ValueError(f"file sha256 {brief(sha256, 80)!r} is not 64 lower-case hex digits")
    return FileEntry(str(doc["path"]), sha256, size, str(doc.get("role", "data")))


@dataclass(frozen=True)
class SignatureInfo:
    """Who signed a bundle and whether this verifier trusts that key."""

    key_id: str
    trusted: bool
    valid: bool


def check_payload_path(path: str) -> PurePosixPath:
    """Refuse any path that could leave the target folder or shadow the manifest."""
    if not path or "\\" in path or "\x00" in path:
        raise UnsafeArchiveError(f"unsafe path in bundle: {path!r}")
    pure = PurePosixPath(path)
    if pure.is_absolute() or any(part in ("", ".", "..") for part in path.split("/")):
        raise UnsafeArchiveError(f"unsafe path in bundle: {path!r} (absolute or with '..')")
    if path in _RESERVED:
        raise UnsafeArchiveError(f"unsafe path in bundle: {path!r} is reserved")
    return pure


def sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def tree_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder: every file's relative path and own sha256, in sorted order.

    The identity of a folder model, and of the firmware and RTL an FPGA bundle carries.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)[0]
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{item.relative_to(path).as_posix()}\0{sha256_file(item)[0]}\n".encode())
    return digest.hexdigest()


def bundle_sha256(path: Path) -> str:
    """sha256 of the bundle file itself (what devices and image labels report)."""
    return sha256_file(Path(path))[0]



class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header that refuses, before reading any of its data, the extended headers a bundle never has.

    ``tarfile`` reads a GNU long name or a pax header into memory whole: a 1 GiB one compresses
    to about 1 MB. The writer emits ustar headers and, for long paths only, small pax headers.
    """

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
                         tarfile.GNUTYPE_SPARSE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
            raise UnsafeArchiveError(
                f"the bundle holds a tar header of type {self.type!r} (GNU or global extension), "
                "which edgedeploy bundles never contain"
            )
        if self.type == tarfile.XHDTYPE and self.size > MAX_PAX_HEADER_BYTES:
            raise UnsafeArchiveError(
                f"the bundle holds a pax header of {self.size} bytes (limit {MAX_PAX_HEADER_BYTES})"
            )
        return super()._proc_member(archive)  # type: ignore[misc]


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo, expected: str, limit: int) -> bytes:
    if member.name != expected:
        raise SignatureError(
            f"bundle entry {expected!r} is missing (found {brief(member.name, 200)!r}); is it signed?"
        )
    if not member.isreg():
        raise UnsafeArchiveError(f"{expected} is not a regular file")
    if member.size > limit:
        raise BundleError(f"{expected} is {member.size} bytes, over the limit of {limit}")
    handle = tar.extractfile(member)
    assert handle is not None
    return handle.read(limit + 1)


def _check_signature(manifest_bytes: bytes, sig_bytes: bytes, trust: TrustStore) -> SignatureInfo:
    try:
        sig = loads_bounded(sig_bytes, MAX_SIGNATURE_BYTES, max_depth=2, what="the bundle's signature entry")
        key_id = str(sig["key_id"])
        signature = base64.b64decode(sig["signature"], validate=True)
        if sig.get("algorithm") != "ed25519":
            raise SignatureError(f"unsupported signature algorithm {brief(sig.get('algorithm'), 40)!r}")
    except (ValidationError, ValueError, KeyError, TypeError):
        raise SignatureError("the bundle's signature entry is malformed") from None
    if key_id not in trust:
        return SignatureInfo(brief(key_id, 64), trusted=False, valid=False)
    return SignatureInfo(key_id, trusted=True, valid=trust.verify(key_id, signature, manifest_bytes))


def _require_trusted(info: SignatureInfo) -> None:
    if not info.trusted:
        raise UntrustedKeyError(
            f"the bundle is signed by key {info.key_id}, which is not trusted here; "
            "trust the publisher's key with 'edgedeploy keys trust FILE'"
        )
    if not info.valid:
        raise SignatureError("the bundle's signature does not match its manifest: it was altered after signing")


def _parse_manifest(manifest_bytes: bytes) -> BundleManifest:
    try:
        document = loads_bounded(manifest_bytes, MAX_MANIFEST_BYTES, what="the bundle manifest")
    except ValidationError as exc:
        raise BundleError(str(exc)) from None
    return BundleManifest.from_dict(document)


def _open_tar(path: Path) -> tarfile.TarFile:
    if not path.is_file():
        raise NotFoundError(f"bundle not found: {path}")
    try:
        return tarfile.open(path, mode="r|gz", tarinfo=_BoundedTarInfo)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{path} is not a bundle (not a gzip tar archive: {exc})") from None


def _head(
    tar: tarfile.TarFile, trust: TrustStore | None, require_trusted: bool
) -> tuple[BundleManifest, SignatureInfo]:
    """Read the manifest and signature as raw bytes, check the signature, then parse the manifest.

    With ``require_trusted`` an untrusted or bad signature is refused before the manifest is parsed.
    """
    try:
        first = tar.next()
        if first is None:
            raise BundleError("the bundle is empty")
        manifest_bytes = _read_small(tar, first, MANIFEST_NAME, MAX_MANIFEST_BYTES)
        second = tar.next()
        if second is None:
            raise SignatureError("the bundle has no signature (manifest.sig)")
        sig_bytes = _read_small(tar, second, SIGNATURE_NAME, MAX_SIGNATURE_BYTES)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise BundleError(f"the bundle is truncated or corrupt: {exc}") from None
    info = _check_signature(manifest_bytes, sig_bytes, trust if trust is not None else TrustStore.local())
    if require_trusted:
        _require_trusted(info)
    return _parse_manifest(manifest_bytes), info


def read_manifest(path: Path, trust: TrustStore | None = None) -> tuple[BundleManifest, SignatureInfo]:
    """Read the manifest and check its signature, without reading the payload.

    Does not raise for an untrusted or bad signature: the caller decides (``bundle inspect``
    shows it). Use :func:`verify_bundle` or :func:`open_bundle` before trusting anything.
    """
    with _open_tar(Path(path)) as tar:
        return _head(tar, trust, require_trusted=False)


def _iter_payload(
    tar: tarfile.TarFile, manifest: BundleManifest, max_expanded_bytes: int
) -> Iterator[tuple[FileEntry, IO[bytes]]]:
    """Yield each payload entry after checking its type, name, uniqueness and declared size."""
    expected = {entry.path: entry for entry in manifest.files}
    if len(expected) > MAX_FILES:
        raise UnsafeArchiveError(f"the bundle lists {len(expected)} files (limit {MAX_FILES})")
    declared = sum(entry.size for entry in manifest.files)
    if declared > max_expanded_bytes:
        raise UnsafeArchiveError(
            f"the bundle expands to {declared} bytes, over the limit of {max_expanded_bytes}"
        )
    seen: set[str] = set()
    try:
        while (member := tar.next()) is not None:
            if not member.name.startswith(PAYLOAD_PREFIX):
                raise UnsafeArchiveError(f"unexpected entry {brief(member.name, 200)!r} outside payload/")
            path = member.name[len(PAYLOAD_PREFIX):]
            check_payload_path(path)
            if not member.isreg():
                kind = "link" if (member.issym() or member.islnk()) else "special file"
                raise UnsafeArchiveError(f"bundle entry {path!r} is a {kind}; only regular files are allowed")
            if path in seen:
                raise UnsafeArchiveError(f"bundle entry {path!r} appears twice")
            seen.add(path)
            entry = expected.get(path)
            if entry is None:
                raise IntegrityError(f"bundle entry {path!r} is not listed in the signed manifest")
            if member.size != entry.size:
                raise IntegrityError(f"{path}: size {member.size} does not match the manifest ({entry.size})")
            handle = tar.extractfile(member)
            assert handle is not None
            yield entry, handle
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise BundleError(f"the bundle is truncated or corrupt: {exc}") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise IntegrityError(f"the bundle is missing files listed in its manifest: {', '.join(missing)}")


def _copy_hashed(entry: FileEntry, source: IO[bytes], sink: IO[bytes] | None) -> None:
    digest = hashlib.sha256()
    size = 0
    while chunk := source.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if sink is not None:
            sink.write(chunk)
    if size != entry.size or digest.hexdigest() != entry.sha256:
        raise IntegrityError(f"{entry.path}: content does not match the sha256 in the signed manifest")


def _walk(
    path: Path,
    trust: TrustStore | None,
    max_expanded_bytes: int,
    on_file: Callable[[FileEntry, IO[bytes]], None],
) -> BundleManifest:
    with _open_tar(Path(path)) as tar:
        manifest, _ = _head(tar, trust, require_trusted=True)
        for entry, handle in _iter_payload(tar, manifest, max_expanded_bytes):
            on_file(entry, handle)
    return manifest


def verify_bundle(
    path: Path, trust: TrustStore | None = None, max_expanded_bytes: int = DEFAULT_MAX_EXPANDED_BYTES
) -> BundleManifest:
    """Check signature, trust and every file's hash and size; write nothing. Raises BundleError."""
    return _walk(path, trust, max_expanded_bytes, lambda entry, handle: _copy_hashed(entry, handle, None))


def open_bundle(
    path: Path,
    dest: Path,
    trust: TrustStore | None = None,
    max_expanded_bytes: int = DEFAULT_MAX_EXPANDED_BYTES,
) -> BundleManifest:
    """Verify the bundle and unpack it into ``dest`` (which must be absent or empty).

    On any failure ``dest`` is removed again (or emptied, if it existed), so a caller never
    sees a half-unpacked bundle. ``dest/manifest.json`` is written last, from verified bytes.
    """
    dest = Path(dest)
    existed = dest.exists()
    if existed and any(dest.iterdir()):
        raise BundleError(f"target folder {dest} is not empty")
    created = dest  # the top-most folder this call creates: removed again on failure
    while not created.parent.exists():
        created = created.parent
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()

    def extract(entry: FileEntry, handle: IO[bytes]) -> None:
        target = root.joinpath(*entry.path.split("/"))
        if root not in target.parents:
            raise UnsafeArchiveError(f"unsafe path in bundle: {entry.path!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(target, flags, 0o644), "wb") as sink:
            _copy_hashed(entry, handle, sink)

    try:
        manifest = _walk(path, trust, max_expanded_bytes, extract)
        with _open_tar(Path(path)) as tar:
            first = tar.next()
            assert first is not None
            (root / MANIFEST_NAME).write_bytes(_read_small(tar, first, MANIFEST_NAME, MAX_MANIFEST_BYTES))
    except BaseException:
        _remove_contents(dest if existed else created, keep_root=existed)
        raise
    return manifest


def _remove_contents(dest: Path, keep_root: bool) -> None:
    if keep_root:
        for child in dest.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    else:
        shutil.rmtree(dest, ignore_errors=True)


def load_extracted(bundle_dir: Path) -> BundleManifest:
    """The manifest of a folder that :func:`open_bundle` unpacked (already verified then)."""
    manifest_path = Path(bundle_dir) / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{bundle_dir} is not an unpacked bundle (no {MANIFEST_NAME})")
    return _parse_manifest(manifest_path.read_bytes())
