"""TUF repository metadata for the bundles ``edgedeploy serve`` holds, written with python-tuf's Metadata API.

Layout under ``EDGEDEPLOY_HOME`` (``bundles/`` and ``metadata/`` are public: any static HTTP server
or object store hosting both folders side by side serves the same repository)::

    bundles/<sha256>.edb                the targets, named ``bundles/<sha256>.edb`` in targets metadata
    metadata/<N>.root.json              every root version: a device walks them from the one it trusts
    metadata/root.json                  the newest root (what ``repo export-root`` hands to devices)
    metadata/timestamp.json             the one file rewritten in place: it names the current snapshot
    metadata/<N>.snapshot.json, <N>.targets.json   consistent snapshots: a new version is a new file
    keys/tuf/<role>-<keyid>.key         ed25519 private keys (PKCS#8 PEM, mode 0600)
    keys/tuf/settings.json              how long each role's metadata stays valid

Every change writes targets, then snapshot, then timestamp, each a new version with a fresh expiry
and its parent's record of its length and sha256: ``timestamp.json``, written last, is the commit
point, so a device never sees half a change. A role is signed by every key of it on this machine,
and refused when fewer than its threshold are here (targets: 2 of 3 by default). ``publish``
re-signs snapshot and timestamp (run it well within the timestamp's lifetime, from cron or a
systemd timer) and any role within a quarter of its lifetime of expiring. ``rotate`` replaces a
role's keys: a new root version, signed by the old root keys and the new ones, revokes the old keys;
their private files are deleted here. One lock file serialises writers (a cron publish and a rollout).
"""

from __future__ import annotations

import copy
import fcntl
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Metadata, MetaFile, Root, Signed, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from edge_agent.atomic import atomic_write_bytes, atomic_write_json, read_json
from edge_agent.bundle import read_manifest
from edge_agent.errors import AlreadyExistsError, BundleError, NotFoundError, UsageError, ValidationError
from edge_agent.home import edgedeploy_home
from edge_agent.trust import TrustStore
from edge_agent.tuf_fetch import target_name

__all__ = ["DEFAULT_EXPIRY", "ROLES", "TufRepository", "metadata_dir", "parse_duration", "parse_expiry",
           "repository_exists"]

ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
DEFAULT_EXPIRY = {Root.type: timedelta(days=365), Targets.type: timedelta(days=90),
                  Snapshot.type: timedelta(days=7), Timestamp.type: timedelta(days=1)}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_SERIALIZER = JSONSerializer(compact=False)
log = logging.getLogger(__name__)
T = TypeVar("T", Root, Timestamp, Snapshot, Targets)


def metadata_dir(home: Path | None = None) -> Path:
    """The public metadata folder (served at ``/metadata/``)."""
    return (home or edgedeploy_home()) / "metadata"


def repository_exists(home: Path | None = None) -> bool:
    """True once ``repo init`` ran in this home."""
    return (metadata_dir(home) / "timestamp.json").is_file()


def parse_duration(text: str) -> timedelta:
    """``90d``, ``12h``, ``30m``, ``45s``, ``2w`` -> a timedelta; UsageError otherwise."""
    match = _DURATION.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"bad duration {text!r}: write a positive number and a unit, e.g. 1d, 12h, 30m, 45s")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def parse_expiry(items: list[str]) -> dict[str, timedelta]:
    """``["timestamp=1d", "targets=30d,snapshot=7d"]`` -> {role: lifetime}; UsageError names a bad item."""
    expiry: dict[str, timedelta] = {}
    for item in (part for text in items for part in text.split(",") if part.strip()):
        role, sep, duration = item.partition("=")
        if not sep or role.strip() not in ROLES:
            raise UsageError(f"bad --expires {item!r}: write ROLE=DURATION with ROLE one of {', '.join(ROLES)}")
        expiry[role.strip()] = parse_duration(duration)
    return expiry


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class TufRepository:
    """The TUF repository of one ``EDGEDEPLOY_HOME``: metadata, keys, expiry settings."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = home or edgedeploy_home()
        self.metadata = metadata_dir(self.home)
        self.keys = self.home / "keys" / "tuf"

    @classmethod
    def open(cls, home: Path | None = None) -> TufRepository:
        """The repository of ``home``; NotFoundError before ``repo init``."""
        repo = cls(home)
        if not repository_exists(repo.home):
            raise NotFoundError(f"no TUF repository in {repo.home}: run `edgedeploy repo init` first")
        return repo

    # --- creating -------------------------------------------------------------------------------
    @classmethod
    def init(cls, home: Path | None = None, targets_threshold: int = 2, targets_keys: int = 3,
             root_threshold: int = 1, root_keys: int = 1,
             expiry: dict[str, timedelta] | None = None) -> TufRepository:
        """Create keys and version 1 of every role; the store's bundles that verify here become targets."""
        repo = cls(home)
        for role, threshold, count in ((Root.type, root_threshold, root_keys),
                                       (Targets.type, targets_threshold, targets_keys)):
            if not 1 <= threshold <= count:
                raise UsageError(f"--{role}-threshold {threshold} must be between 1 and --{role}-keys {count}")
        if repository_exists(repo.home):
            raise AlreadyExistsError(f"a TUF repository exists already in {repo.metadata}; "
                                     "`edgedeploy keys rotate ROLE` replaces keys")
        lifetimes = {**DEFAULT_EXPIRY, **(expiry or {})}
        with _locked(repo.keys):
            atomic_write_json(repo.keys / "settings.json",
                              {"expires_s": {r: t.total_seconds() for r, t in lifetimes.items()}})
            root = Root(expires=_now() + lifetimes[Root.type], consistent_snapshot=True)
            counts = {Root.type: root_keys, Targets.type: targets_keys, Snapshot.type: 1, Timestamp.type: 1}
            for role, count in counts.items():
                for _ in range(count):
                    root.add_key(_new_key(repo.keys, role).public_key, role)
            root.roles[Root.type].threshold = root_threshold
            root.roles[Targets.type].threshold = targets_threshold
            repo.metadata.mkdir(parents=True, exist_ok=True)
            repo._write_root(Metadata(root))
            targets = Targets()
            for path in _trusted_bundles(repo.home):
                repo._add_file(targets, path)
            repo._commit(targets, Snapshot(), Timestamp(), first=True)
        return repo

    # --- reading --------------------------------------------------------------------------------
    def _read(self, name: str, kind: type[T]) -> Metadata[T]:
        path = self.metadata / name
        try:
            md = Metadata[T].from_bytes(path.read_bytes())
        except FileNotFoundError:
            raise NotFoundError(f"TUF metadata {path} is missing: restore it from a backup") from None
        except ValueError as exc:
            raise ValidationError(f"TUF metadata {path} is damaged: {exc}") from None
        if not isinstance(md.signed, kind):
            raise ValidationError(f"{path} holds {md.signed.type} metadata, not {kind.type}")
        return md

    def root_version(self) -> int:
        """The newest root version on disk."""
        versions = [int(p.name.split(".", 1)[0]) for p in self.metadata.glob("*.root.json")
                    if p.name.split(".", 1)[0].isdigit()]
        if not versions:
            raise NotFoundError(f"no N.root.json in {self.metadata}: restore it from a backup")
        return max(versions)

    def root(self) -> Metadata[Root]:
        """The newest root metadata."""
        return self._read(f"{self.root_version()}.root.json", Root)

    def timestamp(self) -> Metadata[Timestamp]:
        """The current timestamp metadata."""
        return self._read("timestamp.json", Timestamp)

    def snapshot(self) -> Metadata[Snapshot]:
        """The snapshot the timestamp names."""
        return self._read(f"{self.timestamp().signed.snapshot_meta.version}.snapshot.json", Snapshot)

    def targets(self) -> Metadata[Targets]:
        """The targets metadata the snapshot names."""
        return self._read(f"{self.snapshot().signed.meta['targets.json'].version}.targets.json", Targets)

    def root_bytes(self) -> bytes:
        """The newest root, byte for byte (the trust anchor a device starts from)."""
        return (self.metadata / f"{self.root_version()}.root.json").read_bytes()

    # --- keys -----------------------------------------------------------------------------------
    def _signers(self, root: Root, role: str) -> list[CryptoSigner]:
        """The signers of ``role`` whose private key is on this machine."""
        wanted = set(root.roles[role].keyids)
        found = [_load_key(path) for path in sorted(self.keys.glob(f"{role}-*.key"))]
        return [signer for signer in found if signer.public_key.keyid in wanted]

    def _signers_enough(self, root: Root, role: str) -> list[CryptoSigner]:
        """The signers of ``role`` here; ValidationError when they are fewer than its threshold."""
        signers = self._signers(root, role)
        threshold = root.roles[role].threshold
        if len(signers) < threshold:
            raise ValidationError(f"only {len(signers)} of the {threshold} {role} keys needed to sign are in "
                                  f"{self.keys}; bring the others back (or rotate the role)")
        return signers

    def _sign(self, md: Metadata[Any], root: Root, role: str, extra: list[CryptoSigner] | None = None) -> None:
        """Sign with every key of ``role`` here (at least its threshold), plus ``extra`` (an old root's keys)."""
        md.signatures.clear()
        for signer in self._signers_enough(root, role) + list(extra or []):
            md.sign(signer, append=True)

    # --- writing --------------------------------------------------------------------------------
    def _settings(self) -> dict[str, timedelta]:
        path = self.keys / "settings.json"
        stored = read_json(path).get("expires_s", {}) if path.is_file() else {}
        return {**DEFAULT_EXPIRY, **{r: timedelta(seconds=float(s)) for r, s in stored.items() if r in ROLES}}

    def _renew(self, signed: Signed, expiry: dict[str, timedelta] | None = None, step: int = 1) -> None:
        signed.version += step
        signed.expires = _now() + {**self._settings(), **(expiry or {})}[signed.type]

    def _write(self, name: str, md: Metadata[Any]) -> bytes:
        data = md.to_bytes(_SERIALIZER)
        atomic_write_bytes(self.metadata / name, data)
        return data

    def _write_root(self, md: Metadata[Root], old_signers: list[CryptoSigner] | None = None) -> None:
        self._sign(md, md.signed, Root.type, old_signers)
        data = self._write(f"{md.signed.version}.root.json", md)
        atomic_write_bytes(self.metadata / "root.json", data)

    def _commit(self, targets: Targets | None, snapshot: Snapshot | None = None, timestamp: Timestamp | None = None,
                expiry: dict[str, timedelta] | None = None, first: bool = False) -> None:
        """New versions of targets (when given), snapshot and timestamp, in that order (``first``: version 1)."""
        root = self.root().signed
        snapshot = snapshot or self.snapshot().signed
        timestamp = timestamp or self.timestamp().signed
        step = 0 if first else 1
        if targets is not None:
            self._renew(targets, step=step)
            md = Metadata(targets)
            self._sign(md, root, Targets.type)
            data = self._write(f"{targets.version}.targets.json", md)
            snapshot.meta["targets.json"] = MetaFile.from_data(targets.version, data, ["sha256"])
        self._renew(snapshot, expiry, step)
        snapshot_md = Metadata(snapshot)
        self._sign(snapshot_md, root, Snapshot.type)
        data = self._write(f"{snapshot.version}.snapshot.json", snapshot_md)
        timestamp.snapshot_meta = MetaFile.from_data(snapshot.version, data, ["sha256"])
        self._renew(timestamp, expiry, step)
        timestamp_md = Metadata(timestamp)
        self._sign(timestamp_md, root, Timestamp.type)
        self._write("timestamp.json", timestamp_md)

    def _add_file(self, targets: Targets, path: Path) -> bool:
        """List a stored bundle as a target (with its model in ``custom``); False when it is listed already."""
        info = TargetFile.from_file(target_name(path.stem), str(path), ["sha256"])
        if info.hashes["sha256"] != path.stem:
            raise ValidationError(f"{path} does not hash to its name; the bundle store is damaged")
        if targets.targets.get(info.path) is not None:
            return False
        manifest, _signature = read_manifest(path)
        info.unrecognized_fields["custom"] = {"model": {"name": manifest.name, "version": manifest.version}}
        targets.targets[info.path] = info
        return True

    # --- operations -----------------------------------------------------------------------------
    def add_bundle(self, stored: Path) -> bool:
        """List a bundle of the store (``bundles/<sha>.edb``) as a target and publish; False if it was listed."""
        with _locked(self.keys):
            targets = self.targets().signed
            if not self._add_file(targets, Path(stored)):
                return False
            self._commit(targets)
        return True

    def publish(self, expiry: dict[str, timedelta] | None = None) -> dict[str, int]:
        """Re-sign snapshot and timestamp (and any role close to expiring); returns the new versions."""
        with _locked(self.keys):
            root = self.root()
            if self._due(root.signed):
                renewed = self._next_root(root)
                self._renew(renewed.signed)
                self._write_root(renewed)
            targets = self.targets().signed
            self._commit(targets if self._due(targets) else None, expiry=expiry)
        return self.versions()

    def _due(self, signed: Signed) -> bool:
        """True within the last quarter of a role's lifetime."""
        return signed.expires - datetime.now(UTC) < self._settings()[signed.type] / 4

    @staticmethod
    def _next_root(current: Metadata[Root]) -> Metadata[Root]:
        return Metadata(copy.deepcopy(current.signed))

    def rotate(self, role: str) -> dict[str, Any]:
        """Replace every key of ``role``; the new root is signed by the old root keys and the new ones."""
        if role not in ROLES:
            raise UsageError(f"unknown TUF role {role!r}: use one of {', '.join(ROLES)}")
        with _locked(self.keys):
            current = self.root()
            old_root_signers = self._signers_enough(current.signed, Root.type)
            new = self._next_root(current)
            old_ids = list(new.signed.roles[role].keyids)
            new_signers = [_new_key(self.keys, role) for _ in old_ids]
            for keyid in old_ids:
                new.signed.revoke_key(keyid, role)
            for signer in new_signers:
                new.signed.add_key(signer.public_key, role)
            self._renew(new.signed)
            self._write_root(new, old_root_signers if role == Root.type else None)
            self._commit(self.targets().signed if role == Targets.type else None)
            for keyid in old_ids:
                for path in self.keys.glob(f"{role}-{keyid[:16]}.key"):
                    path.unlink()
        return {"role": role, "revoked": old_ids, "keys": [s.public_key.keyid for s in new_signers],
                "root_version": new.signed.version}

    def export_root(self, out: Path) -> int:
        """Write the newest root to ``out`` (a device's ``tuf_root``); returns its version."""
        atomic_write_bytes(Path(out), self.root_bytes())
        return self.root_version()

    def versions(self) -> dict[str, int]:
        """The current version of each role."""
        return {Root.type: self.root_version(), Targets.type: self.targets().signed.version,
                Snapshot.type: self.snapshot().signed.version, Timestamp.type: self.timestamp().signed.version}

    def status(self) -> dict[str, Any]:
        """Each role's version, expiry, keys and threshold, and every target (``repo status --json``)."""
        root = self.root().signed
        now = _now()
        current = {Root.type: root, Targets.type: self.targets().signed, Snapshot.type: self.snapshot().signed,
                   Timestamp.type: self.timestamp().signed}
        roles = {name: {"version": signed.version, "expires": signed.expires.isoformat(),
                        "expired": signed.expires <= now, "threshold": root.roles[name].threshold,
                        "keys": list(root.roles[name].keyids), "keys_here": len(self._signers(root, name))}
                 for name, signed in current.items()}
        targets = [{"path": path, "length": info.length, "sha256": info.hashes.get("sha256"),
                    "model": (info.custom or {}).get("model")}
                   for path, info in sorted(current[Targets.type].targets.items())]  # type: ignore[attr-defined]
        return {"metadata_dir": str(self.metadata), "consistent_snapshot": root.consistent_snapshot,
                "roles": roles, "targets": targets}


def _trusted_bundles(home: Path) -> list[Path]:
    """The store's bundles signed by a key trusted here (``repo init`` lists them as targets)."""
    trust, found = TrustStore.local(home), []
    for path in sorted((home / "bundles").glob("*.edb")):
        try:
            _manifest, signature = read_manifest(path, trust)
        except BundleError as exc:
            log.warning("not listing %s as a target: %s", path.name, exc)
            continue
        if signature.valid and signature.trusted:
            found.append(path)
        else:
            log.warning("not listing %s as a target: its signer is not trusted here", path.name)
    return found


def _new_key(folder: Path, role: str) -> CryptoSigner:
    """A fresh ed25519 key for ``role``, written at mode 0600 before it is used."""
    signer = CryptoSigner.generate_ed25519()
    atomic_write_bytes(folder / f"{role}-{signer.public_key.keyid[:16]}.key", signer.private_bytes, mode=0o600)
    return signer


def _load_key(path: Path) -> CryptoSigner:
    private_key = load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(private_key, Ed25519PrivateKey):
        raise ValidationError(f"{path} is not an ed25519 private key")
    return CryptoSigner(private_key, SSlibKey.from_crypto(private_key.public_key()))


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One writer at a time (``repo publish`` from cron while a rollout adds its bundle)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
