"""Rollout policies: how fast, when, and on what evidence a rollout may move on. Pure: no I/O.

A :class:`RolloutPolicy` is parsed once from the ``fleet deploy``/``fleet rollout`` option strings
(:meth:`RolloutPolicy.from_options`; every bad value is a :class:`UsageError` naming its option) and
persisted as JSON in the rollout document. The engine asks it, step by step:

* **waves**: :func:`split_waves` -- the canary devices, then waves of N devices or P% of all;
* **pace**: a :class:`Pacer` (a token bucket kept as JSON beside the rollout) grants devices at
  ``--rate`` or, with ``--ramp BASE,FACTOR``, at ``BASE * FACTOR**wave`` devices per minute (``--rate``
  then caps the ramp). After an idle stretch it grants at most one second's worth (at least one
  device); while devices wait, it keeps the fractional remainder, so a caller that asks at least once a
  second gets the configured rate exactly over a long run;
* **when**: ``--start`` (an instant) and ``--window HH:MM-HH:MM`` (in each device's local time; a window
  may wrap midnight, ``22:00-02:00``): :func:`in_window`, :func:`next_window_start`;
* **abort**: :func:`too_many_failures` -- the failure share above ``--max-failures``, judged once
  ``--min-sample`` devices finished;
* **gate**: :class:`Gate` -- after the bake time, the updated devices' latency percentile and error rate
  (:func:`stats_from_telemetry`) against their figures on the previous version, or absolute bounds.
  A gate with no requests to judge does **not** pass: :class:`GateResult` has ``passed=False``,
  ``insufficient=True`` and "not enough telemetry ..." as its reason (fail closed; the engine may keep
  baking until ``--wave-timeout`` before it acts on that, since a device may simply have had no traffic).

Telemetry rows carry each model's ``requests``/``errors`` counters since the agent started
(``edge_agent.metrics``) and the p50/p95/p99 of the agent's last 4096 requests. A window's figures are
therefore differences between consecutive samples of one device (a counter that goes down, or an
``uptime_s`` that does, is an agent restart: the new value counts from zero), and its p95 is the
request-weighted mean of the samples' p95. The first sample of each device is only the reference point,
so a window needs two samples per device (bake at least two telemetry periods).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from typing import Any

from edge_agent.errors import UsageError, ValidationError, brief

__all__ = [
    "UNLIMITED",
    "Bound",
    "Gate",
    "GateResult",
    "Pacer",
    "RolloutPolicy",
    "Stats",
    "in_window",
    "next_window_start",
    "parse_fraction",
    "parse_wave",
    "rate_for_wave",
    "split_waves",
    "stats_from_telemetry",
    "too_many_failures",
]

UNLIMITED = sys.maxsize  # what an unthrottled Pacer grants: any slice of the pending devices
_DAY_S = 86400
_MAX_RATE_PER_MIN = 1e9  # a ramp's later waves: beyond this, pacing no longer matters
_MAX_OPTION_CHARS = 1000
_OPTIONS = ("canary", "wave", "rate", "ramp", "bake", "start", "window", "max_failures", "min_sample", "gate",
            "wave_timeout")


def _fail(option: str, message: str) -> UsageError:
    return UsageError(f"{option}: {message}")


def _quoted(text: object) -> str:
    return repr(brief(text, 80))


def _number(text: str) -> float | None:
    """A finite float, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# -- waves and thresholds ------------------------------------------------------------------------

def parse_fraction(text: str | float, option: str = "--max-failures") -> float:
    """``"10%"`` -> 0.1; a bare number is a percentage too (``"10"`` -> 0.1)."""
    value = _number(str(text).strip().removesuffix("%"))
    if value is None:
        raise _fail(option, f"bad percentage {_quoted(text)} (write e.g. 10%)")
    if not 0.0 <= value <= 100.0:
        raise _fail(option, f"{_quoted(text)} is not between 0% and 100%")
    return value / 100.0


def parse_wave(text: str | int, option: str = "--wave") -> tuple[str, float]:
    """``"25%"`` -> ("percent", 0.25); ``"5"`` -> ("count", 5)."""
    raw = str(text).strip()
    if raw.endswith("%"):
        value = parse_fraction(raw, option)
        if value <= 0:
            raise _fail(option, "must be above 0%")
        return "percent", value
    try:
        count = int(raw)
    except ValueError:
        raise _fail(option, f"bad wave size {_quoted(text)} (write a device count, 5, or a percentage, 25%)") from None
    if count < 1:
        raise _fail(option, "must be at least 1 device")
    return "count", float(count)


def split_waves(device_ids: Iterable[str], canary: int, wave: str | int) -> list[list[str]]:
    """The canary wave (``canary`` devices, if any) then waves of a count or a percent of all devices.

    Every device is in exactly one wave (duplicates are dropped); the order is the sorted ids.
    """
    if canary < 0:
        raise _fail("--canary", "must be 0 or more")
    ids = sorted(set(device_ids))
    kind, value = parse_wave(wave)
    size = int(value) if kind == "count" else max(1, math.ceil(value * len(ids)))
    waves = [ids[:canary]] if canary and ids else []
    rest = ids[canary:]
    waves += [rest[i:i + size] for i in range(0, len(rest), size)]
    return waves


def too_many_failures(failed: int, succeeded: int, max_failures: float, min_sample: int,
                      targeted: int | None = None) -> bool:
    """True when the failure share of finished devices is above ``max_failures``.

    Judged only once ``min_sample`` devices finished (or all ``targeted`` ones, when fewer are targeted).
    """
    done = failed + succeeded
    needed = max(1, min_sample if targeted is None else min(min_sample, targeted))
    return failed > 0 and done >= needed and failed > max_failures * done + 1e-9


# -- option parsers ------------------------------------------------------------------------------

_RATE_UNITS = {"s": 60.0, "sec": 60.0, "second": 60.0, "min": 1.0, "m": 1.0, "minute": 1.0,
               "h": 1 / 60, "hr": 1 / 60, "hour": 1 / 60}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def _parse_rate(text: str, option: str = "--rate") -> float:
    """``"100/min"``, ``"5/s"``, ``"600/h"`` -> devices per minute."""
    count, slash, unit = text.strip().partition("/")
    value = _number(count)
    factor = _RATE_UNITS.get(unit.strip().lower())
    if not slash or value is None or factor is None:
        raise _fail(option, f"bad rate {_quoted(text)} (write N/min, N/s or N/h, e.g. 100/min)")
    if value <= 0:
        raise _fail(option, f"{_quoted(text)} must be above 0")
    return value * factor


def _parse_ramp(text: str) -> tuple[float, float]:
    """``"10,2"`` (BASE devices/min, FACTOR) -> (10.0, 2.0); the base may carry a unit (``10/min``)."""
    base_text, comma, factor_text = text.partition(",")
    if not comma:
        raise _fail("--ramp", f"bad ramp {_quoted(text)} (write BASE,FACTOR, e.g. 10,2: 10 devices/min, "
                              "doubled every wave)")
    base = _parse_rate(base_text, "--ramp") if "/" in base_text else _number(base_text)
    factor = _number(factor_text)
    if base is None or factor is None:
        raise _fail("--ramp", f"bad ramp {_quoted(text)} (write BASE,FACTOR, e.g. 10,2)")
    if base <= 0:
        raise _fail("--ramp", f"the base rate in {_quoted(text)} must be above 0")
    if factor < 1:
        raise _fail("--ramp", f"the factor in {_quoted(text)} must be at least 1")
    return base, factor


def _parse_duration(text: str, option: str, positive: bool = False) -> float:
    """``"60"``/``"60s"``, ``"5m"``, ``"1h"`` -> seconds."""
    raw = text.strip().lower()
    digits = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    value, unit = _number(digits), _DURATION_UNITS.get(raw[len(digits):].strip())
    if value is None or unit is None:
        raise _fail(option, f"bad duration {_quoted(text)} (write seconds, e.g. 60, or 5m, 1h)")
    if value < 0 or (positive and value == 0):
        raise _fail(option, f"{_quoted(text)} must be {'above' if positive else 'at least'} 0")
    return value * unit


def _parse_count(text: str, option: str, minimum: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise _fail(option, f"bad number {_quoted(text)} (write a whole number)") from None
    if value < minimum:
        raise _fail(option, f"must be at least {minimum}")
    return value


def _parse_start(text: str) -> float:
    """ISO 8601 with ``Z`` or an offset -> epoch seconds."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise _fail("--start", f"bad time {_quoted(text)} (write ISO 8601 with a zone, "
                               "e.g. 2026-12-01T02:00:00Z)") from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise _fail("--start", f"{_quoted(text)} has no time zone (end it with Z or an offset such as +01:00)")
    return moment.timestamp()


def _parse_clock(text: str, end: bool) -> int:
    """``"02:00"`` -> 120 (minutes of the day); ``"24:00"`` only as a window's end."""
    hours, colon, minutes = text.strip().partition(":")
    ok = colon and hours.isdigit() and len(hours) <= 2 and minutes.isdigit() and len(minutes) == 2
    value = int(hours) * 60 + int(minutes) if ok else -1
    if not ok or int(minutes) > 59 or not 0 <= value <= (1440 if end else 1439):
        raise _fail("--window", f"bad time {_quoted(text.strip())} (write HH:MM-HH:MM)")
    return value


def _parse_windows(text: str) -> list[tuple[int, int]]:
    """``"02:00-04:00,22:00-23:30"`` -> [(120, 240), (1320, 1410)]."""
    windows = []
    for part in text.split(","):
        start, dash, end = part.partition("-")
        if not dash:
            raise _fail("--window", f"bad window {_quoted(part.strip())} (write HH:MM-HH:MM, e.g. 02:00-04:00)")
        window = (_parse_clock(start, end=False), _parse_clock(end, end=True))
        if window[0] == window[1]:
            raise _fail("--window", f"{_quoted(part.strip())} is empty (write 00:00-24:00 for the whole day)")
        windows.append(window)
    return windows


# -- windows -------------------------------------------------------------------------------------

def _local_second(now_utc: float, utc_offset_min: int) -> float:
    return (now_utc + utc_offset_min * 60) % _DAY_S


def _inside(start_min: int, end_min: int, second: float) -> bool:
    start, end = start_min * 60, end_min * 60
    if start < end:
        return start <= second < end
    return second >= start or second < end  # wraps midnight: 22:00-02:00


def in_window(windows: Iterable[tuple[int, int]], now_utc: float, utc_offset_min: int = 0) -> bool:
    """True when ``now_utc`` falls in one of ``windows`` in the device's local time; no windows: always."""
    windows = list(windows)
    second = _local_second(now_utc, utc_offset_min)
    return not windows or any(_inside(start, end, second) for start, end in windows)


def next_window_start(windows: Iterable[tuple[int, int]], now_utc: float, utc_offset_min: int = 0) -> float:
    """The first instant at or after ``now_utc`` inside a window (``now_utc`` itself when inside one)."""
    windows = list(windows)
    if in_window(windows, now_utc, utc_offset_min):
        return now_utc
    second = _local_second(now_utc, utc_offset_min)
    return now_utc + min((start * 60 - second) % _DAY_S for start, _ in windows)


# -- the policy ----------------------------------------------------------------------------------

@dataclass
class RolloutPolicy:
    """Everything that paces and gates one rollout; JSON through :meth:`to_dict`/:meth:`from_dict`."""

    canary: int = 1
    wave: str = "25%"  # N devices or P%
    rate_per_min: float | None = None
    ramp: tuple[float, float] | None = None  # wave i goes at BASE * FACTOR**i devices/min
    bake_s: float = 0.0
    start: float | None = None  # epoch seconds
    windows: list[tuple[int, int]] = field(default_factory=list)  # minutes of the day, device local time
    max_failures: float = 0.1
    min_sample: int = 1
    gate: Gate | None = None
    wave_timeout_s: float = 300.0

    @classmethod
    def from_options(cls, **options: Any) -> RolloutPolicy:
        """The policy from CLI option strings (``rate="100/min"``, ``max_failures="10%"``, ...).

        ``None`` leaves an option at its default; ``max-failures`` and ``max_failures`` are one option.
        Each bad value is a UsageError naming its option.
        """
        values: dict[str, str] = {}
        for name, value in options.items():
            key = name.strip().lstrip("-").replace("-", "_")
            if key not in _OPTIONS:
                known = ", ".join("--" + o.replace("_", "-") for o in _OPTIONS)
                raise UsageError(f"unknown rollout option --{brief(name.lstrip('-'), 80)} (options: {known})")
            if value is not None:
                values[key] = _option_text("--" + key.replace("_", "-"), value)
        policy = cls()
        if "canary" in values:
            policy.canary = _parse_count(values["canary"], "--canary", 0)
        if "wave" in values:
            parse_wave(values["wave"])
            policy.wave = values["wave"].strip()
        if "rate" in values:
            policy.rate_per_min = _parse_rate(values["rate"])
        if "ramp" in values:
            policy.ramp = _parse_ramp(values["ramp"])
        if "bake" in values:
            policy.bake_s = _parse_duration(values["bake"], "--bake")
        if "start" in values:
            policy.start = _parse_start(values["start"])
        if "window" in values:
            policy.windows = _parse_windows(values["window"])
        if "max_failures" in values:
            policy.max_failures = parse_fraction(values["max_failures"], "--max-failures")
        if "min_sample" in values:
            policy.min_sample = _parse_count(values["min_sample"], "--min-sample", 1)
        if "gate" in values:
            policy.gate = Gate.parse(values["gate"])
        if "wave_timeout" in values:
            policy.wave_timeout_s = _parse_duration(values["wave_timeout"], "--wave-timeout", positive=True)
        return policy

    def to_dict(self) -> dict[str, Any]:
        """JSON form (what the rollout document keeps)."""
        return {"canary": self.canary, "wave": self.wave, "rate_per_min": self.rate_per_min,
                "ramp": list(self.ramp) if self.ramp else None, "bake_s": self.bake_s, "start": self.start,
                "windows": [list(w) for w in self.windows], "max_failures": self.max_failures,
                "min_sample": self.min_sample, "gate": self.gate.text if self.gate else None,
                "wave_timeout_s": self.wave_timeout_s}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> RolloutPolicy:
        """Inverse of :meth:`to_dict`; a damaged document is a ValidationError."""
        unknown = sorted(set(doc) - set(cls().to_dict()))
        try:
            if unknown:
                raise ValueError(f"unknown field(s) {', '.join(map(str, unknown))}")
            ramp, gate, windows = doc.get("ramp"), doc.get("gate"), doc.get("windows") or []
            policy = cls(
                canary=int(doc.get("canary", 1)), wave=str(doc.get("wave", "25%")),
                rate_per_min=_optional_float(doc.get("rate_per_min")),
                ramp=(float(ramp[0]), float(ramp[1])) if ramp else None,
                bake_s=float(doc.get("bake_s", 0.0)), start=_optional_float(doc.get("start")),
                windows=[(int(w[0]), int(w[1])) for w in windows],
                max_failures=float(doc.get("max_failures", 0.1)), min_sample=int(doc.get("min_sample", 1)),
                gate=Gate.parse(gate) if gate else None, wave_timeout_s=float(doc.get("wave_timeout_s", 300.0)))
            parse_wave(policy.wave)
        except (TypeError, ValueError, IndexError, KeyError, UsageError) as exc:
            raise ValidationError(f"rollout policy is damaged ({brief(exc, 200)}); start a new rollout") from None
        return policy


def _option_text(option: str, value: Any) -> str:
    """An option's value as the CLI would pass it; lists (a repeated ``--window``) are joined with commas."""
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _fail(option, f"expected a string, not {type(value).__name__}")
    text = str(value)
    if len(text) > _MAX_OPTION_CHARS:
        raise _fail(option, f"the value is {len(text)} characters long; at most {_MAX_OPTION_CHARS}")
    return text


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


# -- pacing --------------------------------------------------------------------------------------

def rate_for_wave(policy: RolloutPolicy, wave_index: int) -> float | None:
    """Devices per minute for wave ``wave_index`` (0 = the first, canary included); None: unthrottled."""
    rates = []
    if policy.ramp:
        base, factor = policy.ramp
        try:
            rates.append(min(base * factor ** max(wave_index, 0), _MAX_RATE_PER_MIN))
        except OverflowError:
            rates.append(_MAX_RATE_PER_MIN)
    if policy.rate_per_min:
        rates.append(policy.rate_per_min)
    return min(rates) if rates else None


@dataclass
class Pacer:
    """A token bucket of devices, persisted as plain JSON beside the rollout.

    ``tokens`` is how many devices may go now (fractional), ``updated`` when it was last refilled and
    ``backlog`` whether devices were left waiting at that point. The bucket holds one second's worth of
    the rate (at least one device) after an idle stretch, and one device more while a backlog waits, so
    the remainder between two calls is never lost.
    """

    tokens: float = 1.0
    updated: float | None = None
    backlog: bool = False

    def _level(self, per_s: float, now: float) -> float:
        capacity = max(1.0, per_s) + (1.0 if self.backlog else 0.0)
        if self.updated is None:
            return min(self.tokens, capacity)
        return min(self.tokens + max(0.0, now - self.updated) * per_s, capacity)

    def allowance(self, policy: RolloutPolicy, wave_index: int, now: float) -> int:
        """How many more devices of wave ``wave_index`` may be ordered at ``now`` (changes nothing)."""
        rate = rate_for_wave(policy, wave_index)
        return UNLIMITED if rate is None else int(self._level(rate / 60.0, now) + 1e-9)

    def take(self, policy: RolloutPolicy, wave_index: int, now: float, wanted: int) -> int:
        """Grant up to ``wanted`` devices at ``now`` and count them as ordered; returns how many.

        Call it whenever devices of the current wave wait to be ordered (at least once a second
        while they do, for the rate to hold), with ``wanted`` the number waiting.
        """
        granted = min(max(0, wanted), self.allowance(policy, wave_index, now))
        rate = rate_for_wave(policy, wave_index)
        if rate is not None:
            self.tokens = self._level(rate / 60.0, now) - granted
        self.updated = now if self.updated is None else max(self.updated, now)  # a clock step back: no refill
        self.backlog = rate is not None and granted < wanted
        return granted

    def wait_s(self, policy: RolloutPolicy, wave_index: int, now: float) -> float:
        """Seconds until the next device may be ordered (0: now)."""
        rate = rate_for_wave(policy, wave_index)
        if rate is None:
            return 0.0
        return max(0.0, (1.0 - self._level(rate / 60.0, now)) / (rate / 60.0))

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"tokens": self.tokens, "updated": self.updated, "backlog": self.backlog}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> Pacer:
        """Inverse of :meth:`to_dict`; None or ``{}`` is a fresh bucket."""
        if not doc:
            return cls()
        try:
            pacer = cls(float(doc["tokens"]), _optional_float(doc.get("updated")), bool(doc.get("backlog", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationError(f"rollout pacer is damaged ({brief(exc, 200)})") from None
        if not math.isfinite(pacer.tokens) or (pacer.updated is not None and not math.isfinite(pacer.updated)):
            raise ValidationError("rollout pacer is damaged (not a finite number)")
        return pacer


# -- telemetry and gates -------------------------------------------------------------------------

_METRICS = ("p50", "p95", "p99", "errors")


@dataclass(frozen=True)
class Stats:
    """Request-weighted figures of a set of devices over a time window."""

    requests: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    devices: int = 0  # devices that served requests in the window

    @property
    def error_rate(self) -> float | None:
        """Errors per request; None without requests."""
        return self.errors / self.requests if self.requests else None

    def value(self, metric: str) -> float | None:
        """``p50``/``p95``/``p99`` in ms, ``errors`` as a share of requests."""
        return self.error_rate if metric == "errors" else getattr(self, f"{metric}_ms")

    def to_dict(self) -> dict[str, Any]:
        """JSON form (event figures)."""
        return {"requests": self.requests, "errors": self.errors, "error_rate": self.error_rate,
                "p50_ms": self.p50_ms, "p95_ms": self.p95_ms, "p99_ms": self.p99_ms, "devices": self.devices}


def _counter(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return int(value)


def _latency(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


def _restarted(previous: Mapping[str, Any], row: Mapping[str, Any], requests: int, errors: int) -> bool:
    if requests < (_counter(previous.get("requests")) or 0) or errors < (_counter(previous.get("errors")) or 0):
        return True
    before, now = _latency(previous.get("uptime_s")), _latency(row.get("uptime_s"))
    return before is not None and now is not None and now < before


def stats_from_telemetry(rows: Iterable[Mapping[str, Any]], *, model: str | None = None,
                         bundle_sha256: str | None = None) -> Stats:
    """The figures of store telemetry rows (``device_id``, ``ts``, ``model``, ``requests``, ``errors``, ...).

    Rows without request counters (device-level samples) and malformed values are skipped; ``model``
    and ``bundle_sha256`` keep only that model's or that bundle's samples. Counts are the growth of each
    device's counters between consecutive samples (an agent restart counts from zero again); the
    percentiles are the samples' values weighted by the requests each one adds.
    """
    series: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        if (model is not None and row.get("model") != model) or \
                (bundle_sha256 is not None and row.get("bundle_sha256") != bundle_sha256):
            continue
        ts = _latency(row.get("ts"))
        if ts is None or _counter(row.get("requests")) is None or _counter(row.get("errors")) is None:
            continue
        series.setdefault((str(row.get("device_id")), str(row.get("model"))), []).append(row)
    requests = errors = 0
    weighted = {"p50": [0.0, 0], "p95": [0.0, 0], "p99": [0.0, 0]}
    devices = set()
    for (device_id, _), samples in series.items():
        samples.sort(key=lambda r: float(r["ts"]))
        for previous, row in pairwise(samples):
            now_requests, now_errors = int(row["requests"]), int(row["errors"])
            if _restarted(previous, row, now_requests, now_errors):
                added, failed = now_requests, now_errors
            else:
                added, failed = now_requests - int(previous["requests"]), now_errors - int(previous["errors"])
            if added <= 0:
                continue
            requests += added
            errors += min(max(failed, 0), added)
            devices.add(device_id)
            for metric, sums in weighted.items():
                value = _latency(row.get(f"{metric}_ms"))
                if value is not None:
                    sums[0] += value * added
                    sums[1] += added

    def mean(metric: str) -> float | None:
        total, weight = weighted[metric]
        return total / weight if weight else None

    return Stats(requests, errors, mean("p50"), mean("p95"), mean("p99"), len(devices))


@dataclass(frozen=True)
class Bound:
    """One clause of a gate: ``p95<=1.2x`` (relative to the baseline), ``p95<=50ms``, ``errors<=1%``."""

    metric: str  # p50, p95, p99, errors
    limit: float  # a factor when relative, else ms (latency) or a share (errors)
    relative: bool
    text: str

    def describe_limit(self) -> str:
        if self.relative:
            return f"{self.limit:g}x"
        return f"{self.limit * 100:g}%" if self.metric == "errors" else f"{self.limit:g} ms"


@dataclass(frozen=True)
class GateResult:
    """A gate's verdict: ``passed``, the ``figures`` it judged and a one-line ``reason``."""

    passed: bool
    figures: dict[str, Any]
    reason: str
    insufficient: bool = False  # no telemetry to judge: passed is False


def _shown(metric: str, value: float) -> str:
    return f"{value * 100:.2f}%" if metric == "errors" else f"{value:.1f} ms"


@dataclass(frozen=True)
class Gate:
    """Bounds on the updated devices' telemetry: ``p95<=1.2x,errors<=1%``."""

    bounds: tuple[Bound, ...]
    text: str

    @classmethod
    def parse(cls, text: str, option: str = "--gate") -> Gate:
        """Parse ``METRIC<=LIMIT[,...]``: p50/p95/p99 with ``1.2x`` or ``50ms``, errors with ``1%`` or ``2x``."""
        text = str(text).strip()
        if not text:
            raise _fail(option, "empty gate (write e.g. p95<=1.2x,errors<=1%)")
        if len(text) > _MAX_OPTION_CHARS:
            raise _fail(option, f"the gate is {len(text)} characters long; at most {_MAX_OPTION_CHARS}")
        return cls(tuple(_parse_bound(part.strip(), option) for part in text.split(",")), text)

    def evaluate(self, baseline: Stats, current: Stats) -> GateResult:
        """Judge ``current`` (the updated devices over the bake time) against ``baseline`` (before)."""
        figures: dict[str, Any] = {"requests": current.requests, "errors": current.errors,
                                   "devices": current.devices, "baseline_requests": baseline.requests,
                                   "baseline_errors": baseline.errors, "baseline_devices": baseline.devices}
        if not current.requests:
            return GateResult(False, figures, "not enough telemetry: the updated devices served no requests "
                                              "in the bake time", insufficient=True)
        verdicts: list[tuple[bool, str]] = []
        for bound in self.bounds:
            key = "error_rate" if bound.metric == "errors" else f"{bound.metric}_ms"
            now, before = current.value(bound.metric), baseline.value(bound.metric)
            figures[key], figures[f"baseline_{key}"] = now, before
            if now is None or (bound.relative and before is None):
                when = "in the bake time" if now is None else "before the update"
                return GateResult(False, figures, f"not enough telemetry: no {bound.metric} figures {when} "
                                                  f"to judge {bound.text}", insufficient=True)
            verdicts.append(_judge(bound, now, before, figures))
        failed = [line for ok, line in verdicts if not ok]
        return GateResult(not failed, figures, "; ".join(failed or [line for _, line in verdicts]))


def _judge(bound: Bound, now: float, before: float | None, figures: dict[str, Any]) -> tuple[bool, str]:
    """One bound's verdict and its sentence: ``p95 41.2 ms vs 30.1 ms before (1.37x > 1.2x)``."""
    name = bound.metric
    if not bound.relative:
        ok = now <= bound.limit + 1e-12
        return ok, f"{name} {_shown(name, now)} ({'<=' if ok else '>'} {bound.describe_limit()})"
    assert before is not None
    ok = now <= bound.limit * before + 1e-12
    ratio = now / before if before else (1.0 if now == 0 else None)
    figures[f"{name}_ratio"] = None if ratio is None else round(ratio, 4)
    shown_ratio = "" if ratio is None else f"{ratio:.2f}x "
    return ok, (f"{name} {_shown(name, now)} vs {_shown(name, before)} before "
                f"({shown_ratio}{'<=' if ok else '>'} {bound.describe_limit()})")


def _parse_bound(part: str, option: str) -> Bound:
    metric, sign, limit = part.partition("<=")
    metric, limit = metric.strip().lower(), limit.strip().lower()
    if not sign or not metric or not limit:
        raise _fail(option, f"bad bound {_quoted(part)} (write e.g. p95<=1.2x,errors<=1%)")
    if metric not in _METRICS:
        raise _fail(option, f"unknown metric {_quoted(metric)} in {_quoted(part)} (metrics: {', '.join(_METRICS)})")
    if limit.endswith("x"):
        value, relative = _number(limit[:-1]), True
    elif metric == "errors":
        value, relative = (_number(limit[:-1]) if limit.endswith("%") else None), False
        value = None if value is None or not 0 <= value <= 100 else value / 100
    else:
        unit = 1000.0 if limit.endswith("s") and not limit.endswith("ms") else 1.0
        number = _number(limit.removesuffix("ms").removesuffix("s"))
        value, relative = (number * unit if number is not None and limit.endswith("s") else None), False
    if value is None or value < 0 or (relative and value == 0):
        form = "a share like 1% or a factor like 2x" if metric == "errors" else \
            "a factor like 1.2x or a time like 50ms"
        raise _fail(option, f"bad limit {_quoted(limit)} in {_quoted(part)} (write {form})")
    return Bound(metric, value, relative, part)
