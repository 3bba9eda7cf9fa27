"""Delta updates: bundle N+1 rebuilt on the device from bundle N, which it holds unpacked, and a small delta.

A bundle is a gzip stream over a tar stream (:mod:`edge_agent.bundle`). Compressed bytes cannot be reused
from one version to the next, so a delta describes the new bundle's *tar stream*. The device writes what it
rebuilds through the bundle writer's own gzip layer (:func:`~edge_agent.bundle.bundle_gzip`), which gives
the writer's bytes again (deflate is deterministic for one zlib and level, however its input is split),
checks the sha256 its order names, and then verifies the result exactly as a downloaded bundle: signature,
trust, every file's hash. A delta is therefore not signed: nothing in it is trusted, it only saves bytes.
A device whose zlib compresses differently gets another sha256 and downloads the whole bundle.

The base is bundle N of the same model in the device's active slot: its ``manifest.json`` (the verified
raw bytes :func:`~edge_agent.bundle.open_bundle` wrote) and its payload files. The old ``.edb`` is not kept:
the unpacked slot holds everything a delta reuses.

Format version 1, integers big-endian::

    b"EDGEDLT1"           magic
    u32                    length of the header, at most MAX_HEADER_BYTES
    header                 canonical JSON: {"format": "edgedeploy-delta", "format_version": 1,
                           "base_sha256", "base_manifest_sha256", "target_sha256", "target_size",
                           "tar_size", "ops"}
    ops x header["ops"]    a 29-byte record each, kind (1 byte), file (u32), offset (u64), length (u64),
                           stored (u64), followed by ``stored`` bytes:
      C  copy     ``length`` bytes of base file number ``file`` (its index in the base manifest's
                  ``files``) from ``offset``; ``stored`` is 0
      L  literal  ``stored`` bytes of zlib data that inflate to exactly ``length`` bytes: tar headers,
                  the new manifest and signature, new or small files, padding; ``file`` and ``offset`` are 0
      P  patch    a bsdiff4 patch (``BSDIFF40``) of base file ``file`` that gives ``length`` bytes: a
                  changed large file, when the patch is smaller than the file compressed; ``offset`` is 0

Nothing follows the last op, and the ops' lengths add up to ``tar_size``, the bytes of the tar stream;
``target_size`` is the bytes of the bundle file.

Applying is bounded before every allocation and streams to the output file. The delta's size is capped by
the download limit, the header by MAX_HEADER_BYTES and the op count by MAX_OPS; each op's lengths are
checked against what is left of the delta, of the declared tar stream and of the base file before anything
is read; a literal inflates in chunks; a patch, which bsdiff4 applies in memory, is refused when the base
file, the patch and the result with its inflated blocks would pass the memory budget
(:func:`patch_memory_budget`: a limit, or half of the memory available now when that is less). Every
refusal is a :class:`~edge_agent.errors.DeltaError`; the caller then downloads the whole bundle.
"""

from __future__ import annotations

import bz2
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import bsdiff4.core

from edge_agent.bundle import (
    DEFAULT_MAX_EXPANDED_BYTES,
    MANIFEST_NAME,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    ByteSink,
    FileEntry,
    bundle_gzip,
    canonical_json,
    load_extracted,
)
from edge_agent.errors import BundleError, DeltaError, ValidationError, brief
from edge_agent.jsonlimits import loads_bounded

__all__ = ["COPY", "DEFAULT_PATCH_MEMORY_BYTES", "DELTA_FORMAT", "DELTA_FORMAT_VERSION", "LITERAL", "MAGIC",
           "MAX_HEADER_BYTES", "MAX_OPS", "MAX_TAR_BYTES", "OP", "PATCH", "DeltaBase", "DeltaHeader",
           "apply_delta", "patch_memory_budget"]

MAGIC = b"EDGEDLT1"
DELTA_FORMAT = "edgedeploy-delta"
DELTA_FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024  # the header is about 400 bytes of JSON
MAX_OPS = 4 * MAX_FILES + 16  # a copy or patch per file and the literals between them, with room to spare
MAX_TAR_BYTES = DEFAULT_MAX_EXPANDED_BYTES + 1024**3  # the payload limit, plus headers, manifest and padding
DEFAULT_PATCH_MEMORY_BYTES = 512 * 1024**2
OP = struct.Struct(">cIQQQ")
COPY, LITERAL, PATCH = b"C", b"L", b"P"
_UNUSED = {COPY: {"stored"}, LITERAL: {"file", "offset"}, PATCH: {"offset"}}  # must be 0: no byte goes unchecked
_PREFIX = struct.Struct(">8sI")
_BSDIFF_MAGIC = b"BSDIFF40"
_BSDIFF_HEADER = 32
_CONTROL_SLACK = 16 * 24  # bsdiff4 writes one 24-byte control triple per run of new bytes
_CHUNK = 1024 * 1024
_SHA256_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class DeltaBase:
    """The bundle a delta applies to, as a device holds it: its sha256 and the folder it is unpacked in."""

    bundle_sha256: str
    folder: Path


@dataclass(frozen=True)
class DeltaHeader:
    """What a delta rebuilds, from what, and how many ops it holds."""

    base_sha256: str
    base_manifest_sha256: str
    target_sha256: str
    target_size: int
    tar_size: int
    ops: int

    def encode(self) -> bytes:
        """Magic, length and canonical JSON: the first bytes of a delta file."""
        body = canonical_json({"format": DELTA_FORMAT, "format_version": DELTA_FORMAT_VERSION,
                               "base_sha256": self.base_sha256, "base_manifest_sha256": self.base_manifest_sha256,
                               "target_sha256": self.target_sha256, "target_size": self.target_size,
                               "tar_size": self.tar_size, "ops": self.ops})
        return _PREFIX.pack(MAGIC, len(body)) + body

    @classmethod
    def read(cls, source: _Reader) -> DeltaHeader:
        """Parse the header at the start of ``source``, bounded before it reads; DeltaError when malformed."""
        magic, length = _PREFIX.unpack(source.read_exact(_PREFIX.size, "the header"))
        if magic != MAGIC:
            raise DeltaError("not an edgedeploy delta (wrong magic bytes)")
        if length > MAX_HEADER_BYTES:
            raise DeltaError(f"the delta's header is {length} bytes, over the limit of {MAX_HEADER_BYTES}")
        try:
            doc = loads_bounded(source.read_exact(length, "the header"), MAX_HEADER_BYTES, max_depth=2,
                                what="the delta header")
            if doc.get("format") != DELTA_FORMAT or doc.get("format_version") != DELTA_FORMAT_VERSION:
                raise DeltaError(f"delta format {brief(doc.get('format'), 40)!r} version "
                                 f"{brief(doc.get('format_version'), 20)} is not one this agent reads")
            header = cls(_sha(doc, "base_sha256"), _sha(doc, "base_manifest_sha256"), _sha(doc, "target_sha256"),
                         _count(doc, "target_size"), _count(doc, "tar_size"), _count(doc, "ops"))
        except (ValidationError, AttributeError) as exc:
            raise DeltaError(f"the delta's header is malformed: {exc}") from None
        return header


def _sha(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= _SHA256_HEX:
        raise DeltaError(f"the delta's {key} is not 64 lower-case hex digits")
    return value


def _count(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DeltaError(f"the delta's {key} is not a non-negative integer")
    return value


class _Reader:
    """The delta file, read with a count of what is left so that no declared length can overreach it."""

    def __init__(self, handle: IO[bytes], size: int) -> None:
        self.handle, self.left = handle, size

    def read_exact(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise DeltaError(f"the delta is truncated: {what} needs {n} bytes, {self.left} are left")
        data = self.handle.read(n)
        if len(data) != n:
            raise DeltaError(f"the delta is truncated while reading {what}")
        self.left -= n
        return data


class _Sink:
    """The rebuilt bundle's file: hashed as it is written and capped at the size the delta declares."""

    def __init__(self, handle: IO[bytes], limit: int) -> None:
        self.handle, self.limit, self.size = handle, limit, 0
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.limit:
            raise DeltaError(f"the rebuilt bundle grows past the {self.limit} bytes its delta declares")
        self.digest.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo", "rb") as meminfo:
            for line in meminfo:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def patch_memory_budget(limit: int = DEFAULT_PATCH_MEMORY_BYTES) -> int:
    """Bytes one patch op may hold in memory: ``limit``, or half of the memory available now when less."""
    available = _available_memory()
    return limit if available is None else min(limit, available // 2)


def _base_files(base: DeltaBase, header: DeltaHeader) -> list[FileEntry]:
    """The base manifest's files, once its raw bytes are shown to be the ones the delta was made against."""
    if header.base_sha256 != base.bundle_sha256:
        raise DeltaError(f"the delta applies to bundle {header.base_sha256[:12]}, this device holds "
                         f"{base.bundle_sha256[:12]}")
    try:
        with open(base.folder / MANIFEST_NAME, "rb") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise DeltaError(f"the active bundle's folder has no readable manifest: {exc}") from None
    if hashlib.sha256(raw).hexdigest() != header.base_manifest_sha256:
        raise DeltaError("the active slot's manifest is not the one the delta was made against")
    try:
        return load_extracted(base.folder).files
    except BundleError as exc:
        raise DeltaError(f"the active bundle's folder cannot serve as a base: {exc}") from None


def _base_file(files: list[FileEntry], index: int) -> FileEntry:
    if index >= len(files):
        raise DeltaError(f"an op names base file {index}; the base has {len(files)}")
    return files[index]


def _open_base(base: DeltaBase, entry: FileEntry) -> IO[bytes]:
    """A base payload file, opened without following a link (its path was checked when the slot was unpacked)."""
    path = base.folder.joinpath(*entry.path.split("/"))
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    return os.fdopen(os.open(path, flags), "rb")


def _copy(base: DeltaBase, entry: FileEntry, offset: int, length: int, sink: ByteSink) -> None:
    if offset > entry.size or length > entry.size - offset:
        raise DeltaError(f"an op copies bytes {offset}+{length} of {entry.path}, which has {entry.size}")
    with _open_base(base, entry) as handle:
        handle.seek(offset)
        while length:
            chunk = handle.read(min(_CHUNK, length))
            if not chunk:
                raise DeltaError(f"base file {entry.path} is shorter than its manifest says")
            sink.write(chunk)
            length -= len(chunk)


def _inflate(source: _Reader, stored: int, length: int, sink: ByteSink) -> None:
    """Inflate ``stored`` bytes of zlib data into exactly ``length`` bytes, one chunk at a time."""
    inflater = zlib.decompressobj()
    pending, left_in, left_out = b"", stored, length
    while not inflater.eof:
        if not pending and left_in:
            pending = source.read_exact(min(_CHUNK, left_in), "a literal")
            left_in -= len(pending)
        chunk = inflater.decompress(pending, min(_CHUNK, left_out + 1))  # one byte more shows a longer literal
        pending = inflater.unconsumed_tail
        if len(chunk) > left_out:
            raise DeltaError(f"a literal inflates to more than its declared {length} bytes")
        if not chunk and not pending and not left_in and not inflater.eof:
            raise DeltaError("a literal's zlib data is truncated")
        sink.write(chunk)
        left_out -= len(chunk)
    if pending or left_in or inflater.unused_data:
        raise DeltaError("a literal's data goes on past the end of its zlib stream")
    if left_out:
        raise DeltaError(f"a literal inflates to {length - left_out} bytes, not the declared {length}")


def _bunzip(data: bytes, limit: int, what: str) -> bytes:
    """A bz2 block of a bsdiff4 patch, inflated to at most ``limit`` bytes (a bomb stops there)."""
    inflater = bz2.BZ2Decompressor()
    out = inflater.decompress(data, max_length=limit + 1)
    if len(out) > limit:
        raise DeltaError(f"the {what} block of a patch inflates to more than {limit} bytes")
    if not inflater.eof or inflater.unused_data:
        raise DeltaError(f"the {what} block of a patch is truncated or followed by other bytes")
    return out


def _bspatch(source: bytes, patch: bytes, length: int) -> bytes:
    """bsdiff4's patch, with the patch's own lengths checked and its blocks inflated under bounds first."""
    if len(patch) < _BSDIFF_HEADER or patch[:8] != _BSDIFF_MAGIC:
        raise DeltaError("a patch op does not hold a bsdiff4 patch")
    control_len, diff_len, new_len = (bsdiff4.core.decode_int64(patch[i:i + 8]) for i in (8, 16, 24))
    if new_len != length:
        raise DeltaError(f"a patch makes {new_len} bytes, its op declares {length}")
    if control_len < 0 or diff_len < 0 or control_len + diff_len > len(patch) - _BSDIFF_HEADER:
        raise DeltaError("a patch's block lengths do not fit in it")
    diff_at = _BSDIFF_HEADER + control_len
    control = _bunzip(patch[_BSDIFF_HEADER:diff_at], length + _CONTROL_SLACK, "control")
    diff = _bunzip(patch[diff_at:diff_at + diff_len], length, "diff")
    extra = _bunzip(patch[diff_at + diff_len:], length, "extra")
    try:
        result = bsdiff4.core.patch(source, length, control, diff, extra)
    except ValueError as exc:
        raise DeltaError(f"a patch is corrupt: {exc}") from None
    if len(result) != length:
        raise DeltaError(f"a patch made {len(result)} bytes, its op declares {length}")
    return bytes(result)


def _patch(source: _Reader, base: DeltaBase, entry: FileEntry, length: int, stored: int, budget: int,
           sink: ByteSink) -> None:
    need = entry.size + stored + 4 * length + _CONTROL_SLACK  # base, patch, result, diff, extra, control
    if need > budget:
        raise DeltaError(f"patching {entry.path} needs about {need} bytes of memory, over this device's "
                         f"budget of {budget}")
    patch = source.read_exact(stored, "a patch")
    with _open_base(base, entry) as handle:
        old = handle.read(entry.size + 1)
    if len(old) != entry.size or hashlib.sha256(old).hexdigest() != entry.sha256:
        raise DeltaError(f"base file {entry.path} no longer matches its manifest")
    sink.write(_bspatch(old, patch, length))


def _check_target(header: DeltaHeader, target_sha256: str, max_bundle_bytes: int) -> None:
    if header.target_sha256 != target_sha256:
        raise DeltaError(f"the delta rebuilds bundle {header.target_sha256[:12]}, the order is for "
                         f"{target_sha256[:12]}")
    if header.target_size > max_bundle_bytes:
        raise DeltaError(f"the delta rebuilds a bundle of {header.target_size} bytes, over the "
                         f"{max_bundle_bytes} byte limit")
    if header.tar_size > MAX_TAR_BYTES:
        raise DeltaError(f"the delta declares a tar stream of {header.tar_size} bytes (limit {MAX_TAR_BYTES})")
    if header.ops > MAX_OPS:
        raise DeltaError(f"the delta declares {header.ops} ops (limit {MAX_OPS})")


def _apply_ops(source: _Reader, header: DeltaHeader, base: DeltaBase, files: list[FileEntry], budget: int,
               tar: ByteSink) -> None:
    written = 0
    for number in range(header.ops):
        kind, index, offset, length, stored = OP.unpack(source.read_exact(OP.size, f"op {number}"))
        if length > header.tar_size - written:
            raise DeltaError(f"op {number} writes past the {header.tar_size} bytes the delta declares")
        if stored > source.left:
            raise DeltaError(f"the delta is truncated: op {number} declares {stored} bytes, {source.left} are left")
        if kind not in _UNUSED:
            raise DeltaError(f"op {number} is of unknown kind {brief(kind, 10)!r}")
        fields = {"file": index, "offset": offset, "stored": stored}
        if any(fields[name] for name in _UNUSED[kind]):
            raise DeltaError(f"op {number} ({kind.decode()}) sets a field its kind does not use")
        if kind == COPY:
            _copy(base, _base_file(files, index), offset, length, tar)
        elif kind == LITERAL:
            _inflate(source, stored, length, tar)
        else:
            _patch(source, base, _base_file(files, index), length, stored, budget, tar)
        written += length
    if written != header.tar_size:
        raise DeltaError(f"the ops make {written} bytes of the {header.tar_size} the delta declares")
    if source.left:
        raise DeltaError(f"{source.left} bytes follow the delta's last op")


def apply_delta(delta: Path, base: DeltaBase, target_sha256: str, out: Path, max_bundle_bytes: int,
                patch_budget: int | None = None) -> Path:
    """Rebuild bundle ``target_sha256`` from ``base`` and the delta file ``delta`` into ``out``.

    ``out`` holds the bundle's exact bytes when this returns (its sha256 and size checked, flushed to
    disk); on any failure it is removed and DeltaError says why. ``patch_budget`` defaults to
    :func:`patch_memory_budget`. The result still has to be verified as any downloaded bundle.
    """
    delta, out = Path(delta), Path(out)
    budget = patch_memory_budget() if patch_budget is None else patch_budget
    try:
        size = delta.stat().st_size
        if size > max_bundle_bytes:
            raise DeltaError(f"the delta is {size} bytes, over the {max_bundle_bytes} byte limit")
        with open(delta, "rb") as handle, open(out, "wb") as raw:
            source = _Reader(handle, size)
            header = DeltaHeader.read(source)
            _check_target(header, target_sha256, max_bundle_bytes)
            files = _base_files(base, header)
            sink = _Sink(raw, header.target_size)
            with bundle_gzip(sink) as tar:
                _apply_ops(source, header, base, files, budget, tar)
            raw.flush()
            os.fsync(raw.fileno())
        if sink.size != header.target_size or sink.digest.hexdigest() != target_sha256:
            raise DeltaError(f"the rebuilt bundle has sha256 {sink.digest.hexdigest()[:12]} and {sink.size} "
                             f"bytes, the order says {target_sha256[:12]} ({header.target_size} bytes)")
    except (OSError, zlib.error, ValueError, OverflowError, struct.error) as exc:
        out.unlink(missing_ok=True)
        raise DeltaError(f"the delta could not be applied: {brief(exc, 300)}") from None
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return out
