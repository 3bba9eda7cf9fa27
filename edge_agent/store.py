"""The bundle stores on a device: per named model, two slots (A/B) and a persisted state machine.

Layout under ``data_dir``::

    models/<name>/slots/a/, slots/b/   unpacked, verified bundles (manifest.json is written last)
    models/<name>/store.json           which slot is active and which is the previous (last good) one
    models/<name>/deployment.json      the model's current deployment: state, order, target slot, error
    downloads/<sha>.part               partial downloads, shared (resumed with Range)
    orders.json                        the last applied order's sequence (edge_agent.orders)

Each model is one :class:`BundleStore`; :class:`ModelStores` holds them all. A data_dir of the
single-model layout (``slots/``, ``store.json`` at the top) is moved under ``models/<its name>/``
the first time :class:`ModelStores` opens it.

``store.json`` is the commit point: a bundle is live once it is written there. The deployment
state is written (atomically) *before* each step is entered, so after a kill -9 :meth:`recover`
knows what was going on and resolves it to a complete slot, never a half-installed one.
"""

from __future__ import annotations

import logging
import shutil
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

from edge_agent.atomic import atomic_write_json, read_json
from edge_agent.bundle import load_extracted
from edge_agent.errors import BundleError, DeploymentError, ValidationError
from edge_agent.fleet_messages import DeployState, check_model_name

__all__ = ["IN_PROGRESS", "SLOTS", "TRANSITIONS", "BundleStore", "DeployState", "Event", "ModelStores",
           "next_state"]

log = logging.getLogger(__name__)

SLOTS = ("a", "b")


class Event(StrEnum):
    """What happened to move a deployment on."""

    START = "start"        # a new desired state arrived
    OK = "ok"              # the current step succeeded
    FAIL = "fail"          # the current step failed; the last good bundle still serves
    RESTORE = "restore"    # an interrupted or failed deployment was undone to the last good bundle
    REMOVE = "remove"      # the controller removed the model
    KEEP = "keep"          # the ordered bundle is the one already active: nothing to install


S, E = DeployState, Event
# The one transition table: (state, event) -> next state. Anything else is a bug.
TRANSITIONS: dict[DeployState, dict[Event, DeployState]] = {
    S.IDLE: {E.START: S.DOWNLOADING, E.REMOVE: S.IDLE},
    S.DOWNLOADING: {E.OK: S.VERIFYING, E.FAIL: S.FAILED, E.RESTORE: S.ROLLED_BACK},
    S.VERIFYING: {E.OK: S.INSTALLING, E.FAIL: S.FAILED, E.RESTORE: S.ROLLED_BACK},
    S.INSTALLING: {E.OK: S.HEALTH_CHECKING, E.FAIL: S.FAILED, E.RESTORE: S.ROLLED_BACK},
    S.HEALTH_CHECKING: {E.OK: S.ACTIVE, E.FAIL: S.FAILED, E.RESTORE: S.ROLLED_BACK},
    S.ACTIVE: {E.START: S.DOWNLOADING, E.REMOVE: S.IDLE, E.KEEP: S.ACTIVE},
    S.FAILED: {E.START: S.DOWNLOADING, E.RESTORE: S.ROLLED_BACK, E.REMOVE: S.IDLE, E.KEEP: S.ACTIVE},
    S.ROLLED_BACK: {E.START: S.DOWNLOADING, E.REMOVE: S.IDLE, E.KEEP: S.ACTIVE},
}
IN_PROGRESS = (S.DOWNLOADING, S.VERIFYING, S.INSTALLING, S.HEALTH_CHECKING)
del S, E


def next_state(state: DeployState, event: Event) -> DeployState:
    """The successor of ``state`` on ``event``; DeploymentError for a move the table forbids."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise DeploymentError(f"no transition from {state.value!r} on {event.value!r}") from None


class BundleStore:
    """A/B slots plus the persisted deployment record of one device."""

    def __init__(self, data_dir: Path, downloads: Path | None = None) -> None:
        self.root = Path(data_dir)
        self.slots_dir = self.root / "slots"
        self.downloads = downloads or self.root / "downloads"
        self._store_file = self.root / "store.json"
        self._deploy_file = self.root / "deployment.json"
        self.slots_dir.mkdir(parents=True, exist_ok=True)
        self.downloads.mkdir(parents=True, exist_ok=True)
        self.pointers: dict[str, Any] = self._read(self._store_file, {"active": None, "previous": None})
        self.deployment: dict[str, Any] = self._read(self._deploy_file, {"state": DeployState.IDLE.value})

    @staticmethod
    def _read(path: Path, default: dict[str, Any]) -> dict[str, Any]:
        if not path.is_file():
            return dict(default)
        try:
            doc = read_json(path)
        except (OSError, ValueError):
            log.warning("%s is unreadable; starting from defaults", path)
            return dict(default)
        return doc if isinstance(doc, dict) else dict(default)

    # --- state ---------------------------------------------------------------------------------
    @property
    def state(self) -> DeployState:
        """The persisted state of the current (or last) deployment."""
        return DeployState(self.deployment.get("state", "idle"))

    @property
    def active(self) -> dict[str, Any] | None:
        """The committed live bundle: {slot, bundle_sha256, bundle_url, model, deployment_id}."""
        return self.pointers.get("active")

    @property
    def previous(self) -> dict[str, Any] | None:
        """The last good bundle before the active one (it keeps its slot until the next install)."""
        return self.pointers.get("previous")

    def slot_path(self, slot: str) -> Path:
        """Folder of slot ``a`` or ``b``."""
        if slot not in SLOTS:
            raise DeploymentError(f"unknown slot {slot!r}")
        return self.slots_dir / slot

    def inactive_slot(self) -> str:
        """The slot a new bundle installs into: never the active one."""
        active = (self.active or {}).get("slot")
        return "b" if active == "a" else "a"

    def begin(self, order: dict[str, Any]) -> DeployState:
        """Start a deployment of ``order`` (a desired message); persisted before downloading."""
        state = next_state(self.state, Event.START)
        deployment = {"state": state.value, "deployment_id": order.get("deployment_id"),
                      "order": order, "slot": self.inactive_slot(), "error": None,
                      "from": self.state.value, "ts": time.time()}
        atomic_write_json(self._deploy_file, deployment)  # a failed write leaves the old state in force
        self.deployment = deployment
        return state

    def advance(self, event: Event, error: str | None = None) -> DeployState:
        """Move on by ``event`` and persist the new state before the caller enters it."""
        state = next_state(self.state, event)
        failing = event in (Event.FAIL, Event.RESTORE)
        self.deployment.update(state=state.value, error=(error or self.deployment.get("error")) if failing else None,
                               ts=time.time())
        self._save_deployment()
        return state

    def _save_deployment(self) -> None:
        atomic_write_json(self._deploy_file, self.deployment)

    # --- slots ---------------------------------------------------------------------------------
    def prepare_slot(self, slot: str) -> Path:
        """Empty ``slot`` for a fresh install (refuses the active slot)."""
        if slot == (self.active or {}).get("slot"):
            raise DeploymentError(f"slot {slot} is active; refusing to overwrite it")
        path = self.slot_path(slot)
        shutil.rmtree(path, ignore_errors=True)
        if self.previous and self.previous.get("slot") == slot:
            self.pointers["previous"] = dict(self.previous, slot=None)  # its files are gone now
        return path

    def slot_complete(self, slot: str | None) -> bool:
        """True when ``slot`` holds a fully unpacked bundle (its manifest, written last, is there)."""
        if not slot:
            return False
        try:
            load_extracted(self.slot_path(slot))
        except BundleError:
            return False
        return True

    def commit(self, slot: str, info: dict[str, Any]) -> None:
        """Make ``slot`` the active bundle (the commit point), keeping the old one as previous."""
        old = self.active
        self.pointers = {"active": dict(info, slot=slot), "previous": old}
        atomic_write_json(self._store_file, self.pointers)

    def remove_active(self) -> None:
        """Forget the active bundle (the controller removed the model); it becomes the previous."""
        self.pointers = {"active": None, "previous": self.active}
        atomic_write_json(self._store_file, self.pointers)

    def recover(self) -> DeployState:
        """Resolve an interrupted deployment after a crash; returns the resulting state.

        Committed (store.json names the order's bundle) → ``active``; anything else in progress →
        the half-written slot is removed and the state is ``rolled-back`` with the reason.
        A corrupt active slot falls back to the previous slot when that one is complete.
        """
        state = self.state
        if state in IN_PROGRESS:
            order = self.deployment.get("order") or {}
            active = self.active or {}
            if active.get("bundle_sha256") and active.get("bundle_sha256") == order.get("bundle_sha256"):
                log.info("deployment %s had been committed before the restart", self.deployment.get("deployment_id"))
                self.deployment.update(state=DeployState.ACTIVE.value, error=None, ts=time.time())
                self._save_deployment()
            else:
                slot = self.deployment.get("slot")
                if slot and slot != active.get("slot"):
                    shutil.rmtree(self.slot_path(slot), ignore_errors=True)
                reason = f"interrupted while {state.value}; restored the last good bundle"
                log.warning("deployment %s %s", self.deployment.get("deployment_id"), reason)
                self.deployment["interrupted"] = True
                self.advance(Event.RESTORE, reason)
        self._check_active_slot()
        return self.state

    def _check_active_slot(self) -> None:
        active = self.active
        if active is None or self.slot_complete(active.get("slot")):
            return
        previous = self.previous
        if previous is not None and self.slot_complete(previous.get("slot")):
            log.error("active slot %s is incomplete; falling back to the previous bundle", active.get("slot"))
            self.pointers = {"active": previous, "previous": None}
        else:
            log.error("active slot %s is incomplete and no previous bundle is left", active.get("slot"))
            self.pointers = {"active": None, "previous": None}
        atomic_write_json(self._store_file, self.pointers)


class ModelStores:
    """Every named model's :class:`BundleStore` on one device, created on first use."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self.models_dir = self.root / "models"
        self.downloads = self.root / "downloads"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self._migrate_single_model_layout()
        self._stores: dict[str, BundleStore] = {}
        for folder in sorted(self.models_dir.iterdir()):
            if folder.is_dir() and not folder.name.startswith("."):
                self._stores[folder.name] = BundleStore(folder, self.downloads)

    def get(self, name: str) -> BundleStore:
        """The store of model ``name`` (a new, idle one the first time)."""
        if name not in self._stores:
            self._stores[check_model_name(name)] = BundleStore(self.models_dir / name, self.downloads)
        return self._stores[name]

    def items(self) -> list[tuple[str, BundleStore]]:
        """(name, store) of every model this device has had, by name."""
        return sorted(self._stores.items())

    def latest(self) -> str | None:
        """The model whose deployment changed last (what schema 1's single-model fields describe)."""
        dated = [(store.deployment.get("ts") or 0.0, name) for name, store in self._stores.items()]
        return max(dated)[1] if dated else None

    def _migrate_single_model_layout(self) -> None:
        """Move a pre-v2 data_dir's one model under ``models/<name>/`` (rename: atomic per entry)."""
        old = BundleStore._read(self.root / "store.json", {})
        record = BundleStore._read(self.root / "deployment.json", {})
        if not old and not record:
            return
        pointer = old.get("active") or old.get("previous") or {}
        model = pointer.get("model") or (record.get("order") or {}).get("model") or {}
        try:
            name = check_model_name(model.get("name"))
        except ValidationError:
            log.warning("the single-model store in %s names no valid model; starting empty", self.root)
            return
        target = self.models_dir / name
        target.mkdir(parents=True, exist_ok=True)
        # store.json moves last: until then a restart finds the old layout and finishes the move.
        for entry in ("slots", "deployment.json", "store.json"):
            if (self.root / entry).exists():
                (self.root / entry).replace(target / entry)
        log.info("moved the single-model store of %r under %s", name, target)
