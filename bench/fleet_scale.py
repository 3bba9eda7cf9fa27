"""Control-plane scale bench: a real controller against 1,000 to 100,000 simulated devices.

For each size N (``--sizes``, or ``$FLEET_SCALE_SIZES`` under ``make bench``; default 1,000,
10,000, 50,000 and 100,000): a private Mosquitto (retained messages in memory, no per-client
queue limit), N devices of :mod:`bench.fleet_sim` in this process (one shared connection), and
a real ``edgedeploy controller`` on a fresh SQLite store, driven through the documented command
line with ``EDGEDEPLOY_CONTROLLER`` set. Phases, in order:

1. ``register_s``: from the controller's start until its API lists all N devices online;
2. ``rollout_s``: ``fleet rollout v1 --to all --canary 1 --wave 25% --wait``; ``succeeded`` must be N;
3. ``converge_s``: ``fleet deploy scale v2 --target '*'`` until every simulated device runs v2
   (counted by the devices themselves); ``applied`` is what ``fleet deployments`` then says;
4. at ``--pace-size`` devices (default 10,000): ``fleet deploy scale v3 --rate R/min``; the
   orders the devices received in ``--pace-window`` seconds after the first, per minute, against R;
5. telemetry every ``--telemetry-period`` seconds from each device for ``--telemetry-window``
   seconds: the store's growth (SQLite pages in use, read beside the controller) per sample, and
   per device per day at the agent's default period (30 s).

The controller's peak RSS and its CPU seconds in each phase come from psutil on its pid. The
targets of issue #11 are printed beside the figures, and a missed one is reported as missed.
Without ``edgedeploy controller`` only phase 2 runs, against the direct rollout (the CLI on the
broker), and the result says so. Results: ``bench/results/fleet_scale.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.common import print_table, write_results
from bench.fleet_sim import FleetSimulator

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
NOWHERE = "http://127.0.0.1:1"  # simulated devices download nothing
AGENT_TELEMETRY_S = 30.0  # edge-agent's default telemetry_period_s
# issue #11's targets
CONVERGE_TARGET_S = {10_000: 15.0, 100_000: 180.0}
PACE_TOLERANCE = 0.05
RSS_TARGET_MB = {100_000: 1024.0}
BROKER_SETTINGS = "max_queued_messages 0\nmax_inflight_messages 0\n"


@dataclass
class Settings:
    """What the command line (or the environment, under ``make bench``) asked for."""

    sizes: list[int]
    pace_size: int = 10_000
    rate_per_min: float = 1000.0
    pace_window_s: float = 180.0
    telemetry_period_s: float = 10.0
    telemetry_window_s: float = 60.0
    time_to_active: float = 0.0
    timeout_s: float = 900.0


class Watch(threading.Thread):
    """Samples a process's RSS twice a second; ``phase()`` measures its CPU seconds over a block."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak_rss_mb = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.5):
            with contextlib.suppress(psutil.Error):
                self.peak_rss_mb = max(self.peak_rss_mb, self.process.memory_info().rss / 2**20)

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the process used so far."""
        times = self.process.cpu_times()
        return float(times.user + times.system)

    @contextlib.contextmanager
    def phase(self, row: dict[str, Any], name: str) -> Iterator[None]:
        """Record ``{name}_cpu_s`` in ``row`` for the block."""
        before = self.cpu_s()
        try:
            yield
        finally:
            with contextlib.suppress(psutil.Error):
                row[f"{name}_cpu_s"] = round(self.cpu_s() - before, 1)

    def stop(self) -> None:
        self._done.set()


def _edgedeploy(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "packager.cli.main", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def _checked(result: subprocess.CompletedProcess[str]) -> str:
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit {result.returncode}"]
        raise RuntimeError(lines[-1])
    return result.stdout


def has_controller() -> bool:
    """True when this checkout has ``edgedeploy controller``."""
    return _edgedeploy("controller", "--help", env=os.environ.copy(), timeout=60).returncode == 0


def _store_bytes(path: Path) -> int:
    """Bytes of SQLite pages in use, committed WAL frames included (read beside the running controller)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
        pages, size, free = (db.execute(f"PRAGMA {p}").fetchone()[0]
                             for p in ("page_count", "page_size", "freelist_count"))
    return int((pages - free) * size)


class Bench:
    """One size: broker, simulator, controller; each phase adds figures to ``row``."""

    def __init__(self, n: int, settings: Settings, work: Path, bundles: dict[int, Path], controller: bool) -> None:
        self.n, self.settings, self.work, self.bundles, self.controller = n, settings, work, bundles, controller
        self.row: dict[str, Any] = {"devices": n, "mode": "controller" if controller else "direct"}
        self.env = {k: v for k, v in os.environ.items() if k != "EDGEDEPLOY_CONTROLLER"}
        self.store = work / f"store-{n}.db"
        self.proc: subprocess.Popen[bytes] | None = None
        self.watch: Watch | None = None
        self.sim: FleetSimulator | None = None
        self.api = ""

    def run(self) -> dict[str, Any]:
        from tests.e2e.conftest import Broker, stop_process

        folder = self.work / f"broker-{self.n}"
        folder.mkdir()
        broker = Broker(folder, settings=BROKER_SETTINGS, persistent=False)
        broker.start()
        self.env["EDGEDEPLOY_BROKER"] = broker.url
        try:
            started = time.monotonic()
            self.sim = FleetSimulator("127.0.0.1", broker.port, self.n, telemetry_period_s=None,
                                      time_to_active=self.settings.time_to_active).start(self.settings.timeout_s)
            self.row["sim_start_s"] = round(time.monotonic() - started, 1)
            self._phases()
        except Exception as exc:  # noqa: BLE001 - a size that fails is a result to report, not a crash
            self.row["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            if self.proc is not None:
                stop_process(self.proc)
            if self.watch is not None:
                self.watch.stop()
                self.row["ctl_rss_peak_mb"] = round(self.watch.peak_rss_mb, 1)
            if self.sim is not None:
                self.sim.stop()
            broker.stop()
        return self.row

    def _phases(self) -> None:
        if not self.controller:
            self._rollout()
            return
        self._start_controller()
        self._rollout()
        self._converge()
        if self.n == self.settings.pace_size:
            self._paced()
        self._telemetry()

    # --- phases --------------------------------------------------------------------------------
    def _start_controller(self) -> None:
        from packager.targets.base import free_port

        port = free_port()
        self.api = f"http://127.0.0.1:{port}/api/v1"
        self.env["EDGEDEPLOY_CONTROLLER"] = f"http://127.0.0.1:{port}"
        log = open(self.work / f"controller-{self.n}.log", "wb")  # noqa: SIM115 - the child writes it until stopped
        started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "packager.cli.main", "controller", "--store",
                                      f"sqlite:///{self.store}", "--broker", self.env["EDGEDEPLOY_BROKER"],
                                      "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=ROOT)
        log.close()
        self.watch = Watch(self.proc.pid)
        self.watch.start()
        with self.watch.phase(self.row, "register"):
            self._until(lambda: self._online() >= self.n, "the controller listing every device online")
        self.row["register_s"] = round(time.monotonic() - started, 1)

    def _rollout(self) -> None:
        assert self.sim is not None
        started = time.monotonic()
        with self._phase("rollout"):
            result = _edgedeploy("fleet", "rollout", str(self.bundles[1]), "--to", "all", "--server", NOWHERE,
                                 "--canary", "1", "--wave", "25%", "--wait", "--json", env=self.env,
                                 timeout=self.settings.timeout_s)
        self.row["rollout_s"] = round(time.monotonic() - started, 1)
        status = json.loads(result.stdout) if result.stdout.strip() else {}
        self.row["rollout_state"] = status.get("state") or (result.stderr.strip().splitlines() or ["?"])[-1]
        self.row["rollout_succeeded"] = status.get("succeeded")

    def _converge(self) -> None:
        assert self.sim is not None
        sha = _sha(self.bundles[2])
        started = time.monotonic()
        with self._phase("converge"):
            _checked(_edgedeploy("fleet", "deploy", "scale", str(self.bundles[2]), "--target", "*", "--server",
                                 NOWHERE, env=self.env, timeout=120))
            done = self.sim.wait_for(lambda: self.sim is not None and self.sim.fleet.active[sha] >= self.n,
                                     self.settings.timeout_s)
        self.row["converge_s"] = round(time.monotonic() - started, 1) if done else None
        self.row["converged"] = self.sim.active_count(sha)
        self._until(lambda: self._deployment("scale").get("applied", 0) >= self.row["converged"],
                    "fleet deployments counting every applied device", timeout=120, fail=False)
        self.row["applied"] = self._deployment("scale").get("applied")

    def _paced(self) -> None:
        assert self.sim is not None
        rate, window = self.settings.rate_per_min, self.settings.pace_window_s
        sha = _sha(self.bundles[3])
        with self._phase("paced"):
            _checked(_edgedeploy("fleet", "deploy", "scale", str(self.bundles[3]), "--target", "*", "--server",
                                 NOWHERE, "--rate", f"{rate:g}/min", env=self.env, timeout=120))
            self._until(lambda: bool(self.sim and self.sim.order_times(sha)), "the first paced order", timeout=120)
            first = self.sim.order_times(sha)[0]
            time.sleep(max(0.0, first + window - time.time()))  # the measurement window itself
        times = self.sim.order_times(sha)
        achieved = sum(1 for t in times if first < t <= first + window) / window * 60.0
        self.row.update(rate_per_min=rate, achieved_per_min=round(achieved, 1), pace_ratio=round(achieved / rate, 3))

    def _telemetry(self) -> None:
        assert self.sim is not None
        period, window = self.settings.telemetry_period_s, self.settings.telemetry_window_s
        before, sent = _store_bytes(self.store), self.sim.telemetry_sent
        with self._phase("telemetry"):
            self.sim.set_telemetry(period)
            time.sleep(window)  # the measurement window itself
            self.sim.set_telemetry(None)
            time.sleep(3.0)  # let the controller write what it holds
        samples = self.sim.telemetry_sent - sent
        grown = _store_bytes(self.store) - before
        per_sample = grown / samples if samples else None
        self.row.update(telemetry_samples=samples, store_bytes_per_sample=round(per_sample) if per_sample else None,
                        store_mb_per_device_day=round(per_sample * 86400 / AGENT_TELEMETRY_S / 2**20, 2)
                        if per_sample else None)

    # --- helpers -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        if self.watch is None:
            yield
            return
        with self.watch.phase(self.row, name):
            yield

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.api + path, timeout=60) as response:
            return json.loads(response.read())

    def _online(self) -> int:
        query = urllib.parse.urlencode({"q": "online = true", "limit": 1})
        with contextlib.suppress(OSError, ValueError):
            return int(self._get(f"/devices?{query}")["total"])
        return 0

    def _deployment(self, name: str) -> dict[str, Any]:
        rows = json.loads(_checked(_edgedeploy("fleet", "deployments", "--json", env=self.env, timeout=120)))
        return next((row for row in rows if row.get("name") == name), {})

    def _until(self, check: Any, what: str, timeout: float | None = None, fail: bool = True) -> None:
        deadline = time.monotonic() + (timeout or self.settings.timeout_s)
        while not check():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the controller exited ({self.proc.returncode}) waiting for {what}")
            if time.monotonic() > deadline:
                if fail:
                    raise TimeoutError(f"no {what} within {timeout or self.settings.timeout_s:.0f}s")
                return
            time.sleep(min(5.0, max(0.5, self.n / 20000)))


def _sha(bundle: Path) -> str:
    import hashlib

    return hashlib.sha256(bundle.read_bytes()).hexdigest()


def _verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One line per target of issue #11 that these rows say something about."""
    lines = []
    for row in rows:
        n = row["devices"]
        if n in CONVERGE_TARGET_S and "converge_s" in row:
            goal, got = CONVERGE_TARGET_S[n], row.get("converge_s")
            lines.append(f"converge {n:,} devices: {got if got is not None else 'not converged'} s "
                         f"(target < {goal:.0f} s): {'met' if got is not None and got < goal else 'MISSED'}")
        if n in RSS_TARGET_MB and row.get("ctl_rss_peak_mb"):
            goal, got = RSS_TARGET_MB[n], row["ctl_rss_peak_mb"]
            lines.append(f"controller RSS at {n:,} devices: {got:.0f} MB (target < {goal:.0f} MB): "
                         f"{'met' if got < goal else 'MISSED'}")
        if row.get("pace_ratio") is not None:
            error = abs(row["pace_ratio"] - 1)
            lines.append(f"paced rate at {n:,} devices: {row['achieved_per_min']}/min of {row['rate_per_min']:g}/min "
                         f"(target within 5 %): {'met' if error <= PACE_TOLERANCE else 'MISSED'}")
    return lines


def _settings(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_scale", description=__doc__.split("\n")[0])
    default_sizes = os.environ.get("FLEET_SCALE_SIZES", "1000,10000,50000,100000")
    parser.add_argument("--sizes", default=default_sizes, help="device counts (default %(default)s)")
    parser.add_argument("--pace-size", type=int, default=10_000, help="the size the paced rollout runs at")
    parser.add_argument("--rate", default="1000/min", help="the paced rollout's --rate (default %(default)s)")
    parser.add_argument("--pace-window", type=float, default=180.0, help="seconds the paced rate is measured over")
    parser.add_argument("--telemetry-period", type=float, default=10.0, help="seconds between telemetry samples")
    parser.add_argument("--telemetry-window", type=float, default=60.0, help="seconds of telemetry measured")
    parser.add_argument("--time-to-active", type=float, default=0.0, help="simulated seconds from order to active")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds any one phase may take")
    args = parser.parse_args(list(argv))
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        rate = float(args.rate.removesuffix("/min"))
    except ValueError:
        parser.error("--sizes takes numbers (1000,10000) and --rate N/min")
    return Settings(sizes, args.pace_size, rate, args.pace_window, args.telemetry_period, args.telemetry_window,
                    args.time_to_active, args.timeout)


COLUMNS = ["devices", "mode", "sim_start_s", "register_s", "rollout_s", "rollout_succeeded", "converge_s",
           "applied", "achieved_per_min", "pace_ratio", "ctl_rss_peak_mb", "rollout_cpu_s", "converge_cpu_s",
           "store_bytes_per_sample", "store_mb_per_device_day", "error"]


def main(argv: Sequence[str] = ()) -> None:
    """Run the scale bench and write ``bench/results/fleet_scale.json``."""
    from packager.keys import generate_key
    from tests.e2e.test_fleet import script_bundle

    settings = _settings(argv)
    controller = has_controller()
    rows: list[dict[str, Any]] = []
    old_home = os.environ.get("EDGEDEPLOY_HOME")
    with tempfile.TemporaryDirectory(prefix="edgedeploy-fleet-scale-") as tmp:
        work = Path(tmp)
        os.environ["EDGEDEPLOY_HOME"] = str(work / "home")
        try:
            key = generate_key()
            bundles = {v: script_bundle(work / f"v{v}.edb", key, v) for v in (1, 2, 3)}
            for n in settings.sizes:
                rows.append(Bench(n, settings, work, bundles, controller).run())
                print_table(rows[-1:], [c for c in COLUMNS if c in rows[-1]])
        finally:
            if old_home is None:
                os.environ.pop("EDGEDEPLOY_HOME", None)
            else:
                os.environ["EDGEDEPLOY_HOME"] = old_home
    notes = [] if controller else ["no `edgedeploy controller` in this checkout: the direct rollout (CLI on the "
                                   "broker) was measured instead"]
    print_table(rows, [c for c in COLUMNS if any(c in r for r in rows)])
    verdicts = _verdicts(rows)
    for line in verdicts + notes:
        print(line)
    targets = {"converge_s": CONVERGE_TARGET_S, "pace_tolerance": PACE_TOLERANCE, "rss_mb": RSS_TARGET_MB}
    write_results("fleet_scale", {"rows": rows, "verdicts": verdicts, "notes": notes, "targets": targets,
                                  "settings": settings.__dict__})


if __name__ == "__main__":
    main(sys.argv[1:])
