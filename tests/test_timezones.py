"""The device's time zone (edge_agent/timezones.py) and agent.yaml's ``timezone`` key."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from edge_agent.config import parse_agent_config
from edge_agent.errors import ValidationError
from edge_agent.timezones import check_timezone, local_zone_name, utc_offset_min

BASE = {"device_id": "pi-1", "broker": "mqtt://127.0.0.1:1883", "data_dir": "data"}
WINTER, SUMMER = 1_767_225_600.0, 1_782_864_000.0  # 2026-01-01 and 2026-07-01, 00:00 UTC


def test_offsets_follow_the_zone_and_its_daylight_saving_time() -> None:
    assert utc_offset_min("Europe/Rome", WINTER) == 60 and utc_offset_min("Europe/Rome", SUMMER) == 120
    assert utc_offset_min("Asia/Kolkata", WINTER) == 330 and utc_offset_min("America/St_Johns", WINTER) == -210
    local = datetime.datetime.fromtimestamp(SUMMER).astimezone().utcoffset()
    assert local is not None and utc_offset_min(None, SUMMER) == int(local.total_seconds() // 60)


def test_agent_yaml_takes_an_iana_name_and_refuses_anything_else(tmp_path: Path) -> None:
    assert parse_agent_config({**BASE, "timezone": "Europe/Rome"}, base=tmp_path).timezone == "Europe/Rome"
    assert parse_agent_config(BASE, base=tmp_path).timezone is None  # the system's zone
    for bad in ("Mars/Olympus_Mons", "../../etc/passwd", ""):
        with pytest.raises(ValidationError, match="timezone"):
            parse_agent_config({**BASE, "timezone": bad}, base=tmp_path)
    with pytest.raises(ValidationError, match="unknown time zone 'Nowhere/City': use an IANA name"):
        check_timezone("Nowhere/City")


def test_the_system_zone_is_named_from_tz_or_etc_localtime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    assert local_zone_name() == "Asia/Tokyo"
    monkeypatch.setenv("TZ", "not a zone")
    if not Path("/etc/localtime").is_symlink():
        pytest.skip("/etc/localtime is not a link to a named zone here")
    assert local_zone_name() == str(Path("/etc/localtime").resolve()).partition("zoneinfo/")[2]
