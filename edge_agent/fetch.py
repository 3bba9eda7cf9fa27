"""How a device gets the bundle an order names: a delta against the bundle it runs, else the whole file.

When the device holds the model's active bundle unpacked (a :class:`~edge_agent.delta.DeltaBase`),
:func:`fetch_bundle` first asks for a delta at the bundle's URL plus ``.delta/<active sha256>`` (for
``http://host/bundles/<new>.edb``: ``http://host/bundles/<new>.edb.delta/<old>``; a query string stays
as it is). The delta travels through the same downloader, with the same size limit, deadline and
minimum rate as a bundle (:func:`~edge_agent.download.fetch_file`), and :func:`~edge_agent.delta.apply_delta`
rebuilds ``<sha>.edb`` beside the other downloads; its sha256 is checked against the order there, and
the caller verifies it as any downloaded bundle. Anything that goes wrong on the way (no base, a server
without deltas or without the base bundle, a corrupt or hostile delta, a patch over the memory budget,
a different sha256) is one log line saying why, then the whole bundle is downloaded as before. Only a
newer order abandoning the transfer is raised as it is: then neither download is wanted.

The delta's files are ``<sha>.delta.part`` and ``<sha>.rebuilt.part`` in the downloads folder: removed
after each try, and reclaimed with the other ``.part`` files should the agent stop in between.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from edge_agent.delta import DeltaBase, apply_delta
from edge_agent.download import DownloadLimits, check_order, download_bundle, fetch_file, reclaim_downloads
from edge_agent.errors import EdgeDeployError, brief

__all__ = ["delta_url", "fetch_bundle"]

log = logging.getLogger(__name__)


def delta_url(bundle_url: str, base_sha256: str) -> str:
    """The URL of the delta from bundle ``base_sha256`` to the bundle at ``bundle_url``."""
    parts = urlsplit(bundle_url)
    return urlunsplit(parts._replace(path=f"{parts.path}.delta/{base_sha256}"))


def fetch_bundle(url: str, sha256: str, folder: Path, limits: DownloadLimits | None = None,
                 abandon: Callable[[], bool] | None = None, base: DeltaBase | None = None,
                 patch_budget: int | None = None, token: str | None = None, length: int | None = None) -> Path:
    """``folder/<sha256>.edb`` rebuilt from a delta against ``base`` when one works, else downloaded whole.

    Raises what :func:`~edge_agent.download.download_bundle` raises; a failed delta never does (it is
    logged, and the whole bundle downloaded), except when ``abandon()`` turned true.
    """
    folder, limits = Path(folder), limits or DownloadLimits()
    if base is not None and base.bundle_sha256 != sha256 and not (folder / f"{sha256}.edb").is_file():
        check_order(url, sha256)  # a bundle already in the folder (an offline install's) needs no URL
        try:
            return _rebuild(url, sha256, folder, limits, abandon, base, patch_budget, token)
        except (EdgeDeployError, OSError) as exc:
            if abandon is not None and abandon():
                raise
            log.info("no delta update to bundle %s from %s (%s): downloading the whole bundle", sha256[:12],
                     base.bundle_sha256[:12], brief(exc, 300))
    return download_bundle(url, sha256, folder, limits, abandon, token, length)


def _rebuild(url: str, sha256: str, folder: Path, limits: DownloadLimits, abandon: Callable[[], bool] | None,
             base: DeltaBase, patch_budget: int | None, token: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    reclaim_downloads(folder, sha256)
    part, rebuilt = folder / f"{sha256}.delta.part", folder / f"{sha256}.rebuilt.part"
    try:
        fetch_file(delta_url(url, base.bundle_sha256), part, limits, abandon, token)
        size = part.stat().st_size
        apply_delta(part, base, sha256, rebuilt, limits.max_bytes, patch_budget)
        final = folder / f"{sha256}.edb"
        os.replace(rebuilt, final)
    finally:
        part.unlink(missing_ok=True)
        rebuilt.unlink(missing_ok=True)
    (folder / f"{sha256}.part").unlink(missing_ok=True)  # a whole download an earlier try began
    log.info("bundle %s rebuilt from a %d-byte delta against %s (the bundle is %d bytes)", sha256[:12], size,
             base.bundle_sha256[:12], final.stat().st_size)
    return final
