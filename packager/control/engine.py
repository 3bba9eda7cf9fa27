"""The controller's reconciler: it keeps every device where the deployments say it should be.

Inputs arrive over the fleet transport (:class:`_EngineLink`, the MQTT link of
:mod:`packager.fleet` subscribed to more topics): retained ``reported``/``status``/``desired``
messages and the ``telemetry`` and ``events`` streams. The paho thread only parses and queues;
one engine thread (:meth:`ControlPlane._loop`) does everything else in *ticks*:

1. drain the inbox: device rows, telemetry and device events (written to the store in batches);
2. re-evaluate which deployment each changed device belongs to, per model — the matching
   deployment with the highest priority (then the newest) wins — and move devices whose
   assignment changed: into the new deployment's rollout, or a ``remove`` order when nothing
   matches any more;
3. step every open rollout (:class:`Rollout`): apply reports, time out silent devices, judge the
   failure share, bake and gate a finished wave on telemetry, start the next wave, and order the
   devices that are due, paced by the policy's rate and only inside maintenance windows;
4. write what changed (device rows, rollout rows, events) and publish the signed orders.

A rollout row is written with state ``updating`` *before* its order is published, so a
controller that dies between the two resends the order when it (or a standby) takes the lead; an
order already retained on the broker for that rollout is never sent again. Order sequence numbers
come from the store, so two controllers on one PostgreSQL never reuse one.

Every decision (a wave started, a gate passed or failed with its figures, a rollback) is an event
in the store. Only the leader acts; a standby ingests nothing into the store and answers the API
with 503 until it leads (see :mod:`packager.control.daemon`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.broker_tls import redact_url
from edge_agent.errors import AlreadyExistsError, NotFoundError, UnavailableError, UsageError, ValidationError, brief
from edge_agent.fleet_messages import (
    DEFAULT_PREFIX,
    DeployState,
    DesiredState,
    DeviceReport,
    ModelOrder,
    ModelReport,
    OrderAction,
    check_model_name,
    encode_message,
    parse_message,
    parse_topic,
)
from edge_agent.home import edgedeploy_home
from edge_agent.orders import ORDER_TTL_S
from edge_agent.trust import TrustStore
from packager.control.conditions import Condition, parse_condition
from packager.control.databases import raw_json
from packager.control.policy import (
    Gate,
    Pacer,
    RolloutPolicy,
    in_window,
    split_waves,
    stats_from_telemetry,
    too_many_failures,
)
from packager.control.store import Store
from packager.fleet import DeviceSelector, MQTTControllerLink, compose_desired, device_row, own_order

__all__ = ["ControlPlane", "Rollout"]

log = logging.getLogger(__name__)

ORDER_BATCH = 2000          # orders signed and published per tick, so the API is never held up for long
TERMINAL = ("succeeded", "rolled-back", "failed", "superseded")
FAILED_STATES = (DeployState.FAILED, DeployState.ROLLED_BACK)
PRUNE_EVERY_S = 3600.0
# The controller reads every device's messages on one connection and uses no MQTT 5 feature; 3.1.1
# spares paho decoding MQTT 5 properties on each of them (a tenth of its time at 10,000 devices).
CONTROLLER_MQTT = "3.1.1"
RESYNC_S = 10.0             # an ordered device silent this long: its retained report is asked for again
BULK_FLUSH_S = 1.0          # device rows, telemetry and device events are written at most this often


class _EngineLink(MQTTControllerLink):
    """The MQTT link as the engine's input: every device message is queued raw, parsed in the engine.

    One connection carries every message of the fleet, and paho's network thread shares one core
    with the engine (the GIL), so that thread does the least it can: it splits the topic and queues
    ``(kind, device_id, payload, received)``. The engine parses in its tick: of ``reported``,
    ``status`` and ``desired`` only each device's newest message since the last tick (the five
    transitions of an update that arrive together are parsed once), and every ``telemetry`` and
    ``events`` message. Answers to requests (``responses``) are the base link's.

    Device messages are subscribed at QoS 0: no acknowledgement per message each way, and no
    in-flight window (Mosquitto's 20 by default) pacing the fleet's reports by this link's round
    trip. Nothing is lost that QoS 1 kept: the session is clean either way, a broker drops QoS 1
    messages past its queue limit too, and the retained ``reported`` is asked for again when an
    ordered device stays silent (:meth:`resync`). Only ``responses`` stay at QoS 1.
    """

    KINDS = ("reported", "status", "desired", "telemetry", "events")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.inbox: collections.deque[tuple[str, str, bytes, float]] = collections.deque()
        self.last_retained = time.monotonic()
        super().__init__(*args, **kwargs)

    def _max_inflight(self, mqtt5: bool) -> int:
        # MQTT 3.1.1 has no receive maximum to keep to: a tick's orders go out at once. (paho also scans
        # every unacknowledged message on each acknowledgement while a limit holds messages back.)
        return 1000 if mqtt5 else 0

    def _qos(self, kind: str) -> int:
        return 1 if kind == "responses" else 0

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            device_id, kind = parse_topic(message.topic, self.prefix)
        except ValidationError as exc:
            log.info("ignoring a message on %s: %s", brief(str(message.topic), 200), exc)
            return
        except Exception:  # whatever a device sends, the network loop lives on
            log.exception("dropped a message on %s", brief(str(message.topic), 200))
            return
        if message.retain:  # the broker's retained copy (what a subscription gets first), not a live message
            self.last_retained = time.monotonic()
        if kind == "responses":
            super()._on_message(client, userdata, message)
        else:
            self.inbox.append((kind, device_id, message.payload, time.time()))

    def settle(self, quiet: float = 0.3, limit: float = 3.0) -> None:
        """Wait until the retained messages stopped arriving (``quiet`` seconds without one), at most
        ``limit``; live telemetry and events do not count."""
        self.last_retained = time.monotonic()
        deadline = self.last_retained + limit
        while (now := time.monotonic()) < deadline and now - self.last_retained < quiet:
            time.sleep(min(0.05, quiet))


@dataclass
class Deployment:
    """A declarative deployment: a bundle for one model, a target condition, a priority and a policy."""

    name: str
    spec: dict[str, Any]
    condition: Condition
    policy: RolloutPolicy

    @property
    def model(self) -> str:
        return str(self.spec["model"]["name"])

    @property
    def priority(self) -> int:
        return int(self.spec.get("priority", 0))

    @property
    def rollout_id(self) -> str:
        return str(self.spec["rollout_id"])

    def target(self) -> dict[str, Any]:
        return {k: self.spec[k] for k in ("bundle_sha256", "bundle_url", "model")}

    def rank(self) -> tuple[int, float, str]:
        return self.priority, float(self.spec.get("created", 0)), self.name


def _check_spec(spec: dict[str, Any], *fields: str) -> None:
    for name in fields:
        if not spec.get(name):
            raise UsageError(f"missing field {name!r}")
    if not isinstance(spec.get("model"), dict) or not spec["model"].get("name"):
        raise UsageError("field 'model' must be {\"name\", \"version\"}")
    try:
        check_model_name(spec["model"]["name"])
    except ValidationError as exc:
        raise UsageError(f"field 'model': {exc}") from None
    sha = str(spec.get("bundle_sha256", ""))
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise UsageError("field 'bundle_sha256' must be 64 lowercase hex digits")
    if not str(spec.get("bundle_url", "")).startswith(("http://", "https://")):
        raise UsageError("field 'bundle_url' must be an http:// or https:// URL")


class Rollout:
    """One rollout in memory: its document (persisted as ``doc``) and one row per device.

    Row states: ``pending`` (not ordered yet), ``updating`` (ordered), ``succeeded``, ``failed``,
    ``rolled-back``, ``moved`` (the device now belongs to another deployment). ``wave`` -1 marks a
    device that already ran the target when the rollout began. A deployment's rollout stays open
    after its waves (state ``succeeded``): devices that join later are added as pending rows and
    ordered at the policy's pace.
    """

    def __init__(self, doc: dict[str, Any], rows: dict[str, dict[str, Any]]) -> None:
        self.doc = doc
        self.rows = rows
        self.policy = RolloutPolicy.from_dict(doc["policy"])
        self.pacer = Pacer.from_dict(doc.get("pacer"))
        self.dirty: set[str] = set()
        self.doc_dirty = False
        # An index kept with the rows, so a tick looks only at the devices it may act on (at 100,000
        # devices a scan of every row costs tens of milliseconds, and the engine ticks five times a second).
        self._by_state: dict[str, dict[str, None]] = collections.defaultdict(dict)  # insertion-ordered sets
        self.tally: collections.Counter[tuple[int, str]] = collections.Counter()    # (wave, state) -> devices
        self.loaded = True
        for device_id, row in rows.items():
            self._index(device_id, row, 1)

    @classmethod
    def ended(cls, doc: dict[str, Any], counts: dict[tuple[int, str], int]) -> Rollout:
        """An ended rollout kept as its document and counts; its rows stay in the store."""
        rollout = cls(doc, {})
        rollout.tally.update(counts)
        rollout.loaded = False
        return rollout

    def unload(self) -> None:
        """Drop the rows of an ended rollout from memory (the store has them); the counts stay."""
        self.rows = {}
        self._by_state.clear()
        self.loaded = False

    def _index(self, device_id: str, row: dict[str, Any], sign: int) -> None:
        if sign > 0:
            self._by_state[row["state"]][device_id] = None
        else:
            self._by_state[row["state"]].pop(device_id, None)
        self.tally[row["wave"], row["state"]] += sign

    def ids(self, state: str) -> list[str]:
        """The devices whose row is in ``state``, in the order they got there (a copy: safe to change rows)."""
        return list(self._by_state.get(state, ()))

    def has(self, device_id: str, state: str) -> bool:
        return device_id in self._by_state.get(state, ())

    def count(self, state: str, wave: int | None = None, upto: int | None = None) -> int:
        """Rows in ``state`` (in wave ``wave``, or in waves 0..``upto``)."""
        return sum(n for (w, st), n in self.tally.items() if st == state and
                   (wave is None or w == wave) and (upto is None or 0 <= w <= upto))

    def totals(self) -> collections.Counter[str]:
        """Rows per state, over every wave."""
        total: collections.Counter[str] = collections.Counter()
        for (_wave, state), n in self.tally.items():
            total[state] += n
        return total

    def put(self, device_id: str, row: dict[str, Any]) -> None:
        """Add or replace a device's row."""
        old = self.rows.get(device_id)
        if old is not None:
            self._index(device_id, old, -1)
        self.rows[device_id] = row
        self._index(device_id, row, 1)
        self.dirty.add(device_id)

    @property
    def rollout_id(self) -> str:
        return str(self.doc["rollout_id"])

    @property
    def state(self) -> str:
        return str(self.doc["state"])

    @property
    def model(self) -> str:
        return str(self.doc["target"]["model"]["name"])

    @property
    def open(self) -> bool:
        """True while it has work: running, or a deployment's finished rollout taking joiners."""
        return self.state in ("running", "rolling-back") or (
            self.state == "succeeded" and self.doc.get("deployment") is not None)

    def set(self, device_id: str, **fields: Any) -> None:
        row = self.rows[device_id]
        if "state" in fields or "wave" in fields:
            self._index(device_id, row, -1)
            row.update(fields)
            self._index(device_id, row, 1)
        else:
            row.update(fields)
        self.dirty.add(device_id)

    def set_doc(self, **fields: Any) -> None:
        self.doc.update(fields)
        self.doc_dirty = True

    def target_of(self, device_id: str) -> dict[str, Any]:
        return self.rows[device_id].get("target") or self.doc["target"]

    def waves(self) -> int:
        return int(self.doc["waves"])

    def status(self, detail: bool = False, rows: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """The ``fleet status --json`` document (``detail`` adds every device's state, from ``rows`` when
        the rollout's rows are not in memory)."""
        counts: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for (wave, state), n in self.tally.items():
            counts[wave][state] += n
        total = self.totals()
        waves = []
        for index in range(self.waves()):
            c = counts.get(index, collections.Counter())
            waves.append({"index": index, "canary": index == 0 and bool(self.doc.get("canary_wave")),
                          "size": sum(c.values()), "succeeded": c["succeeded"], "failed": c["failed"],
                          "pending": c["pending"] + c["updating"], "updating": c["updating"],
                          "rolled_back": c["rolled-back"], "moved": c["moved"]})
        doc = {
            "rollout_id": self.rollout_id, "state": self.state, "reason": self.doc.get("reason", ""),
            "deployment": self.doc.get("deployment"), "bundle_sha256": self.doc["target"]["bundle_sha256"],
            "model": self.doc["target"]["model"], "selector": self.doc.get("selector"),
            "targeted": sum(v for k, v in total.items() if k != "moved"),
            "succeeded": total["succeeded"], "failed": total["failed"],
            "pending": total["pending"] + total["updating"], "rolled_back": total["rolled-back"],
            "current_wave": self.doc["current_wave"], "phase": self.doc.get("phase", ""),
            "policy": self.doc["policy"], "created": self.doc["created"], "waves": waves,
        }
        if detail:
            doc["devices"] = {d: {"state": r["state"], "error": r.get("error"), "wave": r["wave"]}
                              for d, r in sorted((self.rows if rows is None else rows).items())}
        return doc


class _Report:
    """What the engine keeps of a device's retained report: its bytes, and the fields it acts on.

    A parsed report is about five times its JSON's size in Python objects (4.8 KB against 1 KB for
    a one-model report); 100,000 of them would be most of the controller's memory. The whole
    document is parsed again only for the API, the console and conditions on ``reported.*``.
    """

    __slots__ = ("raw", "profile", "groups", "tags", "models", "single", "last_seq", "utc_offset_min")

    def __init__(self, raw: bytes, body: dict[str, Any]) -> None:
        self.raw = raw
        profile, groups, tags = body.get("profile"), body.get("groups"), body.get("tags")
        self.profile = sys.intern(profile) if isinstance(profile, str) else None
        self.groups = [str(g) for g in groups] if isinstance(groups, list) else []
        self.tags = dict(tags) if isinstance(tags, dict) else {}
        self.models: dict[str, ModelReport] = {}
        self.single: ModelReport | None = None  # a schema-1 agent's report: its top level is the one model
        try:
            if isinstance(body.get("models"), dict):
                self.models = {sys.intern(name): dataclasses.replace(model, previous=None) for name, model in
                               DeviceReport.from_message(body).models.items()}
            else:
                self.single = ModelReport.from_body("", body)
        except (ValidationError, TypeError, ValueError):
            pass
        seq = body.get("last_seq")
        self.last_seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else -1
        offset = body.get("utc_offset_min")
        self.utc_offset_min = int(offset) if isinstance(offset, (int, float)) and not isinstance(offset, bool) \
            and abs(offset) <= 1080 else 0

    def model(self, name: str) -> ModelReport | None:
        """Model ``name``'s part of the report (as :func:`packager.fleet.model_report` reads it)."""
        if self.single is not None:
            return dataclasses.replace(self.single, name=name)
        return self.models.get(name)

    def body(self) -> dict[str, Any]:
        """The whole report (checked when it arrived)."""
        body: dict[str, Any] = json.loads(self.raw)
        return body


_NO_REPORT = _Report(b"{}", {})


def _row(device_id: str, wave: int, state: str = "pending", **extra: Any) -> dict[str, Any]:
    return {"device_id": device_id, "wave": wave, "state": state, "target": None, "previous": None,
            "error": None, "ordered_at": None, "finished_at": None, **extra}


class ControlPlane:
    """The controller: deployments, rollouts, devices and their telemetry, kept in a store.

    Construct it with a store; :meth:`start` connects to the broker and starts the engine thread;
    :meth:`stop` ends both. The public methods are the HTTP API's (:mod:`packager.control.api`);
    they are thread-safe and short (the engine never holds its lock across network waits).
    """

    def __init__(self, store: Store, broker_url: str, prefix: str = DEFAULT_PREFIX, home: Path | None = None,
                 mqtt_version: str = CONTROLLER_MQTT, order_ttl_s: float = ORDER_TTL_S,
                 retention_s: float = 7 * 86400.0, holder: str = "controller", tick_s: float = 0.2) -> None:
        self.store = store
        self.broker_url = broker_url
        self.prefix = prefix
        self.home = Path(home) if home else edgedeploy_home()
        self.mqtt_version = mqtt_version
        self.order_ttl_s = order_ttl_s
        self.retention_s = retention_s
        self.holder = holder
        self.tick_s = tick_s
        self.lock = threading.RLock()
        self.leading = False
        self.link: _EngineLink | None = None
        self._devices: dict[str, dict[str, Any]] = {}      # device id -> store row
        self._deployments: dict[str, Deployment] = {}
        self._rollouts: dict[str, Rollout] = {}            # every rollout, open or ended
        self._assigned: dict[str, dict[str, str]] = {}      # device id -> model -> deployment name
        # Each device's current order as the broker holds it: ours once acknowledged, or a retained one
        # verified when first needed (None: not one this controller can build on). _sent has a digest of
        # each payload known this way, so its echo from the broker is recognised without parsing it.
        self._orders: dict[str, DesiredState | None] = {}
        self._sent: dict[str, bytes] = {}
        # what the broker holds of each device, as the link delivered it (kept while standing by too)
        self._reported: dict[str, _Report] = {}
        self._status: dict[str, dict[str, Any]] = {}
        self._last_seen: dict[str, float] = {}
        self._desired_raw: dict[str, bytes] = {}             # retained orders not verified yet
        self._rescan = False
        self._dirty_devices: set[str] = set()
        self._reassess: set[str] = set()
        self._reassess_all = False
        self._telemetry: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._key: Any = None
        self._trust: TrustStore | None = None
        self._last_prune = 0.0
        self._last_bulk = 0.0
        self._ops: Any = None
        self._pending_removals: list[tuple[str, str]] = []   # (device, model) that no deployment matches now

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to the broker (a clear error when it cannot) and start the engine thread."""
        from packager.keys import load_order_key

        self._key = load_order_key(self.home)
        self._trust = TrustStore([self._key.public_key])
        self.link = _EngineLink(self.broker_url, self.prefix, mqtt_version=self.mqtt_version)
        self.link.settle(quiet=0.5, limit=30.0)  # the retained orders are in before a resumed rollout is judged
        self._thread = threading.Thread(target=self._loop, name="controller-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the engine, flush what it holds, give up the lead and disconnect."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.link is not None:
            self.link.close()
        if self.leading:
            with self.lock:
                try:
                    self._flush()
                except UnavailableError as exc:  # what is lost here is rebuilt from the broker at the next start
                    log.error("could not write the last changes on the way out: %s", exc)
            self.store.release_lead()
            self.leading = False

    def _loop(self) -> None:
        last_check = 0.0
        while not self._stop.is_set():
            try:
                now = time.time()
                if not self.leading:
                    if self.store.try_lead(self.holder):
                        self._take_lead()
                elif now - last_check > 2.0:
                    last_check = now
                    if not self.store.still_leading():
                        log.error("lost the lead of the store; standing by")
                        self.leading = False
                busy = self.tick()
            except Exception as exc:  # the engine outlives any one bad step; the store keeps what was done
                if isinstance(exc, UnavailableError):  # the store went away: one line, then retry
                    log.error("controller tick failed: %s; retrying", exc)
                else:
                    log.exception("controller tick failed")
                # What memory holds may now be ahead of the store (rows marked ordered whose orders never
                # left): start over from the store, which resends what is due, once it answers again.
                self.leading = False
                busy = False
                self._stop.wait(1.0)
            if not busy:  # a steady beat, not one tick per message: a tick scans the open rollouts
                self._stop.wait(self.tick_s)

    def _take_lead(self) -> None:
        """Load deployments, rollouts and devices from the store; resend orders that may be lost."""
        with self.lock:
            self._devices = {row["device_id"]: _from_store(row) for row in self.store.devices(reported_as_text=True)}
            self._deployments = {}
            for doc in self.store.deployments():
                spec = doc["spec"]
                self._deployments[doc["name"]] = Deployment(doc["name"], spec, parse_condition(spec["target"]),
                                                            RolloutPolicy.from_dict(spec["policy_doc"]))
            self._rollouts = {}
            for doc in self.store.rollouts():
                rollout_id = doc["rollout_id"]
                if self._keeps_rows(doc["doc"]):
                    rows = {r["device_id"]: r for r in self.store.rollout_devices(rollout_id)}
                    self._rollouts[rollout_id] = Rollout(doc["doc"], rows)
                else:
                    self._rollouts[rollout_id] = Rollout.ended(doc["doc"], self.store.rollout_counts(rollout_id))
            self._assigned = {}
            for rollout in self._rollouts.values():
                name = rollout.doc.get("deployment")
                if rollout.state == "superseded" or name not in self._deployments:
                    continue
                if self._deployments[name].rollout_id != rollout.rollout_id:
                    continue
                for device_id, row in rollout.rows.items():
                    if row["state"] != "moved":
                        self._assigned.setdefault(device_id, {})[rollout.model] = name
            self._resend_unsent()
            self._rescan = True  # what devices reported while this controller was not leading counts now
            self._reassess_all = True
            self.leading = True
            self._event("controller", f"{self.holder} leads", data={"devices": len(self._devices),
                                                                    "deployments": len(self._deployments)})
            log.info("leading: %d device(s), %d deployment(s), %d open rollout(s)", len(self._devices),
                     len(self._deployments), sum(1 for r in self._rollouts.values() if r.open))

    def _keeps_rows(self, doc: dict[str, Any]) -> bool:
        """True for a rollout whose rows the engine may still act on: open, or a deployment's current one."""
        state, name = doc.get("state"), doc.get("deployment")
        if state in ("running", "rolling-back"):
            return True
        dep = self._deployments.get(name) if name else None
        return dep is not None and dep.rollout_id == doc.get("rollout_id")

    def _resend_unsent(self) -> None:
        """Rows on record as ordered whose order the broker does not hold go back to pending.

        A controller that died (or lost its store) between writing a row and publishing its order
        leaves such rows; a retained order for that rollout means the device has it, and it is not
        sent again.
        """
        for rollout in self._rollouts.values():
            if not rollout.open:
                continue
            for device_id in rollout.ids("updating"):
                current = self._current_order(device_id)
                order = current.models.get(rollout.model) if current else None
                if order is None or not order.deployment_id.startswith(rollout.rollout_id):
                    log.info("rollout %s: the order of %s never reached the broker; sending it again",
                             rollout.rollout_id, device_id)
                    rollout.set(device_id, state="pending", ordered_at=None)

    # -- one tick ----------------------------------------------------------------------------
    def tick(self) -> bool:
        """Ingest, reconcile, step rollouts and persist; True when work is left for an immediate next tick."""
        if self.link is None:
            return False
        with self.lock:
            self._drain()
            if not self.leading:
                self._telemetry.clear()
                self._events.clear()
                return False
            self._reassign()
            now = time.time()
            sends: list[tuple[str, ModelOrder]] = []
            busy = False
            for rollout in list(self._rollouts.values()):
                if rollout.open:
                    busy |= self._step(rollout, now, sends)
            orders = self._sign(sends)
            self._flush(everything=False)
        if orders:  # published outside the lock: the API stays responsive
            payloads = [(device_id, encode_message("desired", message)) for device_id, message, _ in orders]
            self.link.publish_payloads(payloads)
            with self.lock:  # the broker has them: they are the devices' current orders now
                for (device_id, _message, state), (_, payload) in zip(orders, payloads, strict=True):
                    self._orders[device_id] = state
                    self._sent[device_id] = _digest(payload)
                    self._desired_raw.pop(device_id, None)
        if time.time() - self._last_prune > PRUNE_EVERY_S:
            self._last_prune = time.time()
            self.prune()
        return busy

    def prune(self) -> tuple[int, int]:
        """Delete what is older than the retention (the engine does it hourly): telemetry and events, and
        ended rollouts with their device rows (not a deployment's current one). Returns (rows, rollouts)."""
        cutoff = time.time() - self.retention_s
        removed = self.store.prune(self.retention_s)
        with self.lock:
            old = [r.rollout_id for r in self._rollouts.values() if not r.open and not self._keeps_rows(r.doc)
                   and float(r.doc.get("finished") or r.doc.get("updated") or r.doc["created"]) < cutoff]
            for rollout_id in old:
                del self._rollouts[rollout_id]
        rollouts = self.store.delete_rollouts(old) if old else 0
        if removed or rollouts:
            log.info("pruned %d telemetry row(s) and event(s) and %d ended rollout(s) older than the retention",
                     removed, rollouts)
        return removed, rollouts

    def _drain(self) -> None:
        """Parse what the link queued: each device's newest retained messages, every stream message."""
        link = self.link
        assert link is not None
        newest: dict[tuple[str, str], tuple[bytes, float]] = {}
        for _ in range(len(link.inbox)):
            kind, device_id, payload, received = link.inbox.popleft()
            if kind in ("reported", "status", "desired"):
                newest[kind, device_id] = (payload, received)
            elif payload:
                body = _parsed(kind, device_id, payload)
                if body is None:
                    continue
                if kind == "telemetry":
                    self._telemetry.extend(_telemetry_rows(device_id, body))
                elif kind == "events":
                    self._events.append({"ts": _number(body.get("ts")) or received, "kind": "device",
                                         "device_id": device_id, "rollout_id": body.get("rollout_id"),
                                         "deployment": None, "message": _device_event_line(body),
                                         "data": raw_json(payload) or body})
        changed: set[str] = set()
        for (kind, device_id), (payload, received) in newest.items():
            if kind == "desired":
                self._take_desired(device_id, payload)
                continue
            held: dict[str, Any] = self._reported if kind == "reported" else self._status
            if not payload:  # the retained message was cleared
                held.pop(device_id, None)
            else:
                body = _parsed(kind, device_id, payload)
                if body is None:
                    continue
                held[device_id] = _Report(payload, body) if kind == "reported" else body
                self._last_seen[device_id] = received
            changed.add(device_id)
        if self._rescan:
            self._rescan = False
            changed.update(self._reported, self._status)
        if changed:
            self._apply_devices(changed)

    def _take_desired(self, device_id: str, payload: bytes) -> None:
        """The broker's retained order of a device: one already known, or another one to verify when needed."""
        if payload and self._sent.get(device_id) == _digest(payload):
            return
        self._orders.pop(device_id, None)
        self._sent.pop(device_id, None)
        if payload:
            self._desired_raw[device_id] = payload
        else:
            self._desired_raw.pop(device_id, None)

    def _apply_devices(self, changed: set[str]) -> None:
        now = time.time()
        for device_id in changed:
            report, status = self._reported.get(device_id) or _NO_REPORT, self._status.get(device_id) or {}
            old = self._devices.get(device_id)
            row = {"device_id": device_id, "online": bool(status.get("online", False)),
                   "profile": report.profile, "groups": report.groups, "tags": report.tags, "report": report,
                   "status": status, "last_seen": self._last_seen.get(device_id) or now,
                   "first_seen": (old or {}).get("first_seen") or now}
            if old is not None and (old["groups"], old["tags"], old["profile"], old["online"]) != \
                    (row["groups"], row["tags"], row["profile"], row["online"]) or old is None:
                self._reassess.add(device_id)
            self._devices[device_id] = row
            self._dirty_devices.add(device_id)
            for rollout in self._rollouts.values():
                if rollout.has(device_id, "updating"):
                    self._record(rollout, device_id, report, now)

    def _flush(self, everything: bool = True) -> None:
        """Write what changed. Rollout rows and documents go every time (an order is on record before it
        leaves); device rows, telemetry and device events, which only a restart reads back and which
        change several times per update, at most every :data:`BULK_FLUSH_S` unless ``everything``."""
        now = time.monotonic()
        bulk = everything or now - self._last_bulk >= BULK_FLUSH_S
        if bulk:
            self._last_bulk = now
        if bulk and self._dirty_devices:
            self.store.upsert_devices([_to_store(self._devices[d]) for d in self._dirty_devices if d in self._devices])
            self._dirty_devices.clear()
        for rollout in self._rollouts.values():
            if rollout.dirty:
                self.store.put_rollout_devices(rollout.rollout_id, [rollout.rows[d] for d in rollout.dirty])
                rollout.dirty.clear()
            if rollout.doc_dirty:
                rollout.doc["pacer"] = rollout.pacer.to_dict()
                rollout.doc["updated"] = time.time()
                self.store.put_rollout(rollout.rollout_id, rollout.doc)
                rollout.doc_dirty = False
            if rollout.loaded and not self._keeps_rows(rollout.doc):
                rollout.unload()  # written: at 100,000 devices each ended rollout would hold ~50 MB
        if bulk and self._telemetry:
            self.store.add_telemetry(self._telemetry)
            self._telemetry = []
        if bulk and self._events:
            self.store.add_events(self._events)
            self._events = []

    def _event(self, kind: str, message: str, rollout: Rollout | None = None, device_id: str | None = None,
               data: dict[str, Any] | None = None) -> None:
        log.info("%s", message)
        self._events.append({"ts": time.time(), "kind": kind, "device_id": device_id,
                             "rollout_id": rollout.rollout_id if rollout else None,
                             "deployment": rollout.doc.get("deployment") if rollout else None,
                             "message": message, "data": data or {}})

    # -- deployments: who belongs where ------------------------------------------------------
    def _winner(self, device: dict[str, Any], model: str) -> Deployment | None:
        view = _condition_view(device, *(dep.condition for dep in self._deployments.values() if dep.model == model))
        best: Deployment | None = None
        for dep in self._deployments.values():
            if dep.model == model and (best is None or dep.rank() > best.rank()) and dep.condition.matches(view):
                best = dep
        return best

    def _reassign(self) -> None:
        if self._reassess_all:
            devices = list(self._devices)
            self._reassess_all = False
        else:
            devices = list(self._reassess)
        self._reassess.clear()
        if not devices:
            return
        models = {dep.model for dep in self._deployments.values()}
        for device_id in devices:
            device = self._devices.get(device_id)
            if device is None:
                continue
            current = self._assigned.get(device_id, {})
            for model in models | set(current):
                winner = self._winner(device, model)
                before = current.get(model)
                if winner is None and before is None:
                    continue
                if winner is not None and winner.name == before:
                    self._ensure_row(winner, device_id)
                    continue
                self._move(device_id, model, before, winner)

    def _ensure_row(self, dep: Deployment, device_id: str) -> None:
        """A device assigned to ``dep`` has a row in its rollout (a restart may have lost none)."""
        rollout = self._rollouts.get(dep.rollout_id)
        if rollout is not None and device_id not in rollout.rows:
            self._join(rollout, device_id)

    def _move(self, device_id: str, model: str, before: str | None, winner: Deployment | None) -> None:
        """The device now belongs to ``winner`` for ``model`` (or to no deployment)."""
        assigned = self._assigned.setdefault(device_id, {})
        if before is not None and before in self._deployments:
            old = self._rollouts.get(self._deployments[before].rollout_id)
            if old is not None and device_id in old.rows and old.rows[device_id]["state"] != "moved":
                old.set(device_id, state="moved", finished_at=time.time())
        if winner is None:
            assigned.pop(model, None)
            if self._runs_deployed(device_id, model):
                self._pending_removals.append((device_id, model))
                self._event("deployment", f"{device_id}: no deployment matches for {model} any more; removing it",
                            device_id=device_id, data={"model": model, "from": before})
            return
        assigned[model] = winner.name
        rollout = self._rollouts.get(winner.rollout_id)
        if rollout is not None:
            self._join(rollout, device_id)

    def _runs_deployed(self, device_id: str, model: str) -> bool:
        """True when the device's current order for ``model`` came from a deployment's rollout."""
        current = self._current_order(device_id)
        order = current.models.get(model) if current else None
        return bool(order and order.action == OrderAction.DEPLOY and (order.rollout_id or "").startswith("d-"))

    def _join(self, rollout: Rollout, device_id: str) -> None:
        """Add a device to a deployment's rollout: pending, or done when it already runs the target."""
        wave = max(0, rollout.waves() - 1) if rollout.state == "running" else rollout.waves() - 1
        row = rollout.rows.get(device_id)
        if row is not None and row["state"] not in ("moved", "rolled-back"):
            return
        rollout.put(device_id, _row(device_id, max(wave, 0)))
        if self._runs_target(device_id, rollout.doc["target"]):
            rollout.set(device_id, state="succeeded", finished_at=time.time())

    def _runs_target(self, device_id: str, target: dict[str, Any]) -> bool:
        model = self._report(device_id).model(target["model"]["name"])
        return bool(model and model.state == DeployState.ACTIVE and model.active
                    and model.active.bundle_sha256 == target["bundle_sha256"])

    # -- rollouts: the state machine -----------------------------------------------------------
    def _record(self, rollout: Rollout, device_id: str, report: _Report, now: float) -> None:
        target = rollout.target_of(device_id)
        model = report.model(rollout.model)
        if model is None:
            return
        if model.state == DeployState.ACTIVE and model.active and model.active.bundle_sha256 == target["bundle_sha256"]:
            rollout.set(device_id, state="succeeded", finished_at=now)
        elif model.state in FAILED_STATES and model.deployment_id and \
                model.deployment_id.startswith(rollout.rollout_id):
            rollout.set(device_id, state="failed", error=brief(model.error or model.state.value, 300),
                        finished_at=now)

    def _step(self, rollout: Rollout, now: float, sends: list[tuple[str, ModelOrder]]) -> bool:
        """One step of a rollout; appends the orders that are due to ``sends``. True when more is due now."""
        policy, doc = rollout.policy, rollout.doc
        if rollout.state == "rolling-back":
            return self._rollback_step(rollout, now, sends)
        if policy.start and now < policy.start:
            if doc.get("phase") != "scheduled":
                rollout.set_doc(phase="scheduled")
            return False
        # silent devices: their reports are asked for again, and after the wave timeout they failed
        quiet = []
        for device_id in rollout.ids("updating"):
            row = rollout.rows[device_id]
            if not row["ordered_at"]:
                continue
            if now - row["ordered_at"] > policy.wave_timeout_s:
                rollout.set(device_id, state="failed", error=f"no report within {policy.wave_timeout_s:.0f}s",
                            finished_at=now)
            elif now - row["ordered_at"] > RESYNC_S:
                quiet.append(device_id)
        if quiet and now - float(doc.get("resynced") or 0) > RESYNC_S and self.link is not None:
            log.info("rollout %s: no news from %d ordered device(s) for %.0fs; asking the broker for their "
                     "reports again", rollout.rollout_id, len(quiet), RESYNC_S)
            doc["resynced"] = now
            self.link.resync(quiet)
        counts = rollout.totals()
        targeted = sum(n for (wave_of, state), n in rollout.tally.items() if wave_of >= 0 and state != "moved")
        if too_many_failures(counts["failed"], counts["succeeded"], policy.max_failures, policy.min_sample,
                             targeted):
            share = counts["failed"] / max(1, counts["failed"] + counts["succeeded"])
            self._begin_rollback(rollout, f"{counts['failed']} of {counts['failed'] + counts['succeeded']} "
                                          f"finished devices failed ({share:.0%} > {policy.max_failures:.0%})",
                                 {"failed": counts["failed"], "succeeded": counts["succeeded"], "share": share})
            return True
        wave = int(doc["current_wave"])
        if rollout.state == "running":
            if wave < 0:
                return self._next_wave(rollout, now)
            if self._wave_open(rollout, wave):
                return self._order_due(rollout, now, sends, lambda row: row["wave"] <= wave)
            if not self._baked(rollout, wave, now):
                return False
            if wave + 1 < rollout.waves():
                return self._next_wave(rollout, now)
            rollout.set_doc(state="succeeded", phase="done", finished=now)
            self._event("rollout", f"rollout {rollout.rollout_id}: every wave finished "
                                   f"({counts['succeeded']} succeeded, {counts['failed']} failed)", rollout,
                        data=dict(counts))
            return False
        return self._order_due(rollout, now, sends, lambda row: True)  # a deployment's joiners

    def _wave_open(self, rollout: Rollout, wave: int) -> bool:
        """True while wave ``wave`` (or an earlier one) has a device ordered, or online and not ordered yet."""
        if rollout.count("updating", upto=wave):
            return True
        for device_id in rollout.ids("pending"):
            if 0 <= rollout.rows[device_id]["wave"] <= wave and (self._devices.get(device_id) or {}).get("online"):
                return True
        return False

    def _next_wave(self, rollout: Rollout, now: float) -> bool:
        wave = int(rollout.doc["current_wave"]) + 1
        size = sum(n for (w, _state), n in rollout.tally.items() if w == wave)
        rollout.set_doc(current_wave=wave, wave_started=now, phase="ordering", bake_started=None)
        self._event("rollout", f"rollout {rollout.rollout_id}: wave {wave} starts ({size} device(s))", rollout,
                    data={"wave": wave, "size": size})
        return True

    def _baked(self, rollout: Rollout, wave: int, now: float) -> bool:
        """Bake a finished wave, then judge its telemetry gate; True when the next wave may start."""
        policy, doc = rollout.policy, rollout.doc
        if policy.bake_s <= 0 and policy.gate is None:
            return True
        if not doc.get("bake_started"):
            rollout.set_doc(bake_started=now, phase="baking")
            self._event("rollout", f"rollout {rollout.rollout_id}: wave {wave} finished; baking {policy.bake_s:.0f}s",
                        rollout, data={"wave": wave, "bake_s": policy.bake_s})
            return False
        if now - float(doc["bake_started"]) < policy.bake_s:
            return False
        if policy.gate is None:
            return True
        result = self._judge_gate(rollout, wave, policy.gate, float(doc["bake_started"]), now)
        figures = {"wave": wave, **result.figures}
        if result.passed:
            self._event("gate", f"rollout {rollout.rollout_id}: wave {wave} passed its gate: {result.reason}",
                        rollout, data=figures)
            return True
        if result.insufficient and now - float(doc["bake_started"]) < policy.bake_s + policy.wave_timeout_s:
            if doc.get("phase") != "waiting for telemetry":
                rollout.set_doc(phase="waiting for telemetry")
                self._event("gate", f"rollout {rollout.rollout_id}: wave {wave} keeps baking: {result.reason}",
                            rollout, data=figures)
            return False
        self._begin_rollback(rollout, f"wave {wave} failed its gate: {result.reason}", figures)
        return False

    def _judge_gate(self, rollout: Rollout, wave: int, gate: Gate, bake_started: float, now: float) -> Any:
        """Compare the wave's updated devices on the new bundle (over the bake) with their figures before."""
        devices = [d for d, r in rollout.rows.items() if r["wave"] == wave and r["state"] == "succeeded"]
        first_order = min((r["ordered_at"] for d, r in rollout.rows.items()
                           if d in devices and r["ordered_at"]), default=bake_started)
        span = max(rollout.policy.bake_s, 1.0)
        self._flush()  # the telemetry just ingested belongs in the figures
        sha = rollout.doc["target"]["bundle_sha256"]
        before = [r for r in self.store.telemetry(devices, first_order - span, first_order, model=rollout.model)
                  if r.get("bundle_sha256") != sha]
        after = self.store.telemetry(devices, bake_started, now, model=rollout.model)
        return gate.evaluate(stats_from_telemetry(before, model=rollout.model),
                             stats_from_telemetry(after, model=rollout.model, bundle_sha256=sha))

    def _order_due(self, rollout: Rollout, now: float, sends: list[tuple[str, ModelOrder]],
                   eligible: Any) -> bool:
        """Order pending online devices of the open waves, inside windows and at the policy's pace.

        True when devices are left that this tick had no room for (not: that the pace holds back).
        """
        if rollout.state == "succeeded" and rollout.doc.get("halted"):
            return False
        room = ORDER_BATCH - len(sends)
        if room <= 0:
            return True
        policy = rollout.policy
        waiting = []
        for device_id in rollout.ids("pending"):
            if not eligible(rollout.rows[device_id]):
                continue
            device = self._devices.get(device_id)
            if not device or not device.get("online"):
                continue
            if policy.windows and not in_window(policy.windows, now, self._report(device_id).utc_offset_min):
                continue
            waiting.append(device_id)
        if not waiting:
            return False
        wave = max(0, int(rollout.doc["current_wave"]))
        granted = rollout.pacer.take(policy, wave, now, min(len(waiting), room))
        rollout.doc_dirty = True
        for device_id in waiting[:granted]:
            previous = self._active_ref(device_id, rollout.model)
            rollout.set(device_id, state="updating", ordered_at=now, previous=previous, error=None)
            sends.append((device_id, self._model_order(rollout, rollout.target_of(device_id), False)))
        return len(waiting) > room and granted == room

    def _active_ref(self, device_id: str, model: str) -> dict[str, Any] | None:
        """What model ``model`` runs on the device now (the rollback target), or None."""
        report = self._report(device_id).model(model)
        active = report.active if report else None
        if active is None or not active.bundle_sha256 or not active.bundle_url:
            return None
        return {"bundle_sha256": active.bundle_sha256, "bundle_url": active.bundle_url,
                "model": {"name": active.name or model, "version": active.version}}

    @staticmethod
    def _model_order(rollout: Rollout, target: dict[str, Any] | None, rollback: bool) -> ModelOrder:
        name = rollout.model
        deployment_id = rollout.rollout_id + ("-rollback" if rollback else "")
        if target is None or target.get("action") == "remove":
            return ModelOrder(name, deployment_id, action=OrderAction.REMOVE, allow_downgrade=True,
                              rollout_id=rollout.rollout_id)
        # A deployment states the version its devices run, lower or not (removing a newer deployment
        # moves them back to the one below); an imperative rollout moves down only when rolling back.
        downgrade = rollback or rollout.doc.get("deployment") is not None
        return ModelOrder(name, deployment_id, target["bundle_url"], target["bundle_sha256"],
                          target["model"].get("version"), allow_downgrade=downgrade,
                          rollout_id=rollout.rollout_id)

    def _begin_rollback(self, rollout: Rollout, reason: str, figures: dict[str, Any]) -> None:
        rollout.set_doc(state="rolling-back", reason=reason, phase="rolling back", halted=True)
        self._event("rollback", f"rollout {rollout.rollout_id}: halting and rolling back: {reason}", rollout,
                    data=figures)

    def _rollback_step(self, rollout: Rollout, now: float, sends: list[tuple[str, ModelOrder]]) -> bool:
        """Send every ordered device its previous bundle (a remove when it ran nothing), in batches."""
        for device_id, row in rollout.rows.items():
            if len(sends) >= ORDER_BATCH:
                return True
            if row["state"] in ("updating", "succeeded", "failed") and row["ordered_at"]:
                sends.append((device_id, self._model_order(rollout, row.get("previous"), True)))
                rollout.set(device_id, state="rolled-back", finished_at=now)
        rollout.set_doc(state="rolled-back", phase="done", finished=now)
        self._event("rollout", f"rollout {rollout.rollout_id}: rolled back", rollout)
        return False

    # -- orders ------------------------------------------------------------------------------
    def _current_order(self, device_id: str) -> DesiredState | None:
        if device_id in self._orders:
            return self._orders[device_id]
        raw = self._desired_raw.pop(device_id, None)
        if raw is None:
            return None
        assert self._trust is not None
        current = own_order(_parsed("desired", device_id, raw), self._trust)
        if current is not None and current.device_id != device_id:
            current = None
        self._orders[device_id] = current
        self._sent[device_id] = _digest(raw)
        return current

    def _sign(self, sends: list[tuple[str, ModelOrder]]) -> list[tuple[str, dict[str, Any], DesiredState]]:
        """Signed desired messages (and the states they set) for ``sends`` plus the pending removals.

        Rows are flushed first. The orders become the devices' current ones once the broker has them.
        """
        removals, self._pending_removals = self._pending_removals, []
        for device_id, model in removals:
            sends.append((device_id, ModelOrder(model, f"d-remove-{int(time.time())}", action=OrderAction.REMOVE,
                                                allow_downgrade=True, rollout_id="d-remove")))
        if not sends:
            return []
        floors = {}
        for device_id, _ in sends:
            current = self._current_order(device_id)
            floors[device_id] = max(current.seq if current and current.seq is not None else -1,
                                    self._report(device_id).last_seq)
        self._flush(everything=False)  # the rows say "updating" in the store before any order leaves
        seqs = self.store.next_sequences(floors)
        expires = time.time() + self.order_ttl_s
        messages: dict[str, tuple[str, dict[str, Any], DesiredState]] = {}
        for device_id, order in sends:  # several orders for one device in one tick: the last message has all
            current = messages[device_id][2] if device_id in messages else self._current_order(device_id)
            message = compose_desired(device_id, current, order, seqs[device_id], expires, self._key)
            messages[device_id] = (device_id, message, DesiredState.from_message(message))
        return list(messages.values())

    # -- the API -------------------------------------------------------------------------------
    def _require_lead(self) -> None:
        if not self.leading:
            raise UnavailableError("this controller is a standby; another controller leads the store")

    def health(self) -> dict[str, Any]:
        """Leadership, store, broker and counts."""
        link = self.link
        return {"leader": self.leading, "holder": self.holder, "store": self.store.url,
                "broker": redact_url(self.broker_url),
                "connected": bool(link and link._connected.is_set()), "devices": len(self._devices),
                "deployments": len(self._deployments),
                "open_rollouts": sum(1 for r in self._rollouts.values() if r.open)}

    def devices(self, ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Devices known to the store (every one, or those of ``ids`` in that order), as ``fleet devices
        --json`` rows plus their deployments."""
        self._require_lead()
        with self.lock:
            chosen = sorted(self._devices) if ids is None else [d for d in ids if d in self._devices]
            return [self._device_doc(self._devices[d]) for d in chosen]

    def device_ids(self) -> list[str]:
        """Every device id known to the store, sorted."""
        self._require_lead()
        with self.lock:
            return sorted(self._devices)

    def _report(self, device_id: str) -> _Report:
        return (self._devices.get(device_id) or {}).get("report") or _NO_REPORT

    def _device_doc(self, row: dict[str, Any], report: dict[str, Any] | None = None) -> dict[str, Any]:
        report = row["report"].body() if report is None else report
        doc = device_row(row["device_id"], report, row.get("status") or {}, row.get("last_seen"))
        doc["deployments"] = dict(self._assigned.get(row["device_id"], {}))
        doc["first_seen"] = row.get("first_seen")
        doc["utc_offset_min"] = row["report"].utc_offset_min
        return doc

    def device(self, device_id: str) -> dict[str, Any]:
        """One device (NotFoundError when the store never heard of it)."""
        self._require_lead()
        with self.lock:
            row = self._devices.get(device_id)
            if row is None:
                raise NotFoundError(f"no device {device_id!r}; see `edgedeploy fleet devices`")
            report = row["report"].body()
            doc = self._device_doc(row, report)
            doc["reported"] = report
            return doc

    def deployments(self) -> list[dict[str, Any]]:
        """Every deployment with its counts: targeted, applied (running its bundle), failed."""
        self._require_lead()
        with self.lock:
            return [self._deployment_doc(dep) for _, dep in sorted(self._deployments.items())]

    def _deployment_doc(self, dep: Deployment) -> dict[str, Any]:
        rollout = self._rollouts.get(dep.rollout_id)
        failed = rollout.count("failed") if rollout else 0
        targeted = sum(1 for d in self._assigned.values() if d.get(dep.model) == dep.name)
        applied = sum(1 for d, m in self._assigned.items() if m.get(dep.model) == dep.name
                      and self._runs_target(d, dep.target()))
        return {"name": dep.name, "bundle_sha256": dep.spec["bundle_sha256"], "bundle_url": dep.spec["bundle_url"],
                "model": dep.spec["model"], "target": dep.condition.text, "priority": dep.priority,
                "targeted": targeted, "applied": applied, "failed": failed,
                "state": rollout.state if rollout else "unknown", "halted": bool(rollout and rollout.doc.get("halted")),
                "rollout_id": dep.rollout_id, "policy": dep.spec.get("policy", {}), "created": dep.spec.get("created")}

    def deploy(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Create or replace deployment ``spec["name"]``; its devices move in a new rollout."""
        self._require_lead()
        if not isinstance(spec, dict):
            raise UsageError("a deployment is a JSON object")
        name = str(spec.get("name") or "")
        try:
            check_model_name(name)
        except ValidationError:
            raise UsageError(f"field 'name': {name!r} is not a deployment name (letters, digits, '.', '_', '-')") \
                from None
        _check_spec(spec, "bundle_sha256", "bundle_url", "target")
        condition = parse_condition(str(spec["target"]))
        priority = spec.get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise UsageError("field 'priority' must be an integer")
        options = spec.get("policy") or {}
        if not isinstance(options, dict):
            raise UsageError("field 'policy' must be an object of rollout options")
        policy = RolloutPolicy.from_options(**options)
        now = time.time()
        with self.lock:
            old = self._deployments.get(name)
            generation = int(old.spec.get("generation", 0)) + 1 if old else 1
            stored = {"name": name, "bundle_sha256": spec["bundle_sha256"], "bundle_url": spec["bundle_url"],
                      "model": {"name": spec["model"]["name"], "version": spec["model"].get("version")},
                      "target": condition.text, "priority": priority, "policy": options,
                      "policy_doc": policy.to_dict(), "generation": generation,
                      "rollout_id": f"d-{name}-{generation}",
                      "created": old.spec["created"] if old else now, "updated": now}
            if old is not None and old.model != stored["model"]["name"]:
                raise AlreadyExistsError(f"deployment {name!r} deploys model {old.model!r}; "
                                    f"undeploy it before reusing the name for {stored['model']['name']!r}")
            dep = Deployment(name, stored, condition, policy)
            if old is not None:
                self._supersede(old)
            self._deployments[name] = dep
            self.store.put_deployment(name, stored)
            self._create_deployment_rollout(dep, now)
            self._event("deployment", f"deployment {name} {'updated' if old else 'created'}: "
                                      f"{stored['model']['name']} v{stored['model']['version']} to {condition.text!r} "
                                      f"(priority {priority})", self._rollouts[dep.rollout_id])
            self._flush()
            return self._deployment_doc(dep)

    def _supersede(self, old: Deployment) -> None:
        rollout = self._rollouts.get(old.rollout_id)
        if rollout is not None and rollout.state not in ("rolled-back",):
            rollout.set_doc(state="superseded", phase="done", finished=time.time())

    def _create_deployment_rollout(self, dep: Deployment, now: float) -> None:
        """Assign every matching device and plan the waves over those that do not run the bundle yet."""
        movers: list[str] = []
        already: list[str] = []
        offline: list[str] = []
        for device_id, device in self._devices.items():
            winner = self._winner(device, dep.model)
            before = self._assigned.get(device_id, {}).get(dep.model)
            if winner is None or winner.name != dep.name:
                continue
            if before is not None and before != dep.name and before in self._deployments:
                old = self._rollouts.get(self._deployments[before].rollout_id)
                if old is not None and device_id in old.rows:
                    old.set(device_id, state="moved", finished_at=now)
            self._assigned.setdefault(device_id, {})[dep.model] = dep.name
            if self._runs_target(device_id, dep.target()):
                already.append(device_id)
            elif device.get("online"):
                movers.append(device_id)
            else:
                offline.append(device_id)
        doc, rows = self._plan(dep.rollout_id, dep.target(), dep.policy, movers, now,
                               deployment=dep.name, selector=dep.condition.text)
        last = max(0, int(doc["waves"]) - 1)
        rows.update({d: _row(d, -1, "succeeded", finished_at=now) for d in already})
        rows.update({d: _row(d, last) for d in offline})
        self._add_rollout(doc, rows)

    def _plan(self, rollout_id: str, target: dict[str, Any], policy: RolloutPolicy, device_ids: list[str],
              now: float, deployment: str | None = None,
              selector: str | None = None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        waves = split_waves(device_ids, policy.canary, policy.wave)
        rows = {d: _row(d, i) for i, wave in enumerate(waves) for d in wave}
        doc = {"rollout_id": rollout_id, "target": target, "policy": policy.to_dict(), "state": "running",
               "deployment": deployment, "selector": selector, "waves": max(1, len(waves)), "current_wave": -1,
               "canary_wave": bool(policy.canary and len(waves) > 1), "created": now, "reason": "",
               "phase": "planned", "halted": False}
        return doc, rows

    def _add_rollout(self, doc: dict[str, Any], rows: dict[str, dict[str, Any]]) -> Rollout:
        rollout = Rollout(doc, rows)
        rollout.dirty = set(rows)
        rollout.doc_dirty = True
        self._rollouts[rollout.rollout_id] = rollout
        return rollout

    def undeploy(self, name: str) -> dict[str, Any]:
        """Remove a deployment: its devices move to their next match, or lose the model."""
        self._require_lead()
        with self.lock:
            dep = self._deployments.pop(name, None)
            if dep is None:
                raise NotFoundError(f"no deployment {name!r}; see `edgedeploy fleet deployments`")
            self._supersede(dep)
            self.store.delete_deployment(name)
            moved = [d for d, m in self._assigned.items() if m.get(dep.model) == name]
            self._reassess.update(moved)
            self._event("deployment", f"deployment {name} removed; {len(moved)} device(s) move to their next match",
                        self._rollouts.get(dep.rollout_id), data={"devices": len(moved)})
            self._flush()
            return {"name": name, "removed": True, "devices": len(moved)}

    def start_rollout(self, spec: dict[str, Any]) -> str:
        """An imperative rollout (``fleet rollout`` through the controller) over the selected online devices."""
        self._require_lead()
        if not isinstance(spec, dict):
            raise UsageError("a rollout is a JSON object")
        _check_spec(spec, "bundle_sha256", "bundle_url", "selector")
        chosen = DeviceSelector.parse(str(spec["selector"]))
        options = spec.get("policy") or {}
        if not isinstance(options, dict):
            raise UsageError("field 'policy' must be an object of rollout options")
        policy = RolloutPolicy.from_options(**options)
        now = time.time()
        with self.lock:
            rows = list(self._devices.values())
            picked = [r["device_id"] for r in rows if chosen.matches(r) and (r["online"] or chosen.kind == "device")]
            if chosen.kind == "device":
                missing = sorted(set(chosen.values) - set(picked))
                if missing:
                    raise NotFoundError(f"unknown device(s): {', '.join(missing)}; see `edgedeploy fleet devices`")
            rollout_id = f"r-{time.strftime('%Y%m%d%H%M%S', time.gmtime(now))}-{_token()}"
            target = {"bundle_sha256": spec["bundle_sha256"], "bundle_url": spec["bundle_url"],
                      "model": {"name": spec["model"]["name"], "version": spec["model"].get("version")}}
            doc, plan_rows = self._plan(rollout_id, target, policy, picked, now, selector=chosen_text(chosen))
            if not picked:
                doc.update(state="failed", reason=f"no device matches {spec['selector']!r}", phase="done")
            rollout = self._add_rollout(doc, plan_rows)
            self._event("rollout", f"rollout {rollout_id}: {target['model']['name']} v{target['model']['version']} "
                                   f"to {len(picked)} device(s) in {rollout.waves()} wave(s)", rollout,
                        data={"devices": len(picked)})
            self._flush()
            return rollout_id

    def rollouts(self) -> list[dict[str, Any]]:
        """Short status of every rollout, oldest first."""
        self._require_lead()
        with self.lock:
            docs = [r.status() for r in sorted(self._rollouts.values(), key=lambda r: r.doc["created"])]
        keys = ("rollout_id", "state", "succeeded", "failed", "pending", "selector", "deployment", "created")
        return [{k: d.get(k) for k in keys} for d in docs]

    def _rollout(self, rollout_id: str) -> Rollout:
        rollout = self._rollouts.get(rollout_id)
        if rollout is None:
            raise NotFoundError(f"no rollout {rollout_id!r}; see `edgedeploy fleet status`")
        return rollout

    def rollout_status(self, rollout_id: str, detail: bool = False) -> dict[str, Any]:
        """One rollout's ``fleet status --json`` document."""
        self._require_lead()
        with self.lock:
            rollout = self._rollout(rollout_id)
            rows = None
            if detail and not rollout.loaded:
                rows = {r["device_id"]: r for r in self.store.rollout_devices(rollout_id)}
            return rollout.status(detail, rows)

    def abort(self, rollout_id: str) -> dict[str, Any]:
        """Halt a rollout and send every updated device its previous bundle."""
        self._require_lead()
        with self.lock:
            rollout = self._rollout(rollout_id)
            if rollout.state in ("rolled-back", "failed", "superseded") or \
                    (rollout.state == "succeeded" and rollout.doc.get("deployment") is None):
                raise AlreadyExistsError(f"rollout {rollout_id} already ended ({rollout.state})")
            self._begin_rollback(rollout, "aborted by the user", {})
            self._flush()
        return self.rollout_status(rollout_id)

    def events(self, limit: int = 200, device_id: str | None = None, rollout_id: str | None = None,
               deployment: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
        """The event log, newest first."""
        self._require_lead()
        with self.lock:
            self._flush()
        return self.store.events(limit=max(1, min(int(limit), 5000)), device_id=device_id, rollout_id=rollout_id,
                                 deployment=deployment, since=since)

    def telemetry(self, device_id: str | None = None, deployment: str | None = None, since: float | None = None,
                  until: float | None = None) -> dict[str, Any]:
        """Telemetry rows of a device or of a deployment's devices, with throughput derived from the counters."""
        self._require_lead()
        now = time.time()
        since = now - 3600 if since is None else float(since)
        with self.lock:
            if deployment is not None:
                dep = self._deployments.get(deployment)
                if dep is None:
                    raise NotFoundError(f"no deployment {deployment!r}")
                devices: list[str] | None = sorted(d for d, m in self._assigned.items()
                                                   if m.get(dep.model) == deployment)
                model: str | None = dep.model
            elif device_id is not None:
                if device_id not in self._devices:
                    raise NotFoundError(f"no device {device_id!r}")
                devices, model = [device_id], None
            else:
                raise UsageError("give a device or a deployment")
            self._flush()
        # a deployment's plots: its model's samples and its devices' own (CPU, memory: model None)
        rows = self.store.telemetry(devices, since, until) if devices else []
        rows = [r for r in rows if model is None or r.get("model") in (model, None)]
        return {"device_id": device_id, "deployment": deployment, "since": since, "until": until,
                "rows": _with_throughput(rows)}

    def request(self, device_id: str, op: str, args: dict[str, Any] | None = None, model: str | None = None,
                timeout: float = 10.0) -> dict[str, Any]:
        """An operation on one device over MQTT (logs, config, get-config, restart); waits for its answer."""
        self._require_lead()
        with self.lock:
            if device_id not in self._devices:
                raise NotFoundError(f"no device {device_id!r}; see `edgedeploy fleet devices`")
            if self._ops is None:
                from packager.fleet_ops import FleetOps

                if self.link is None:
                    raise UnavailableError("the controller is not connected to the broker yet; retry")
                self._ops = FleetOps(self.link, self.home)
        return dict(self._ops.request(device_id, op, args or {}, model=model, timeout=timeout))

    def select(self, selector: str) -> list[str]:
        """Device ids a ``--to`` selector or a target condition picks."""
        self._require_lead()
        with self.lock:
            try:
                chosen = DeviceSelector.parse(selector)
                return sorted(d for d, row in self._devices.items() if chosen.matches(row))
            except UsageError:
                condition = parse_condition(selector)
                return sorted(d for d, row in self._devices.items()
                              if condition.matches(_condition_view(row, condition)))


# -- small helpers ---------------------------------------------------------------------------------
def _token() -> str:
    import secrets

    return secrets.token_hex(3)


def chosen_text(selector: DeviceSelector) -> str:
    """A selector written back as ``--to`` takes it."""
    if selector.kind == "all":
        return "all"
    if selector.kind == "tag":
        return f"tag:{selector.values[0]}={selector.values[1]}"
    return f"{selector.kind}:{','.join(selector.values)}"


def _from_store(row: dict[str, Any]) -> dict[str, Any]:
    """An engine device row from a store row (whose ``reported`` is its JSON text)."""
    raw = (row.pop("reported", None) or "{}").encode()
    reported = json.loads(raw)
    row["report"] = _Report(raw, reported if isinstance(reported, dict) else {})
    return row


def _to_store(row: dict[str, Any]) -> dict[str, Any]:
    """A store row: the report goes as the device sent it, unless it must be cleaned first."""
    report: _Report = row["report"]
    return {**row, "reported": raw_json(report.raw) or report.body()}


def _condition_view(device: dict[str, Any], *conditions: Condition) -> dict[str, Any]:
    """What a target condition sees of a device row (the whole report only for those that read it)."""
    reads_report = any(f == "reported" or f.startswith("reported.") for c in conditions for f in c.fields)
    return {"device_id": device["device_id"], "profile": device.get("profile"), "groups": device.get("groups") or [],
            "tags": device.get("tags") or {}, "online": bool(device.get("online")),
            "reported": device["report"].body() if reads_report else {}}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _digest(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


def _parsed(kind: str, device_id: str, payload: bytes) -> dict[str, Any] | None:
    """A device message checked as the contract says; None (and a log line) when it is refused."""
    try:
        return parse_message(kind, payload)
    except ValidationError as exc:
        log.info("ignoring %s's %s message: %s", device_id, kind, exc)
        return None


def _telemetry_rows(device_id: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Store rows of one telemetry message: a device-level row and one per model."""
    ts = _number(body.get("ts")) or time.time()
    rows = [{"device_id": device_id, "ts": ts, "model": None, "version": None, "bundle_sha256": None,
             "requests": None, "errors": None, "p50_ms": None, "p95_ms": None, "p99_ms": None,
             "cpu_percent": _number(body.get("cpu_percent")), "memory_rss_mb": _number(body.get("memory_rss_mb"))}]
    models = body.get("models")
    for name, stats in (models.items() if isinstance(models, dict) else []):
        if not isinstance(stats, dict):
            continue
        version = stats.get("version")
        rows.append({"device_id": device_id, "ts": ts, "model": str(name)[:128],
                     "version": str(version)[:64] if version is not None else None,
                     "bundle_sha256": str(stats.get("bundle_sha256") or "")[:64] or None,
                     "requests": _number(stats.get("requests")), "errors": _number(stats.get("errors")),
                     "p50_ms": _number(stats.get("p50_ms")), "p95_ms": _number(stats.get("p95_ms")),
                     "p99_ms": _number(stats.get("p99_ms")), "cpu_percent": None, "memory_rss_mb": None})
    return rows


def _with_throughput(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows plus ``throughput_rps`` and ``error_rps`` from consecutive counters of one device and model."""
    last: dict[tuple[str, str | None], dict[str, Any]] = {}
    out = []
    for row in rows:
        row = dict(row)
        key = (row["device_id"], row.get("model"))
        prev = last.get(key)
        row["throughput_rps"] = row["error_rps"] = None
        if prev is not None and row.get("requests") is not None and prev.get("requests") is not None:
            dt = row["ts"] - prev["ts"]
            if dt > 0 and row["requests"] >= prev["requests"]:
                row["throughput_rps"] = round((row["requests"] - prev["requests"]) / dt, 3)
                row["error_rps"] = round(((row.get("errors") or 0) - (prev.get("errors") or 0)) / dt, 3)
        last[key] = row
        out.append(row)
    return out


def _device_event_line(body: dict[str, Any]) -> str:
    model = body.get("model") or ""
    line = f"{body.get('device_id')}: {model + ' ' if model else ''}{body.get('from') or '?'} -> {body.get('to')}"
    if body.get("reason"):
        line += f" ({brief(str(body['reason']), 300)})"
    if body.get("refused"):
        line += f" refused: {brief(str(body['refused']), 300)}"
    return line
