"""Rollout policies: option parsing, waves, pacing in simulated time, windows, thresholds, telemetry gates."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import UsageError, ValidationError
from edge_agent.metrics import MetricsRegistry
from edge_agent.telemetry import sample
from packager.control.policy import (
    UNLIMITED,
    Gate,
    Pacer,
    RolloutPolicy,
    Stats,
    in_window,
    next_window_start,
    rate_for_wave,
    split_waves,
    stats_from_telemetry,
    too_many_failures,
)

ALL_OPTIONS = dict(canary="2", wave="10", rate="100/min", ramp="10,2", bake="60", start="2026-12-01T02:00:00Z",
                   window="02:00-04:00,22:00-02:00", max_failures="10%", min_sample="5",
                   gate="p95<=1.2x,errors<=1%", wave_timeout="300")


def test_every_option_parses_into_the_policy() -> None:
    policy = RolloutPolicy.from_options(**ALL_OPTIONS)
    assert (policy.canary, policy.wave, policy.rate_per_min, policy.ramp) == (2, "10", 100.0, (10.0, 2.0))
    assert (policy.bake_s, policy.max_failures, policy.min_sample, policy.wave_timeout_s) == (60.0, 0.1, 5, 300.0)
    assert policy.start == datetime(2026, 12, 1, 2, 0, tzinfo=UTC).timestamp()
    assert policy.windows == [(120, 240), (1320, 120)]
    assert policy.gate is not None and policy.gate.text == "p95<=1.2x,errors<=1%"


def test_defaults_and_none_mean_unset() -> None:
    assert RolloutPolicy.from_options() == RolloutPolicy()
    assert RolloutPolicy.from_options(rate=None, gate=None, canary=None) == RolloutPolicy()
    policy = RolloutPolicy()
    assert (policy.canary, policy.wave, policy.rate_per_min, policy.windows, policy.gate) == (1, "25%", None, [], None)


@pytest.mark.parametrize(("rate", "per_min"), [("100/min", 100.0), ("5/s", 300.0), ("600/h", 10.0),
                                               ("2.5/sec", 150.0), (" 30 / minute ", 30.0), ("1/hour", 1 / 60)])
def test_rates_in_any_unit_become_devices_per_minute(rate: str, per_min: float) -> None:
    assert RolloutPolicy.from_options(rate=rate).rate_per_min == pytest.approx(per_min)


def test_start_takes_z_or_an_offset_and_durations_take_units() -> None:
    utc = RolloutPolicy.from_options(start="2026-12-01T02:00:00Z").start
    assert RolloutPolicy.from_options(start="2026-12-01T03:00:00+01:00").start == utc
    assert RolloutPolicy.from_options(start="2026-12-01T02:00:00.000+00:00").start == utc
    assert RolloutPolicy.from_options(bake="5m", wave_timeout="1h").bake_s == 300.0
    assert RolloutPolicy.from_options(bake="90s", wave_timeout="1.5h").wave_timeout_s == 5400.0
    assert RolloutPolicy.from_options(ramp="5/s,1.5").ramp == (300.0, 1.5)


def test_api_spellings_of_the_options_and_plain_numbers_are_accepted() -> None:
    policy = RolloutPolicy.from_options(**{"max-failures": "5%", "--min-sample": 3, "wave-timeout": 60, "canary": 0,
                                           "window": ["02:00-03:00", "04:00-05:00"]})
    assert (policy.max_failures, policy.min_sample, policy.wave_timeout_s, policy.canary) == (0.05, 3, 60.0, 0)
    assert policy.windows == [(120, 180), (240, 300)]


def test_the_policy_survives_a_json_round_trip() -> None:
    policy = RolloutPolicy.from_options(**ALL_OPTIONS)
    again = RolloutPolicy.from_dict(json.loads(json.dumps(policy.to_dict())))
    assert again == policy
    assert RolloutPolicy.from_dict({}) == RolloutPolicy()


@pytest.mark.parametrize("doc", [{"canary": "many"}, {"windows": [[1]]}, {"gate": "p95>1x"}, {"wave": "0%"},
                                 {"surprise": 1}, {"ramp": [1]}])
def test_a_damaged_policy_document_is_a_validation_error(doc: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match=r"^rollout policy is damaged \(.*\); start a new rollout$"):
        RolloutPolicy.from_dict(doc)


BAD_OPTIONS = [
    ("canary", "-1", "--canary: must be at least 0"),
    ("canary", "two", "--canary: bad number 'two' (write a whole number)"),
    ("wave", "0%", "--wave: must be above 0%"),
    ("wave", "0", "--wave: must be at least 1 device"),
    ("wave", "150%", "--wave: '150%' is not between 0% and 100%"),
    ("wave", "lots", "--wave: bad wave size 'lots' (write a device count, 5, or a percentage, 25%)"),
    ("rate", "100", "--rate: bad rate '100' (write N/min, N/s or N/h, e.g. 100/min)"),
    ("rate", "100/day", "--rate: bad rate '100/day' (write N/min, N/s or N/h, e.g. 100/min)"),
    ("rate", "fast/min", "--rate: bad rate 'fast/min' (write N/min, N/s or N/h, e.g. 100/min)"),
    ("rate", "nan/min", "--rate: bad rate 'nan/min' (write N/min, N/s or N/h, e.g. 100/min)"),
    ("rate", "0/min", "--rate: '0/min' must be above 0"),
    ("rate", "-5/s", "--rate: '-5/s' must be above 0"),
    ("ramp", "10", "--ramp: bad ramp '10' (write BASE,FACTOR, e.g. 10,2: 10 devices/min, doubled every wave)"),
    ("ramp", "ten,2", "--ramp: bad ramp 'ten,2' (write BASE,FACTOR, e.g. 10,2)"),
    ("ramp", "10,double", "--ramp: bad ramp '10,double' (write BASE,FACTOR, e.g. 10,2)"),
    ("ramp", "0,2", "--ramp: the base rate in '0,2' must be above 0"),
    ("ramp", "10,0.5", "--ramp: the factor in '10,0.5' must be at least 1"),
    ("ramp", "10/week,2", "--ramp: bad rate '10/week' (write N/min, N/s or N/h, e.g. 100/min)"),
    ("bake", "soon", "--bake: bad duration 'soon' (write seconds, e.g. 60, or 5m, 1h)"),
    ("bake", "5d", "--bake: bad duration '5d' (write seconds, e.g. 60, or 5m, 1h)"),
    ("bake", "-1", "--bake: '-1' must be at least 0"),
    ("wave_timeout", "0", "--wave-timeout: '0' must be above 0"),
    ("wave_timeout", "inf", "--wave-timeout: bad duration 'inf' (write seconds, e.g. 60, or 5m, 1h)"),
    ("start", "tomorrow", "--start: bad time 'tomorrow' (write ISO 8601 with a zone, e.g. 2026-12-01T02:00:00Z)"),
    ("start", "2026-12-01T02:00:00",
     "--start: '2026-12-01T02:00:00' has no time zone (end it with Z or an offset such as +01:00)"),
    ("start", "2026-12-01", "--start: '2026-12-01' has no time zone (end it with Z or an offset such as +01:00)"),
    ("window", "25:00-04:00", "--window: bad time '25:00' (write HH:MM-HH:MM)"),
    ("window", "02:00-04:60", "--window: bad time '04:60' (write HH:MM-HH:MM)"),
    ("window", "24:00-02:00", "--window: bad time '24:00' (write HH:MM-HH:MM)"),
    ("window", "2am-4am", "--window: bad time '2am' (write HH:MM-HH:MM)"),
    ("window", "02:00-4:5", "--window: bad time '4:5' (write HH:MM-HH:MM)"),
    ("window", "02:00", "--window: bad window '02:00' (write HH:MM-HH:MM, e.g. 02:00-04:00)"),
    ("window", "02:00-04:00,", "--window: bad window '' (write HH:MM-HH:MM, e.g. 02:00-04:00)"),
    ("window", "03:00-03:00", "--window: '03:00-03:00' is empty (write 00:00-24:00 for the whole day)"),
    ("max_failures", "some", "--max-failures: bad percentage 'some' (write e.g. 10%)"),
    ("max_failures", "101%", "--max-failures: '101%' is not between 0% and 100%"),
    ("min_sample", "0", "--min-sample: must be at least 1"),
    ("min_sample", "5.5", "--min-sample: bad number '5.5' (write a whole number)"),
    ("gate", "", "--gate: empty gate (write e.g. p95<=1.2x,errors<=1%)"),
    ("gate", "p95>1.2x", "--gate: bad bound 'p95>1.2x' (write e.g. p95<=1.2x,errors<=1%)"),
    ("gate", "p95<=1.2x,", "--gate: bad bound '' (write e.g. p95<=1.2x,errors<=1%)"),
    ("gate", "p90<=1.2x", "--gate: unknown metric 'p90' in 'p90<=1.2x' (metrics: p50, p95, p99, errors)"),
    ("gate", "p95<=12", "--gate: bad limit '12' in 'p95<=12' (write a factor like 1.2x or a time like 50ms)"),
    ("gate", "p95<=0x", "--gate: bad limit '0x' in 'p95<=0x' (write a factor like 1.2x or a time like 50ms)"),
    ("gate", "p95<=-5ms", "--gate: bad limit '-5ms' in 'p95<=-5ms' (write a factor like 1.2x or a time like 50ms)"),
    ("gate", "errors<=1", "--gate: bad limit '1' in 'errors<=1' (write a share like 1% or a factor like 2x)"),
    ("gate", "errors<=150%",
     "--gate: bad limit '150%' in 'errors<=150%' (write a share like 1% or a factor like 2x)"),
    ("gate", "p95<=" + "9" * 1000, "--gate: the value is 1005 characters long; at most 1000"),
    ("rate", True, "--rate: expected a string, not bool"),
    ("window", {"from": "02:00"}, "--window: expected a string, not dict"),
]


@pytest.mark.parametrize(("option", "value", "message"), BAD_OPTIONS)
def test_each_bad_value_is_one_error_naming_its_option(option: str, value: Any, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        RolloutPolicy.from_options(**{option: value})
    assert str(caught.value) == message


def test_an_unknown_option_is_named_with_the_known_ones() -> None:
    with pytest.raises(UsageError) as caught:
        RolloutPolicy.from_options(speed="fast")
    assert str(caught.value) == ("unknown rollout option --speed (options: --canary, --wave, --rate, --ramp, --bake, "
                                 "--start, --window, --max-failures, --min-sample, --gate, --wave-timeout)")


# -- waves ---------------------------------------------------------------------------------------

def ids(n: int) -> list[str]:
    return [f"dev-{i:05d}" for i in range(n)]


def test_waves_by_percent_after_a_canary_and_by_count() -> None:
    assert [len(w) for w in split_waves(ids(20), canary=1, wave="25%")] == [1, 5, 5, 5, 4]
    assert [len(w) for w in split_waves(ids(7), canary=0, wave="3")] == [3, 3, 1]
    assert split_waves([], canary=1, wave="25%") == []
    with pytest.raises(UsageError, match=r"^--canary: must be 0 or more$"):
        split_waves(ids(3), canary=-1, wave="1")


@settings(max_examples=200, deadline=None)
@given(devices=st.lists(st.sampled_from(ids(60)), max_size=120), canary=st.integers(0, 10),
       wave=st.one_of(st.integers(1, 30).map(str), st.integers(1, 100).map(lambda p: f"{p}%")))
def test_wave_splitting_covers_every_device_exactly_once(devices: list[str], canary: int, wave: str) -> None:
    waves = split_waves(devices, canary, wave)
    flat = [d for w in waves for d in w]
    assert sorted(flat) == sorted(set(devices)) and len(flat) == len(set(flat))
    assert all(waves)
    if canary and devices:
        assert len(waves[0]) == min(canary, len(set(devices)))
    size = int(wave) if not wave.endswith("%") else max(1, math.ceil(int(wave[:-1]) / 100 * len(set(devices))))
    assert all(len(w) <= size for w in waves[1 if canary else 0:])


# -- failure threshold ---------------------------------------------------------------------------

@pytest.mark.parametrize(("failed", "succeeded", "max_failures", "min_sample", "targeted", "expected"), [
    (0, 10, 0.1, 1, None, False),
    (1, 9, 0.1, 1, None, False),     # exactly 10%: not above
    (2, 9, 0.1, 1, None, True),
    (1, 0, 0.1, 1, None, True),
    (1, 0, 0.0, 1, None, True),      # 0%: the first failure stops it
    (3, 0, 1.0, 1, None, False),     # 100%: never
    (3, 1, 0.1, 5, None, False),     # only 4 finished, the sample is 5
    (3, 2, 0.1, 5, None, True),
    (2, 1, 0.1, 5, 3, True),         # all 3 targeted devices finished: judged although the sample is 5
    (29, 71, 0.29, 1, None, False),  # 29% of 100 is at the threshold, whatever floating point says
])
def test_failure_share_is_judged_after_the_minimum_sample(failed: int, succeeded: int, max_failures: float,
                                                           min_sample: int, targeted: int | None,
                                                           expected: bool) -> None:
    assert too_many_failures(failed, succeeded, max_failures, min_sample, targeted) is expected


# -- windows -------------------------------------------------------------------------------------

def at(hhmm: str, offset_min: int = 0, day: int = 1) -> float:
    """The UTC epoch at which a device ``offset_min`` east of UTC reads ``hhmm`` on 2026-12-``day``."""
    hours, minutes = map(int, hhmm.split(":"))
    zone = timezone(timedelta(minutes=offset_min))
    return datetime(2026, 12, day, hours, minutes, tzinfo=zone).timestamp()


def test_windows_in_device_local_time_including_one_across_midnight() -> None:
    nightly = RolloutPolicy.from_options(window="22:00-02:00").windows
    assert [in_window(nightly, at(t)) for t in ("21:59", "22:00", "23:30", "00:00", "01:59", "02:00", "12:00")] == \
        [False, True, True, True, True, False, False]
    early = RolloutPolicy.from_options(window="02:00-04:00").windows
    assert in_window(early, at("03:00", offset_min=330), utc_offset_min=330)      # 03:00 in India
    assert not in_window(early, at("03:00", offset_min=330), utc_offset_min=-300)  # 16:30 in New York
    assert in_window([], at("12:00"))
    whole_day = RolloutPolicy.from_options(window="00:00-24:00").windows
    assert all(in_window(whole_day, at(t)) for t in ("00:00", "12:00", "23:59"))


def test_the_next_window_start_for_the_status_line() -> None:
    early = RolloutPolicy.from_options(window="02:00-04:00,22:00-23:00").windows
    assert next_window_start(early, at("01:00")) == at("02:00")
    assert next_window_start(early, at("05:00")) == at("22:00")
    assert next_window_start(early, at("23:30")) == at("02:00", day=2)
    assert next_window_start(early, at("03:00")) == at("03:00")
    assert next_window_start(early, at("12:00", 60), utc_offset_min=60) == at("22:00", 60)
    assert next_window_start([], 12345.0) == 12345.0


WINDOW = st.tuples(st.integers(0, 1439), st.integers(1, 1440)).filter(lambda w: w[0] != w[1])


@settings(max_examples=300, deadline=None)
@given(windows=st.lists(WINDOW, min_size=1, max_size=3), now=st.floats(1.7e9, 1.9e9),
       offset=st.integers(-720, 840))
def test_window_arithmetic_matches_the_calendar(windows: list[tuple[int, int]], now: float, offset: int) -> None:
    local = datetime.fromtimestamp(now, timezone(timedelta(minutes=offset)))
    minute = local.hour * 60 + local.minute + (local.second + local.microsecond / 1e6) / 60
    inside = any((s <= minute < e) if s < e else (minute >= s or minute < e) for s, e in windows)
    assert in_window(windows, now, offset) == inside
    start = next_window_start(windows, now, offset)
    assert now <= start < now + 86400 and in_window(windows, start + 1e-3, offset)
    if start > now + 1:
        assert not in_window(windows, start - 0.5, offset)
        assert not in_window(windows, now + (start - now) * random.Random(int(now)).random(), offset)


# -- pacing --------------------------------------------------------------------------------------

def drive(pacer: Pacer, policy: RolloutPolicy, seconds: float, rng: random.Random, wave: int = 0,
          start: float = 1e9, persist: bool = True) -> tuple[int, Pacer]:
    """Ask the pacer at random moments (never more than a second apart) while devices wait."""
    now, ordered = start, 0
    while now < start + seconds:
        ordered += pacer.take(policy, wave, now, wanted=10**9)
        if persist:  # the engine keeps it in the rollout document between steps
            pacer = Pacer.from_dict(json.loads(json.dumps(pacer.to_dict())))
        now += rng.uniform(0.01, 1.0)
    return ordered, pacer


@settings(max_examples=25, deadline=None)
@given(per_min=st.floats(6.0, 60_000.0), seed=st.integers(0, 2**32))
def test_the_pacer_realises_the_configured_rate_over_a_long_run(per_min: float, seed: int) -> None:
    policy = RolloutPolicy.from_options(rate=f"{per_min}/min")
    seconds = max(300.0, 2000 / (per_min / 60))
    ordered, _ = drive(Pacer(), policy, seconds, random.Random(seed))
    assert ordered == pytest.approx(per_min / 60 * seconds, rel=0.01)


@settings(max_examples=50, deadline=None)
@given(per_min=st.floats(0.5, 600_000.0), idle=st.floats(1.0, 86400.0), seed=st.integers(0, 2**32))
def test_after_an_idle_stretch_the_pacer_grants_at_most_one_seconds_worth(per_min: float, idle: float,
                                                                          seed: int) -> None:
    policy = RolloutPolicy.from_options(rate=f"{per_min}/min")
    _, pacer = drive(Pacer(), policy, 5.0, random.Random(seed))
    now = 1e9 + 10.0
    pacer.take(policy, 0, now, wanted=0)  # the wave's last device went out: nothing waits
    burst = pacer.take(policy, 1, now + idle, wanted=10**9)
    assert burst <= max(1, math.floor(per_min / 60 + 1e-6))
    assert burst >= 1 or idle < 60 / per_min


def test_a_ramp_multiplies_the_rate_every_wave_and_the_rate_caps_it() -> None:
    ramp = RolloutPolicy.from_options(ramp="10,2")
    assert [rate_for_wave(ramp, i) for i in range(4)] == [10.0, 20.0, 40.0, 80.0]
    capped = RolloutPolicy.from_options(ramp="10,2", rate="30/min")
    assert [rate_for_wave(capped, i) for i in range(4)] == [10.0, 20.0, 30.0, 30.0]
    assert rate_for_wave(ramp, 10_000) == 1e9  # no overflow in a ramp's later waves
    assert rate_for_wave(RolloutPolicy(), 3) is None
    for wave in range(3):
        ordered, _ = drive(Pacer(), ramp, 600.0, random.Random(wave), wave=wave)
        assert ordered == pytest.approx(10 * 2**wave * 10, rel=0.01)


def test_an_unthrottled_pacer_grants_everything() -> None:
    pacer, policy = Pacer(), RolloutPolicy()
    assert pacer.allowance(policy, 0, 1e9) == UNLIMITED
    assert pacer.take(policy, 0, 1e9, wanted=100_000) == 100_000
    assert pacer.wait_s(policy, 0, 1e9) == 0.0


def test_the_pacer_says_how_long_to_wait_and_ignores_a_clock_stepping_back() -> None:
    policy = RolloutPolicy.from_options(rate="6/min")  # one device every 10 s
    pacer = Pacer()
    assert pacer.take(policy, 0, 1000.0, wanted=5) == 1
    assert pacer.allowance(policy, 0, 1000.0) == 0
    assert pacer.wait_s(policy, 0, 1004.0) == pytest.approx(6.0)
    assert pacer.take(policy, 0, 990.0, wanted=5) == 0  # the clock went back: no refill, no grant
    assert pacer.take(policy, 0, 1009.9, wanted=5) == 0
    assert pacer.take(policy, 0, 1010.0, wanted=5) == 1
    assert pacer.allowance(policy, 0, 1010.0) == 0  # allowance only looks


def test_a_damaged_pacer_document_is_a_validation_error() -> None:
    assert Pacer.from_dict(None) == Pacer() == Pacer.from_dict({})
    for doc in ({"tokens": "lots"}, {"updated": 5}, {"tokens": float("nan")}, {"tokens": 1, "updated": "x"}):
        with pytest.raises(ValidationError, match=r"^rollout pacer is damaged"):
            Pacer.from_dict(doc)


# -- telemetry -----------------------------------------------------------------------------------

def row(device: str, ts: Any, requests: Any, errors: int, p95: float | None, **extra: Any) -> dict[str, Any]:
    return {"device_id": device, "ts": ts, "model": "digits", "version": 2, "bundle_sha256": "b" * 64,
            "requests": requests, "errors": errors, "p50_ms": None if p95 is None else p95 / 2, "p95_ms": p95,
            "p99_ms": None if p95 is None else p95 * 2, "cpu_percent": 5.0, "memory_rss_mb": 100.0, **extra}


def test_counts_are_the_growth_of_cumulative_counters_and_p95_is_request_weighted() -> None:
    rows = [row("a", 10, 100, 1, 20.0), row("a", 40, 400, 4, 30.0), row("a", 70, 500, 4, 60.0),
            row("b", 12, 50, 0, 10.0), row("b", 42, 50, 0, 99.0)]  # b served nothing: its p95 does not count
    stats = stats_from_telemetry(rows)
    assert (stats.requests, stats.errors, stats.devices) == (400, 3, 1)
    assert stats.p95_ms is not None and stats.p95_ms == pytest.approx((30.0 * 300 + 60.0 * 100) / 400)
    assert stats.p50_ms == pytest.approx(stats.p95_ms / 2) and stats.p99_ms == pytest.approx(stats.p95_ms * 2)
    assert stats.error_rate == pytest.approx(3 / 400)
    assert stats_from_telemetry(list(reversed(rows))) == stats  # oldest first or not


def test_an_agent_restart_counts_from_zero_again() -> None:
    rows = [row("a", 10, 1000, 10, 20.0), row("a", 40, 1100, 11, 20.0),
            row("a", 70, 30, 3, 40.0),             # restarted: counters went down
            row("a", 100, 90, 3, 40.0),
            row("c", 10, 500, 0, 5.0, uptime_s=600.0),
            row("c", 40, 520, 0, 5.0, uptime_s=20.0)]  # restarted and already past the old count
    stats = stats_from_telemetry(rows)
    assert (stats.requests, stats.errors, stats.devices) == (100 + 30 + 60 + 520, 1 + 3 + 0, 2)


def test_rows_of_other_models_bundles_and_malformed_rows_are_left_out() -> None:
    rows = [row("a", 10, 100, 0, 20.0), row("a", 40, 200, 0, 20.0),
            {**row("a", 41, 0, 0, None), "model": None, "requests": None, "errors": None},  # the device-level sample
            {**row("a", 20, 999, 0, 5.0), "model": "other"}, {**row("a", 50, 5000, 0, 5.0), "model": "other"},
            {**row("a", 60, 300, 0, 20.0), "bundle_sha256": "a" * 64},
            {**row("a", 70, "many", 0, 20.0)}, {**row("a", 80, True, 0, 20.0)}, {**row("a", "late", 900, 0, 1.0)},
            {**row("a", 90, 1000, 0, float("nan"))}]
    digits = stats_from_telemetry(rows, model="digits", bundle_sha256="b" * 64)
    assert (digits.requests, digits.p95_ms) == (900, pytest.approx((20.0 * 100 + 0) / 100))
    assert stats_from_telemetry(rows, model="other").requests == 4001
    assert stats_from_telemetry([]) == Stats()
    assert Stats().error_rate is None


def test_stats_from_what_the_agent_really_sends() -> None:
    metrics = MetricsRegistry()
    rows = []

    def send(ts: float) -> None:
        message = sample("pi-1", metrics.snapshot(), {"agent": "0.1.0"})
        for name, figures in message["models"].items():
            rows.append({"device_id": message["device_id"], "ts": ts, "model": name, **figures})

    for _ in range(40):
        metrics.observe("digits", 2.0, ok=True)
    send(100.0)
    for i in range(60):
        metrics.observe("digits", 8.0, ok=i % 20 != 0)
    send(130.0)
    metrics = MetricsRegistry()  # the agent restarted
    for _ in range(10):
        metrics.observe("digits", 3.0, ok=False)
    send(160.0)
    stats = stats_from_telemetry(rows, model="digits")
    assert (stats.requests, stats.errors) == (70, 13)
    assert stats.p95_ms == pytest.approx((8.0 * 60 + 3.0 * 10) / 70)


# -- gates ---------------------------------------------------------------------------------------

BEFORE = Stats(requests=2000, errors=2, p50_ms=12.0, p95_ms=30.1, p99_ms=45.0, devices=5)


def test_a_relative_latency_gate_fails_with_the_figures_in_one_sentence() -> None:
    gate = Gate.parse("p95<=1.2x,errors<=1%")
    result = gate.evaluate(BEFORE, Stats(requests=1000, errors=3, p95_ms=41.2, devices=5))
    assert not result.passed and not result.insufficient
    assert result.reason == "p95 41.2 ms vs 30.1 ms before (1.37x > 1.2x)"
    assert result.figures["p95_ms"] == 41.2 and result.figures["baseline_p95_ms"] == 30.1
    assert result.figures["p95_ratio"] == pytest.approx(1.3688, abs=1e-4)
    assert result.figures["error_rate"] == 0.003 and result.figures["requests"] == 1000


def test_a_gate_passes_within_its_bounds_and_says_so() -> None:
    result = Gate.parse("p95<=1.2x,errors<=1%").evaluate(BEFORE, Stats(requests=1000, errors=3, p95_ms=31.0))
    assert result.passed
    assert result.reason == "p95 31.0 ms vs 30.1 ms before (1.03x <= 1.2x); errors 0.30% (<= 1%)"


def test_absolute_and_relative_error_bounds() -> None:
    current = Stats(requests=1000, errors=6, p50_ms=10.0, p95_ms=48.0, p99_ms=70.0)
    result = Gate.parse("p95<=50ms,p99<=0.06s,errors<=0.5%").evaluate(Stats(), current)
    assert not result.passed
    assert result.reason == "p99 70.0 ms (> 60 ms); errors 0.60% (> 0.5%)"
    assert Gate.parse("errors<=2x").evaluate(BEFORE, Stats(requests=1000, errors=2)).passed
    worse = Gate.parse("errors<=2x").evaluate(BEFORE, Stats(requests=1000, errors=3))
    assert worse.reason == "errors 0.30% vs 0.10% before (3.00x > 2x)" and not worse.passed
    clean = Stats(requests=1000, errors=0)
    assert Gate.parse("errors<=2x").evaluate(clean, clean).passed
    fresh = Gate.parse("errors<=2x").evaluate(clean, Stats(requests=1000, errors=1))
    assert fresh.reason == "errors 0.10% vs 0.00% before (> 2x)" and fresh.figures["errors_ratio"] is None


def test_a_gate_without_telemetry_does_not_pass() -> None:
    gate = Gate.parse("p95<=1.2x,errors<=1%")
    silent = gate.evaluate(BEFORE, Stats())
    assert (silent.passed, silent.insufficient) == (False, True)
    assert silent.reason == "not enough telemetry: the updated devices served no requests in the bake time"
    unknown = gate.evaluate(Stats(), Stats(requests=100, errors=0, p95_ms=20.0))
    assert (unknown.passed, unknown.insufficient) == (False, True)
    assert unknown.reason == "not enough telemetry: no p95 figures before the update to judge p95<=1.2x"
    assert Gate.parse("p95<=50ms").evaluate(Stats(), Stats(requests=100, errors=0, p95_ms=20.0)).passed
