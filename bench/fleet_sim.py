"""A fleet simulator: many devices in one process speaking the edgedeploy topic contract over real MQTT.

What each device does is :mod:`bench.sim_devices` (the agent's reporting behaviour, without I/O);
this module connects it to a broker and runs it:

* devices ``{id_prefix}-00000``... are spread over ``connections`` MQTT connections
  (:class:`bench.mqtt_wire.WireClient`): one shared connection by default, subscribed to
  ``{prefix}/devices/+/desired``; several connections subscribe per device, and with one device
  per connection each has its own client id and last will (``status`` offline);
* one engine thread owns every socket and device: it reads desired messages, runs the timed steps
  from a heap, publishes, and keeps at most ``max_unacked`` QoS 1 messages unacknowledged, so
  100,000 devices never pile up in a client buffer. Other threads call in through a queue;
* telemetry goes out every ``telemetry_period_s`` per device, spread evenly over the period;
* a lost connection is retried every second; its devices announce themselves again (status and
  reported) on reconnect, as the agent does, so only transitions in between are not seen.

In tests: ``with FleetSimulator(host, port, 2000, time_to_active=0.5) as sim: ...`` and
:meth:`FleetSimulator.wait_for`, :meth:`~FleetSimulator.active_count`, :meth:`~FleetSimulator.states`.
As a command: ``python -m bench.fleet_sim HOST PORT N [options]`` prints ``ready N devices`` once
the broker acknowledged every device's status and report, then a line of counts every
``--progress`` seconds, until SIGINT or SIGTERM (which publishes every device offline).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import heapq
import itertools
import logging
import secrets
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from bench.mqtt_wire import Will, WireClient, WireError
from bench.sim_devices import SimDevice, SimFleet, VersionBehaviour
from edge_agent.errors import EdgeDeployError, UsageError, ValidationError
from edge_agent.fleet_messages import DEFAULT_PREFIX, parse_topic, topic
from edge_agent.trust import TrustStore

__all__ = ["FleetSimulator", "main", "version_behaviours"]

log = logging.getLogger(__name__)

_SUBSCRIBE_BATCH = 500  # topic filters per SUBSCRIBE packet when a connection subscribes per device
_TASK_BATCH = 2000  # engine tasks per hold of the state lock: queries wait at most that long
_CHECK_EVERY = 256  # publishes between two looks at the unacknowledged count
_TELEMETRY_TICK_S = 0.5
_RECONNECT_S = 1.0


class FleetSimulator:
    """``count`` simulated devices; :meth:`start` connects and announces them, :meth:`stop` ends.

    ``tags`` values may be lists, dealt out round robin over the devices (``{"site": ["milan",
    "rome"]}``: every other device is in rome). ``behaviour`` maps a model version (as a string)
    to a :class:`~bench.sim_devices.VersionBehaviour`; other versions behave as ``default``.
    """

    def __init__(self, host: str, port: int, count: int, *, prefix: str = DEFAULT_PREFIX, id_prefix: str = "sim",
                 connections: int = 1, profile: str = "cpu-x86_64", groups: Sequence[str] = (),
                 tags: Mapping[str, str | Sequence[str]] | None = None, time_to_active: float = 0.0,
                 jitter: float = 0.2, telemetry_period_s: float | None = 30.0, requests_per_s: float = 1.0,
                 behaviour: Mapping[str, VersionBehaviour] | None = None, default: VersionBehaviour | None = None,
                 events: bool = True, trust: TrustStore | None = None, max_unacked: int = 20000,
                 seed: int = 0) -> None:
        if count < 0 or connections < 1:
            raise UsageError("the simulator needs a device count >= 0 and at least one connection")
        if time_to_active < 0 or not 0 <= jitter < 1:
            raise UsageError("--time-to-active must be >= 0 and --jitter between 0 and 1")
        if not 0 < max_unacked < 60000:
            raise UsageError("max_unacked must be between 1 and 60,000 (MQTT has 65,535 packet ids)")
        self.host, self.port, self.prefix, self.id_prefix = host, port, prefix, id_prefix
        self.connections, self.count = connections, count
        self.defaults = (profile, list(groups), dict(tags or {}))
        self.telemetry_period_s = telemetry_period_s or None
        self.max_unacked = max_unacked
        self.telemetry_sent = 0
        self.fleet = SimFleet(self._send, self._later, time_to_active=time_to_active, jitter=jitter,
                              requests_per_s=requests_per_s, behaviour=behaviour, default=default, events=events,
                              trust=trust, seed=seed)
        self._run_id = secrets.token_hex(3)
        self._clients: list[WireClient] = []
        self._members: list[list[str]] = []  # device ids per connection
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._inbox: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._heap: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._tie = itertools.count()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._since_check = 0
        self._stopping = False
        self._telemetry_start, self._telemetry_due, self._telemetry_round = 0.0, 0, 0
        self._engine = threading.Thread(target=self._run, name="fleet-sim", daemon=True)

    # --- life cycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 300.0) -> FleetSimulator:
        """Connect, announce every device and return once the broker acknowledged all of it."""
        profile, groups, tags = self.defaults
        ids = self.fleet.add(self.id_prefix, self.count, profile, groups, tags, self.connections)
        single = self.connections == len(ids)
        for index in range(self.connections):
            will = Will(topic(ids[index], "status", self.prefix), self.fleet.status_payload(ids[index], False)) \
                if single else None
            self._clients.append(WireClient(self.host, self.port, f"fleet-sim-{self._run_id}-{index}", will=will))
            self._members.append(ids[index::self.connections])
        try:
            for index in range(self.connections):
                self._connect(index)
        except WireError:
            self._close_all()
            raise
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._engine.start()
        if not self.flush(timeout):
            self.stop()
            raise EdgeDeployError(f"the broker at {self.host}:{self.port} did not acknowledge the reports of "
                                  f"{len(ids)} devices within {timeout:.0f}s")
        self.set_telemetry(self.telemetry_period_s)
        return self

    def set_telemetry(self, period_s: float | None) -> None:
        """Send telemetry every ``period_s`` per device from now on (None or 0: stop sending it)."""
        self.call(self._restart_telemetry, period_s or None)

    def stop(self) -> None:
        """Publish every device offline (retained), as a clean agent stop does, and disconnect."""
        if not self._engine.is_alive():
            self._close_all()
            return
        self.call(self._say_offline)
        self.flush(10.0)
        self._stopping = True
        self._wake()
        self._engine.join(10)
        self._close_all()

    def __enter__(self) -> FleetSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def flush(self, timeout: float) -> bool:
        """Wait until every message so far went out and each QoS 1 one was acknowledged; False on timeout."""
        return self.wait_for(lambda: not self._inbox and all(
            not c.unacked and not c.wants_write for c in self._clients if c.connected), timeout)

    # --- what tests and benches call -----------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Any:
        """Run ``fn(*args)`` on the engine thread and return its result (re-raises what it raised)."""
        if threading.current_thread() is self._engine:
            return fn(*args)
        done = threading.Event()
        outcome: list[Any] = []

        def job() -> None:
            try:
                outcome.append(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who re-raises it
                outcome.append(exc)
            finally:
                done.set()

        self.submit(job)
        if not done.wait(timeout):
            raise EdgeDeployError(f"the simulator did not run {getattr(fn, '__name__', fn)} within {timeout:.0f}s")
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def add_devices(self, count: int, profile: str | None = None, groups: Sequence[str] | None = None,
                    tags: Mapping[str, str | Sequence[str]] | None = None) -> list[str]:
        """More devices join now (status online, reported); returns their ids."""
        base_profile, base_groups, base_tags = self.defaults
        return list(self.call(self._add, count, profile or base_profile,
                              list(base_groups if groups is None else groups), base_tags if tags is None else tags))

    def set_attributes(self, device_ids: Iterable[str], *, tags: Mapping[str, str] | None = None,
                       groups: Sequence[str] | None = None, profile: str | None = None) -> None:
        """Change devices' tags, groups or profile and publish their reports again."""
        self.call(self._set_attributes, list(device_ids), tags, groups, profile)

    def set_online(self, device_ids: Iterable[str], online: bool) -> None:
        """Take devices off the fleet (status offline; orders wait until they return) or bring them back."""
        self.call(self._set_online, list(device_ids), online)

    @property
    def device_ids(self) -> list[str]:
        """Every simulated device id, in order."""
        with self._lock:
            return list(self.fleet.devices)

    def reported(self, device_id: str) -> dict[str, Any]:
        """What ``device_id`` reports now (the body of its ``reported`` message)."""
        with self._lock:
            return self.fleet.devices[device_id].report_body()

    def states(self, model: str) -> collections.Counter[str]:
        """How many devices are in each state for ``model`` (``idle`` where they never had it)."""
        with self._lock:
            return collections.Counter(d.models[model].state.value if model in d.models else "idle"
                                       for d in self.fleet.devices.values())

    def active_count(self, bundle_sha256: str) -> int:
        """How many devices report ``bundle_sha256`` as their active bundle, in state ``active``."""
        with self._lock:
            return self.fleet.active[bundle_sha256]

    def order_times(self, bundle_sha256: str) -> list[float]:
        """When each device first got an order for ``bundle_sha256`` (epoch seconds, in arrival order)."""
        with self._lock:
            return list(self.fleet.order_times[bundle_sha256])

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds (called with the state locked); False on timeout."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    # --- engine-side operations ----------------------------------------------------------------
    def _add(self, count: int, profile: str, groups: list[str], tags: Mapping[str, str | Sequence[str]]) -> list[str]:
        ids = self.fleet.add(self.id_prefix, count, profile, groups, tags, self.connections)
        for device_id in ids:
            self._members[self.fleet.devices[device_id].connection].append(device_id)
        for index, client in enumerate(self._clients):
            self._subscribe(client, [d for d in ids if self.fleet.devices[d].connection == index])
        for device_id in ids:
            self.fleet.announce(self.fleet.devices[device_id])
        return ids

    def _set_attributes(self, ids: list[str], tags: Mapping[str, str] | None, groups: Sequence[str] | None,
                        profile: str | None) -> None:
        for device_id in ids:
            device = self.fleet.devices[device_id]
            device.tags = dict(tags) if tags is not None else device.tags
            device.groups = list(groups) if groups is not None else device.groups
            device.profile = profile or device.profile
            self.fleet.publish_reported(device)

    def _set_online(self, ids: list[str], online: bool) -> None:
        for device_id in ids:
            self.fleet.set_online(self.fleet.devices[device_id], online)

    def _say_offline(self) -> None:
        for device in self.fleet.devices.values():
            if device.online:
                self._send(device, "status", self.fleet.status_payload(device.device_id, False), 1, True)

    # --- the engine ----------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` for the engine thread (safe from any thread, never blocks)."""
        self._inbox.append((fn, args))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe: the engine is awake already; closed: it is gone
            self._wake_w.send(b"x")

    def _later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        heapq.heappush(self._heap, (time.monotonic() + delay, next(self._tie), fn, args))

    def _run(self) -> None:
        last_ping = time.monotonic()
        while not self._stopping:
            with self._changed:
                ran = self._run_due()
                self._pump(0.0)
                self._changed.notify_all()
            if time.monotonic() - last_ping > 1.0:
                last_ping = time.monotonic()
                for client in self._clients:
                    self._guard_io(client, client.ping_if_due, last_ping)
            if not ran and not self._inbox:
                wait = min(1.0, self._heap[0][0] - time.monotonic()) if self._heap else 1.0
                if wait > 0:
                    self._pump(wait)

    def _run_due(self) -> int:
        """Run what arrived, then the timed steps that are due (at most _TASK_BATCH); returns how many ran."""
        done = 0
        while self._inbox and done < _TASK_BATCH:
            fn, args = self._inbox.popleft()
            self._guarded(fn, args)
            done += 1
        now = time.monotonic()
        while self._heap and self._heap[0][0] <= now and done < _TASK_BATCH:
            _due, _tie, fn, args = heapq.heappop(self._heap)
            self._guarded(fn, args)
            done += 1
        return done

    @staticmethod
    def _guarded(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception:  # one bad step must not stop every other device
            log.exception("simulator step %s failed", getattr(fn, "__name__", fn))

    # --- sockets (engine thread only) ----------------------------------------------------------
    def _connect(self, index: int) -> None:
        client = self._clients[index]
        client.connect()
        self._selector.register(client.fileno(), selectors.EVENT_READ, index)
        if self.connections == 1:
            client.subscribe([(topic("+", "desired", self.prefix), 1)])
        else:
            self._subscribe(client, self._members[index])
        for device_id in self._members[index]:
            self.fleet.announce(self.fleet.devices[device_id])

    def _subscribe(self, client: WireClient, device_ids: Sequence[str]) -> None:
        if self.connections == 1:
            return  # the wildcard covers every device
        topics = [(topic(d, "desired", self.prefix), 1) for d in device_ids]
        for start in range(0, len(topics), _SUBSCRIBE_BATCH):
            client.subscribe(topics[start:start + _SUBSCRIBE_BATCH])

    def _reconnect(self, index: int) -> None:
        try:
            self._connect(index)
            log.info("connection %d to %s:%d is back", index, self.host, self.port)
        except WireError as exc:
            log.debug("connection %d: %s", index, exc)
            self._later(_RECONNECT_S, self._reconnect, index)

    def _lost(self, index: int, exc: WireError) -> None:
        log.warning("%s; retrying every %.0fs", exc, _RECONNECT_S)
        for key in list(self._selector.get_map().values()):
            if key.data == index:
                self._selector.unregister(key.fileobj)
        self._later(_RECONNECT_S, self._reconnect, index)

    def _guard_io(self, client: WireClient, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except WireError as exc:
            self._lost(self._clients.index(client), exc)
            return None

    def _pump(self, timeout: float) -> None:
        """Send what is buffered, wait up to ``timeout`` for the sockets, take what arrived."""
        for client in self._clients:
            if client.wants_write:
                self._guard_io(client, client.flush)
        writing = any(c.wants_write for c in self._clients)
        for key, _mask in self._selector.select(0.0 if writing else timeout):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    while self._wake_r.recv(4096):
                        pass
                continue
            client = self._clients[key.data]
            for name, payload in self._guard_io(client, client.read) or ():
                self.submit(self._take_desired, name, payload)

    def _send(self, device: SimDevice, kind: str, payload: bytes, qos: int, retain: bool) -> None:
        client = self._clients[device.connection]
        client.publish(topic(device.device_id, kind, self.prefix), payload, qos, retain)
        self._since_check += 1
        if self._since_check >= _CHECK_EVERY:
            self._since_check = 0
            while sum(c.unacked for c in self._clients) > self.max_unacked and not self._stopping:
                self._pump(0.05)

    def _take_desired(self, name: str, payload: bytes) -> None:
        try:
            device_id, _kind = parse_topic(name, self.prefix)
        except ValidationError:
            return
        device = self.fleet.devices.get(device_id)
        if device is not None and payload:
            self.fleet.take_order(device, payload)

    def _restart_telemetry(self, period_s: float | None) -> None:
        self.telemetry_period_s = period_s
        self._telemetry_round += 1
        self._telemetry_start, self._telemetry_due = time.monotonic(), 0
        if period_s:
            self._telemetry_tick(self._telemetry_round)

    def _telemetry_tick(self, round_: int) -> None:
        """Send the samples due by now: each device once per period, spread evenly over it."""
        if round_ != self._telemetry_round or not self.telemetry_period_s:
            return  # the period changed since this tick was scheduled
        devices = list(self.fleet.devices.values())
        due = int(len(devices) * (time.monotonic() - self._telemetry_start) / self.telemetry_period_s)
        while self._telemetry_due < due and devices and not self._stopping:
            device = devices[self._telemetry_due % len(devices)]
            self._telemetry_due += 1
            if device.online:
                self._send(device, "telemetry", self.fleet.sample(device), 0, False)
                self.telemetry_sent += 1
        self._later(_TELEMETRY_TICK_S, self._telemetry_tick, round_)

    def _close_all(self) -> None:
        for client in self._clients:
            client.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


# --- command line --------------------------------------------------------------------------------
def _fraction(text: str) -> float:
    from packager.fleet import parse_fraction

    return parse_fraction(text)


def _tags(items: list[str]) -> dict[str, list[str]]:
    tags: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UsageError(f"--tag {item!r}: write KEY=VALUE or KEY=V1,V2 (dealt out round robin)")
        tags[key] = values.split(",")
    return tags


def version_behaviours(base_p95_ms: float = 10.0, slow: Sequence[str] = (), p95_ms: float = 80.0,
                       error_rate: float = 0.0, fail_share: float = 0.0,
                       failing: Sequence[str] = ()) -> tuple[VersionBehaviour, dict[str, VersionBehaviour]]:
    """The default behaviour and the per-version table the command-line options describe.

    ``slow`` versions have ``p95_ms`` and ``error_rate``; ``fail_share`` of the devices fail the
    ``failing`` versions' health check (every version's when ``failing`` is empty).
    """
    default = VersionBehaviour(base_p95_ms, 0.0, 0.0 if failing else fail_share)
    table = {version: VersionBehaviour(p95_ms if version in slow else base_p95_ms,
                                       error_rate if version in slow else 0.0,
                                       fail_share if version in failing else default.fail_share)
             for version in {*slow, *failing}}
    return default, table


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_sim",
                                     description="Simulate N devices speaking the edgedeploy topic contract.")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("count", type=int, help="number of devices")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix")
    parser.add_argument("--id-prefix", default="sim", help="device ids are ID_PREFIX-00000, ...")
    parser.add_argument("--connections", type=int, default=1,
                        help="MQTT connections to spread the devices over (N: one per device, each with its will)")
    parser.add_argument("--profile", default="cpu-x86_64")
    parser.add_argument("--group", action="append", default=[], help="a group of every device (repeatable)")
    parser.add_argument("--tag", action="append", default=[],
                        help="KEY=VALUE, or KEY=V1,V2,... dealt out round robin (repeatable)")
    parser.add_argument("--time-to-active", type=float, default=0.0, help="seconds from an order to active")
    parser.add_argument("--jitter", type=float, default=0.2, help="random spread of each step, +/- this share")
    parser.add_argument("--telemetry-period", type=float, default=30.0, help="seconds between samples (0: none)")
    parser.add_argument("--rps", type=float, default=1.0, help="requests per second each model serves")
    parser.add_argument("--base-p95-ms", type=float, default=10.0, help="p95 latency of ordinary versions")
    parser.add_argument("--slow-version", action="append", default=[],
                        help="a model version with --p95-ms and --error-rate (repeatable)")
    parser.add_argument("--p95-ms", type=float, default=80.0, help="p95 latency of the slow versions")
    parser.add_argument("--error-rate", type=_fraction, default=0.0, help="error share of the slow versions")
    parser.add_argument("--fail-share", type=_fraction, default=0.0,
                        help="share of devices whose health check fails (the --fail-version ones, else any)")
    parser.add_argument("--fail-version", action="append", default=[], help="a version that fails (repeatable)")
    parser.add_argument("--no-events", action="store_true", help="publish no events messages")
    parser.add_argument("--progress", type=float, default=10.0, help="seconds between count lines (0: none)")
    parser.add_argument("--model", default=None, help="the model whose states the count lines show")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = _parser().parse_args(argv)
        default, table = version_behaviours(args.base_p95_ms, args.slow_version, args.p95_ms, args.error_rate,
                                            args.fail_share, args.fail_version)
        sim = FleetSimulator(args.host, args.port, args.count, prefix=args.prefix, id_prefix=args.id_prefix,
                             connections=args.connections, profile=args.profile, groups=args.group,
                             tags=_tags(args.tag), time_to_active=args.time_to_active, jitter=args.jitter,
                             telemetry_period_s=args.telemetry_period, requests_per_s=args.rps,
                             behaviour=table, default=default, events=not args.no_events, seed=args.seed)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        started = time.monotonic()
        sim.start()
    except EdgeDeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    print(f"ready {args.count} devices in {time.monotonic() - started:.1f}s", flush=True)
    try:
        while not stop.wait(args.progress or None):
            states = f", {args.model}: {dict(sim.states(args.model))}" if args.model else ""
            print(f"{time.strftime('%H:%M:%S')} telemetry sent {sim.telemetry_sent}{states}", flush=True)
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
