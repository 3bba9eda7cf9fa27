"""Bundles trusted through TUF metadata (python-tuf's ``ngclient.Updater``): the device's side of ``edgedeploy repo``.

With ``tuf_root`` in agent.yaml, an order's bundle counts only when the repository's signed metadata
lists it, and every check is python-tuf's own, done before a byte of the bundle is trusted::

    1. Updater.refresh(): root versions one by one (each signed by the previous root's keys and its
       own), then timestamp, snapshot and targets. Refused: an expired role (freeze), a version below
       the one this device trusts already (rollback), a snapshot or targets file other than the
       version and hash its parent names (mix-and-match), fewer valid signatures than the role's
       threshold (a revoked or missing key), a file longer than its limit (endless data).
    2. get_targetinfo("bundles/<sha256>.edb"): the bundle must be a target, and the target's sha256
       must be the one the (signed) order names.
    3. The downloader takes at most the target's length (``download_bundle(length=...)``).
    4. Updater.find_cached_target() checks the file's length and hashes against the target before
       the bundle is opened; the bundle's own ed25519 signature is still checked after that.

One metadata folder per device (``data_dir/tuf``), whatever URL or offline folder the metadata comes
from, so what the device has seen bounds every later source: a mirror or a USB stick cannot roll it
back. Metadata is fetched from ``tuf_metadata_url``, else from the ``metadata/`` folder beside the
bundle's folder in its URL (``http://host/bundles/<sha>.edb`` -> ``http://host/metadata/``); the
transport only moves bytes (a total deadline bounds each file), TUF verifies them. A refusal is one
:class:`~edge_agent.errors.UpdateMetadataError` line that names what was wrong.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlsplit, urlunsplit

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from edge_agent.errors import IntegrityError, NotFoundError, UpdateMetadataError, brief

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig

__all__ = ["TARGETS_FOLDER", "BundleMetadata", "TrustedTarget", "device_metadata", "metadata_url_for",
           "target_name"]

log = logging.getLogger(__name__)

TARGETS_FOLDER = "bundles"
_CHUNK = 64 * 1024
_METADATA_DEADLINE_S = 60.0  # a metadata file is at most a few MB: a minute is plenty, a drip is not
_READ_TIMEOUT_S = 30.0


def target_name(bundle_sha256: str) -> str:
    """The TUF target path of a bundle: ``bundles/<sha256>.edb`` (content-addressed, never overwritten)."""
    return f"{TARGETS_FOLDER}/{bundle_sha256}.edb"


def metadata_url_for(bundle_url: str) -> str:
    """The ``metadata/`` folder beside the bundle URL's folder: ``.../bundles/x.edb`` -> ``.../metadata/``."""
    parts = urlsplit(bundle_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UpdateMetadataError(f"cannot derive the TUF metadata URL from bundle URL {brief(bundle_url, 200)!r}; "
                                  "set tuf_metadata_url in agent.yaml")
    folder = parts.path.rsplit("/", 2)[0]
    return urlunsplit((parts.scheme, parts.netloc, f"{folder}/metadata/", "", ""))


class _Fetcher(FetcherInterface):
    """Moves metadata bytes (python-tuf verifies them); remembers the last file asked for, for the error line,
    and closes what a refused transfer left open (python-tuf stops reading; it does not close)."""

    def __init__(self) -> None:
        self.last = ""
        self.opened: list[BinaryIO] = []

    def fetch(self, url: str) -> Iterator[bytes]:
        self.last = url.rsplit("/", 1)[-1]
        return super().fetch(url)

    def close(self) -> None:
        """Close every stream this fetcher opened."""
        for stream in self.opened:
            stream.close()
        self.opened.clear()


class _HttpFetcher(_Fetcher):
    """Plain HTTP(S) with a total deadline per file (ngclient's own fetcher bounds one read, not a drip)."""

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            response = urllib.request.urlopen(url, timeout=_READ_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise tuf_errors.DownloadHTTPError(f"HTTP {exc.code} for {url}", exc.code) from None
        self.opened.append(response)
        return self._chunks(response, url, time.monotonic() + _METADATA_DEADLINE_S)

    @staticmethod
    def _chunks(response: BinaryIO, url: str, deadline: float) -> Iterator[bytes]:
        with response:
            while chunk := response.read1(_CHUNK):  # type: ignore[attr-defined]
                if time.monotonic() > deadline:
                    raise tuf_errors.SlowRetrievalError(f"{url} took over {_METADATA_DEADLINE_S:g}s")
                yield chunk


class _FolderFetcher(_Fetcher):
    """Metadata from a folder (an offline export): ``file:`` URLs inside it, 404 for anything else."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder.resolve()

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = Path(urllib.request.url2pathname(urlsplit(url).path)).resolve()
        if not path.is_relative_to(self.folder) or not path.is_file():
            raise tuf_errors.DownloadHTTPError(f"{path.name} is not in {self.folder}", 404)
        handle = open(path, "rb")  # noqa: SIM115 - closed by close(), also when python-tuf stops early
        self.opened.append(handle)
        return self._chunks(handle)

    @staticmethod
    def _chunks(handle: BinaryIO) -> Iterator[bytes]:
        with handle:
            while chunk := handle.read(_CHUNK):
                yield chunk


@dataclass(frozen=True)
class TrustedTarget:
    """A bundle as the repository's verified targets metadata lists it."""

    name: str
    length: int
    sha256: str
    info: TargetFile
    updater: Updater

    def verify(self, path: Path) -> None:
        """TUF's check of a downloaded file: IntegrityError unless its length and hashes are the target's."""
        if self.updater.find_cached_target(self.info, str(path)) is None:
            raise IntegrityError(f"refused: {path.name} does not have the length ({self.length}) and sha256 "
                                 f"its TUF target {self.name} lists")


def _why(exc: Exception) -> str:
    """What a python-tuf exception means for an operator, as the end of one line."""
    text = brief(exc, 300)
    if isinstance(exc, tuf_errors.ExpiredMetadataError):
        return f"{text} (frozen metadata: the repository was not re-signed in time; `edgedeploy repo publish`)"
    if isinstance(exc, tuf_errors.BadVersionNumberError):
        return f"{text} (metadata older than, or not matching, what this device trusts: rollback or mix-and-match)"
    if isinstance(exc, tuf_errors.UnsignedMetadataError):
        return f"{text} (not signed by enough trusted keys: a revoked key, or too few signatures)"
    if isinstance(exc, tuf_errors.LengthOrHashMismatchError):
        return f"{text} (a file other than the one its signed parent names: mix-and-match)"
    if isinstance(exc, tuf_errors.DownloadLengthMismatchError):
        return f"{text} (longer than the metadata allows: endless data)"
    if isinstance(exc, tuf_errors.DownloadHTTPError):
        return f"{text} (is this a TUF repository? `edgedeploy repo init` on the bundle server)"
    cause = exc.__cause__ or exc.__context__
    return f"{text}: {brief(cause, 300)}" if cause is not None and str(cause) not in text else text


class BundleMetadata:
    """The TUF client of one device: trusted root, local metadata folder, where metadata comes from."""

    def __init__(self, root_file: Path, cache_dir: Path, metadata_url: str | None = None,
                 folder: Path | None = None) -> None:
        root_file = Path(root_file)
        if not root_file.is_file():
            raise NotFoundError(f"tuf_root {root_file} does not exist: copy the repository's root "
                                "(`edgedeploy repo export-root -o root.json`) to the device")
        self.root = root_file.read_bytes()
        self.cache_dir = Path(cache_dir)
        self.folder = folder
        self.metadata_url = (folder / "metadata").resolve().as_uri() + "/" if folder is not None else metadata_url
        self._updater(self.metadata_url or "")  # building one checks the root (self-signed); nothing is fetched

    def _updater(self, base_url: str, fetcher: _Fetcher | None = None) -> Updater:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            return Updater(str(self.cache_dir), base_url, fetcher=fetcher, config=UpdaterConfig(),
                           bootstrap=self.root)
        except (tuf_errors.RepositoryError, ValueError, KeyError, TypeError) as exc:
            raise UpdateMetadataError(f"tuf_root is not a valid, self-signed TUF root: {brief(exc, 300)}") from None

    def target(self, bundle_sha256: str, bundle_url: str) -> TrustedTarget:
        """Refresh the metadata and return the bundle's target; UpdateMetadataError says why not.

        A new Updater per call: python-tuf refreshes once per instance, and every order must see the
        repository as it is now.
        """
        base = self.metadata_url or metadata_url_for(bundle_url)
        fetcher = _FolderFetcher(self.folder) if self.folder is not None else _HttpFetcher()
        updater = self._updater(base, fetcher)
        name = target_name(bundle_sha256)
        try:
            updater.refresh()
            info = updater.get_targetinfo(name)
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as exc:
            raise UpdateMetadataError(f"refused update metadata {brief(fetcher.last, 80)} from {brief(base, 200)}: "
                                      f"{_why(exc)}") from None
        except OSError as exc:
            raise UpdateMetadataError(f"update metadata could not be stored in {self.cache_dir}: {exc}") from None
        finally:
            fetcher.close()
        if info is None:
            raise UpdateMetadataError(f"refused: bundle {bundle_sha256} is not a target of the signed metadata at "
                                      f"{brief(base, 200)} (add it with `edgedeploy repo add`)")
        if info.hashes.get("sha256") != bundle_sha256:
            raise UpdateMetadataError(f"refused: TUF target {name} has sha256 {info.hashes.get('sha256')!r}, "
                                      f"the order says {bundle_sha256}")
        log.info("bundle %s is TUF target %s (%d bytes)", bundle_sha256[:12], name, info.length)
        return TrustedTarget(name, info.length, bundle_sha256, info, updater)


def device_metadata(config: AgentConfig, folder: Path | None = None) -> BundleMetadata | None:
    """The device's TUF client (None without ``tuf_root``); ``folder``: an offline export's metadata instead
    of the network, checked against the same local state."""
    if config.tuf_root is None:
        return None
    return BundleMetadata(config.tuf_root, config.data_dir / "tuf", config.tuf_metadata_url, folder)
