"""The device's time zone: agent.yaml's ``timezone`` (an IANA name) or else the system's.

The controller's maintenance windows are in device local time (``--window 02:00-04:00``), so the
agent reports its zone's name and its current offset from UTC in minutes, daylight saving time
included (``timezone``, ``utc_offset_min`` in every reported message). Names are looked up in the
system's zone database (``/usr/share/zoneinfo``, Debian's ``tzdata``) or the ``tzdata`` package.
"""

from __future__ import annotations

import datetime
import os
import time
import zoneinfo
from pathlib import Path

from edge_agent.errors import ValidationError, brief

__all__ = ["check_timezone", "local_zone_name", "utc_offset_min"]

_LOCALTIME = Path("/etc/localtime")


def check_timezone(name: str) -> str:
    """``name`` when it is a zone this device knows; ValidationError otherwise."""
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValidationError(f"unknown time zone {brief(name, 80)!r}: use an IANA name such as Europe/Rome "
                              "(the zone database is the tzdata package)") from None
    return name


def local_zone_name() -> str | None:
    """The system zone's IANA name ($TZ, else where /etc/localtime points); None when it has none."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    if _LOCALTIME.is_symlink():
        target = str(_LOCALTIME.resolve())
        candidates.append(target.partition("zoneinfo/")[2])
    for name in filter(None, candidates):
        try:
            return check_timezone(name)
        except ValidationError:
            continue
    return None


def utc_offset_min(name: str | None, now: float | None = None) -> int:
    """Minutes the zone ``name`` (None: the system's local time) is ahead of UTC at ``now``."""
    moment = time.time() if now is None else now
    if name is None:
        local = datetime.datetime.fromtimestamp(moment).astimezone()
    else:
        local = datetime.datetime.fromtimestamp(moment, zoneinfo.ZoneInfo(name))
    offset = local.utcoffset() or datetime.timedelta(0)
    return int(offset.total_seconds() // 60)
