"""Making deltas between two bundles (the format, and how a device applies one, are in :mod:`edge_agent.delta`).

:func:`make_delta` inflates both bundles to their tar streams and walks the new one member by member.
Tar headers, the manifest and its signature always travel as literals. A payload file whose sha256 the old
manifest lists (unchanged, or moved) becomes a copy op; a changed file at least :data:`MIN_PATCH_BYTES`
long with a file of the same path in the old bundle becomes a bsdiff4 patch when the patch is smaller
than the file compressed (an ONNX model whose last layer was retrained keeps every other tensor's bytes,
in the same order, so its patch is about the size of that layer); everything else is literal, and
neighbouring literals merge into one zlib op. Before writing anything it checks that the new tar stream,
compressed as the bundle writer compresses (:func:`~edge_agent.bundle.bundle_gzip`), gives the new
bundle's bytes: a bundle from another writer or zlib could not be rebuilt, and no delta is made for it.

:class:`DeltaCache` is what ``edgedeploy serve`` answers ``GET /bundles/<new>.edb.delta/<old>`` from: the
delta is made on the first request and kept at that same path under the bundle store, so a static
server or object store holding the folder serves cached deltas too.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import bsdiff4

from edge_agent.atomic import fsync_dir
from edge_agent.bundle import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    PAYLOAD_PREFIX,
    SIGNATURE_NAME,
    BundleManifest,
    bundle_gzip,
    bundle_sha256,
)
from edge_agent.delta import COPY, LITERAL, MAX_TAR_BYTES, OP, PATCH, DeltaHeader
from edge_agent.errors import BundleError, NotFoundError, ValidationError
from edge_agent.jsonlimits import loads_bounded

__all__ = ["DEFAULT_MAX_PATCH_BYTES", "MIN_PATCH_BYTES", "DeltaCache", "DeltaSummary", "delta_cache_path",
           "make_delta"]

log = logging.getLogger(__name__)

MIN_PATCH_BYTES = 4096  # below this a file costs less as a literal than bsdiff4's three bz2 blocks
DEFAULT_MAX_PATCH_BYTES = 256 * 1024**2  # bsdiff4's suffix sort takes about 17 bytes per byte of the old file
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class DeltaSummary:
    """A delta made: its file and size, the bundle's size, and the tar bytes each kind of op carries."""

    path: Path
    size: int
    bundle_size: int
    copied: int
    patched: int
    literal: int
    ops: int

    @property
    def ratio(self) -> float:
        """The delta's size as a share of the whole bundle's."""
        return self.size / self.bundle_size if self.bundle_size else 1.0


@dataclass(frozen=True)
class _Member:
    name: str
    offset: int  # where its data starts in the tar stream
    size: int


@dataclass
class _TarStream:
    """A bundle inflated to a tar file: its members in order, and its manifest as raw bytes and parsed."""

    path: Path
    size: int
    members: list[_Member]
    manifest_bytes: bytes
    manifest: BundleManifest = field(init=False)

    def __post_init__(self) -> None:
        try:
            document = loads_bounded(self.manifest_bytes, MAX_MANIFEST_BYTES, what="the bundle manifest")
        except ValidationError as exc:
            raise BundleError(str(exc)) from None
        self.manifest = BundleManifest.from_dict(document)

    def data(self, member: _Member) -> bytes:
        with open(self.path, "rb") as handle:
            handle.seek(member.offset)
            return handle.read(member.size)


def _inflate(bundle: Path, out: Path) -> _TarStream:
    """The bundle's tar stream written to ``out``, and its members read from the plain tar."""
    try:
        with gzip.open(bundle, "rb") as source, open(out, "wb") as sink:
            while chunk := source.read(_CHUNK):
                if sink.tell() + len(chunk) > MAX_TAR_BYTES:
                    raise BundleError(f"{bundle.name} expands past {MAX_TAR_BYTES} bytes")
                sink.write(chunk)
        with tarfile.open(out, "r:") as tar:
            members = [_Member(m.name, m.offset_data, m.size) for m in tar.getmembers()]
            first = tar.extractfile(tar.getmembers()[0]) if members else None
            manifest_bytes = first.read(MAX_MANIFEST_BYTES + 1) if first is not None else b""
    except (OSError, EOFError, zlib.error, tarfile.TarError) as exc:
        raise BundleError(f"{bundle.name} is not a readable bundle: {exc}") from None
    if len(members) < 2 or members[0].name != MANIFEST_NAME or members[1].name != SIGNATURE_NAME:
        raise BundleError(f"{bundle.name} does not start with {MANIFEST_NAME} and {SIGNATURE_NAME}")
    return _TarStream(out, out.stat().st_size, members, manifest_bytes)


class _HashSink:
    def __init__(self) -> None:
        self.digest, self.size = hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _check_rebuildable(bundle: Path, tar: _TarStream) -> None:
    """Refuse a bundle whose tar stream does not compress back to its bytes: no device could rebuild it."""
    sink = _HashSink()
    with bundle_gzip(sink) as gz, open(tar.path, "rb") as source:
        shutil.copyfileobj(source, gz, _CHUNK)
    if sink.digest.hexdigest() != bundle_sha256(bundle):
        raise BundleError(f"{bundle.name} does not compress back to its own bytes (another writer or zlib made "
                          "it), so no delta can rebuild it")


class _OpWriter:
    """Writes ops to the delta body; literal bytes of the new tar stream gather until the next copy or patch."""

    def __init__(self, out: IO[bytes], new: _TarStream) -> None:
        self.out, self.new = out, new
        self.ops = self.copied = self.patched = self.literal = 0
        self.pending = 0  # the new tar stream's offset up to which ops are written

    def _op(self, kind: bytes, index: int, offset: int, length: int, stored: int) -> None:
        self.out.write(OP.pack(kind, index, offset, length, stored))
        self.ops += 1

    def literal_until(self, end: int) -> None:
        """One literal op with the new tar stream's bytes from the last op's end to ``end``."""
        length = end - self.pending
        if length <= 0:
            return
        at = self.out.tell()
        self._op(LITERAL, 0, 0, length, 0)
        deflater, stored = zlib.compressobj(9), 0
        with open(self.new.path, "rb") as source:
            source.seek(self.pending)
            left = length
            while left:
                chunk = source.read(min(_CHUNK, left))
                left -= len(chunk)
                stored += self.out.write(deflater.compress(chunk))
            stored += self.out.write(deflater.flush())
        end_of_op = self.out.tell()
        self.out.seek(at)
        self.out.write(OP.pack(LITERAL, 0, 0, length, stored))
        self.out.seek(end_of_op)
        self.literal += length
        self.pending = end

    def copy(self, member: _Member, index: int) -> None:
        self.literal_until(member.offset)
        self._op(COPY, index, 0, member.size, 0)
        self.copied += member.size
        self.pending = member.offset + member.size

    def patch(self, member: _Member, index: int, patch: bytes) -> None:
        self.literal_until(member.offset)
        self._op(PATCH, index, 0, member.size, len(patch))
        self.out.write(patch)
        self.patched += member.size
        self.pending = member.offset + member.size


def _patch_for(old: _TarStream, new: _TarStream, member: _Member, path: str, max_patch_bytes: int
               ) -> tuple[int, bytes] | None:
    """(old file index, patch) when a bsdiff4 patch from the old file of the same path beats the literal."""
    index = next((i for i, e in enumerate(old.manifest.files) if e.path == path), None)
    if index is None or not MIN_PATCH_BYTES <= member.size <= max_patch_bytes:
        return None
    source = next(m for m in old.members if m.name == PAYLOAD_PREFIX + path)
    if source.size > max_patch_bytes:
        return None
    target = new.data(member)
    patch = bsdiff4.diff(old.data(source), target)
    return (index, patch) if len(patch) < len(zlib.compress(target, 9)) else None


def _write_ops(old: _TarStream, new: _TarStream, out: IO[bytes], max_patch_bytes: int) -> _OpWriter:
    by_sha: dict[str, int] = {}
    for i, entry in enumerate(old.manifest.files):
        by_sha.setdefault(entry.sha256, i)
    writer = _OpWriter(out, new)
    for member in new.members[2:]:
        path = member.name[len(PAYLOAD_PREFIX):]
        entry = new.manifest.file(path)
        if entry.sha256 in by_sha and member.size > OP.size:
            writer.copy(member, by_sha[entry.sha256])
        elif (found := _patch_for(old, new, member, path, max_patch_bytes)) is not None:
            writer.patch(member, *found)
    writer.literal_until(new.size)
    return writer


def make_delta(old: Path, new: Path, out: Path, max_patch_bytes: int = DEFAULT_MAX_PATCH_BYTES) -> DeltaSummary:
    """Write the delta that rebuilds bundle ``new`` from bundle ``old`` to ``out`` (atomically).

    Raises BundleError when either bundle is unreadable, or when ``new`` could not be rebuilt byte for
    byte (it was not written by edgedeploy's bundle writer with this zlib). Files over
    ``max_patch_bytes`` are never patched (bsdiff4 holds both files and a suffix array in memory).
    """
    old, new, out = Path(old), Path(new), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".delta-") as scratch:
        base = _inflate(old, Path(scratch) / "old.tar")
        target = _inflate(new, Path(scratch) / "new.tar")
        _check_rebuildable(new, target)
        body_path = Path(scratch) / "ops"
        with open(body_path, "w+b") as body:
            writer = _write_ops(base, target, body, max_patch_bytes)
        header = DeltaHeader(bundle_sha256(old), hashlib.sha256(base.manifest_bytes).hexdigest(),
                             bundle_sha256(new), new.stat().st_size, target.size, writer.ops)
        tmp = Path(scratch) / "delta"
        with open(tmp, "wb") as sink, open(body_path, "rb") as body:
            sink.write(header.encode())
            shutil.copyfileobj(body, sink, _CHUNK)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(tmp, out)
    fsync_dir(out.parent)
    return DeltaSummary(out, out.stat().st_size, new.stat().st_size, writer.copied, writer.patched,
                        writer.literal, writer.ops)


def delta_cache_path(store: Path, new_sha256: str, old_sha256: str) -> Path:
    """Where the delta from ``old`` to ``new`` is kept: ``<store>/<new>.edb.delta/<old>``, as its URL path."""
    return Path(store) / f"{new_sha256}.edb.delta" / old_sha256


class DeltaCache:
    """Deltas between the bundles of one store, made on first request and kept beside the bundles."""

    def __init__(self, store: Path) -> None:
        self.store = Path(store)
        self._making = threading.Lock()  # one delta is made at a time: each one holds two bundles' worth of disk

    def get(self, new_sha256: str, old_sha256: str) -> Path:
        """The delta file from ``old`` to ``new``, made now when it is not cached.

        NotFoundError when the store lacks either bundle, when no delta is smaller than the bundle, or
        when the bundles cannot be delta'd (the reason is in the message): the device then downloads
        the whole bundle.
        """
        bundles = {sha: self.store / f"{sha}.edb" for sha in (new_sha256, old_sha256)}
        for sha, path in bundles.items():
            if not path.is_file():
                raise NotFoundError(f"no bundle {sha} here, so no delta: download the whole bundle")
        cached = delta_cache_path(self.store, new_sha256, old_sha256)
        if not cached.is_file():
            self._make(bundles[old_sha256], bundles[new_sha256], cached)
        if cached.stat().st_size >= bundles[new_sha256].stat().st_size:
            raise NotFoundError(f"the delta from {old_sha256[:12]} to {new_sha256[:12]} is no smaller than the "
                                "bundle: download the whole bundle")
        return cached

    def _make(self, old: Path, new: Path, cached: Path) -> None:
        """Make one delta, unless another request made it while this one waited."""
        old_sha256, new_sha256 = old.stem, new.stem
        with self._making:
            if cached.is_file():
                return
            try:
                summary = make_delta(old, new, cached)
            except (BundleError, OSError) as exc:
                log.warning("no delta from %s to %s: %s", old_sha256[:12], new_sha256[:12], exc)
                raise NotFoundError(f"no delta from {old_sha256[:12]} to {new_sha256[:12]}: {exc}") from None
        log.info("made the delta from %s to %s: %d bytes, %.1f%% of the bundle", old_sha256[:12], new_sha256[:12],
                 summary.size, 100 * summary.ratio)
