"""The device bundle store: transition table, persistence, and crash recovery with real bundles."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_agent.bundle import BundleManifest, bundle_sha256, open_bundle
from edge_agent.errors import DeploymentError, ValidationError
from edge_agent.profiles import load_profile
from edge_agent.store import IN_PROGRESS, TRANSITIONS, BundleStore, DeployState, Event, next_state
from edge_agent.tensors import TensorSpec
from packager.bundle import write_bundle
from packager.keys import SigningKey

ROOT = Path(__file__).resolve().parents[1]
ENTRY = b"VERSION = %d\n\ndef init():\n    pass\n\ndef run(data):\n    return {'version': VERSION}\n"


def script_bundle(out: Path, key: SigningKey, version: int, script: bytes | None = None,
                  name: str = "scorer") -> Path:
    """A small signed entry-script bundle answering ``{"version": N}`` (shared by the agent tests)."""
    manifest = BundleManifest(
        model={"name": name, "version": version},
        profile=load_profile("cpu-x86_64").to_dict(),
        runtime={"backend": "entry-script", "model_path": "model/params.json", "precision": "fp32",
                 "execution_providers": ["CPUExecutionProvider"], "optimization_level": "basic"},
        inputs=[TensorSpec("data", "FP32", (-1, 2))], outputs=[],
        entry_script={"script": "src/score.py", "source_dir": "src", "requirements": None},
        samples={"input": "samples/input.json", "output": None},
    )
    payload: dict[str, Path | bytes] = {"src/score.py": script if script is not None else ENTRY % version,
                                        "model/params.json": b'{"v": %d}' % version,
                                        "samples/input.json": b'{"data": [[1.0, 2.0]]}'}
    write_bundle(out, manifest, payload, key)
    return out


def order_for(bundle: Path, deployment_id: str, version: int) -> dict:
    sha = bundle_sha256(bundle)
    return {"deployment_id": deployment_id, "bundle_url": f"http://127.0.0.1:1/bundles/{sha}.edb",
            "bundle_sha256": sha, "model": {"name": "scorer", "version": version}}


def install(store: BundleStore, bundle: Path, order: dict) -> str:
    """Run one deployment through every state to active, as the daemon does."""
    store.begin(order)
    store.advance(Event.OK)
    slot = store.deployment["slot"]
    open_bundle(bundle, store.prepare_slot(slot))
    store.advance(Event.OK)
    store.advance(Event.OK)
    store.commit(slot, {"bundle_sha256": order["bundle_sha256"], "model": order["model"]})
    store.advance(Event.OK)
    return slot


def test_transition_table_success_and_failure_successors() -> None:
    chain = [DeployState.DOWNLOADING, DeployState.VERIFYING, DeployState.INSTALLING, DeployState.HEALTH_CHECKING,
             DeployState.ACTIVE]
    for state, successor in zip(chain, chain[1:], strict=False):
        assert next_state(state, Event.OK) is successor
        assert next_state(state, Event.FAIL) is DeployState.FAILED
        assert next_state(state, Event.RESTORE) is DeployState.ROLLED_BACK
    for state in (DeployState.IDLE, DeployState.ACTIVE, DeployState.FAILED, DeployState.ROLLED_BACK):
        assert next_state(state, Event.START) is DeployState.DOWNLOADING
        assert next_state(state, Event.REMOVE) is DeployState.IDLE
    assert next_state(DeployState.FAILED, Event.RESTORE) is DeployState.ROLLED_BACK
    assert set(TRANSITIONS) == set(DeployState)
    for state in (DeployState.IDLE, DeployState.ACTIVE):
        with pytest.raises(DeploymentError, match="no transition"):
            next_state(state, Event.OK)
    for state in IN_PROGRESS:
        with pytest.raises(DeploymentError):
            next_state(state, Event.START)  # one deployment at a time


def test_state_and_slots_survive_a_restart(tmp_path: Path, signing_key: SigningKey) -> None:
    v1 = script_bundle(tmp_path / "v1.edb", signing_key, 1)
    store = BundleStore(tmp_path / "data")
    slot = install(store, v1, order_for(v1, "d1", 1))
    again = BundleStore(tmp_path / "data")
    assert again.state is DeployState.ACTIVE
    assert again.active["slot"] == slot and again.active["bundle_sha256"] == bundle_sha256(v1)
    assert again.inactive_slot() != slot
    with pytest.raises(DeploymentError, match="active"):
        again.prepare_slot(slot)


@pytest.mark.parametrize("state", [s.value for s in IN_PROGRESS])
def test_recover_from_every_intermediate_state_serves_the_last_good_bundle(
        tmp_path: Path, signing_key: SigningKey, state: str) -> None:
    v1 = script_bundle(tmp_path / "v1.edb", signing_key, 1)
    v2 = script_bundle(tmp_path / "v2.edb", signing_key, 2)
    store = BundleStore(tmp_path / "data")
    good = install(store, v1, order_for(v1, "d1", 1))
    store.begin(order_for(v2, "d2", 2))
    target = store.deployment["slot"]
    while store.state.value != state:
        store.advance(Event.OK)
    if state != "downloading":  # a torn unpack: files there, manifest (written last) missing
        open_bundle(v2, store.prepare_slot(target))
        (store.slot_path(target) / "manifest.json").unlink()

    recovered = BundleStore(tmp_path / "data")
    assert recovered.recover() is DeployState.ROLLED_BACK
    assert "interrupted" in recovered.deployment["error"]
    assert recovered.active["slot"] == good and recovered.slot_complete(good)
    assert recovered.active["bundle_sha256"] == bundle_sha256(v1)
    assert not recovered.slot_path(target).exists()


def test_recover_after_the_commit_keeps_the_new_bundle(tmp_path: Path, signing_key: SigningKey) -> None:
    v1 = script_bundle(tmp_path / "v1.edb", signing_key, 1)
    v2 = script_bundle(tmp_path / "v2.edb", signing_key, 2)
    store = BundleStore(tmp_path / "data")
    install(store, v1, order_for(v1, "d1", 1))
    order = order_for(v2, "d2", 2)
    store.begin(order)
    store.advance(Event.OK)
    slot = store.deployment["slot"]
    open_bundle(v2, store.prepare_slot(slot))
    store.advance(Event.OK)
    store.advance(Event.OK)
    store.commit(slot, {"bundle_sha256": order["bundle_sha256"], "model": order["model"]})  # crash right after
    recovered = BundleStore(tmp_path / "data")
    assert recovered.recover() is DeployState.ACTIVE
    assert recovered.active["bundle_sha256"] == bundle_sha256(v2)
    assert recovered.previous["bundle_sha256"] == bundle_sha256(v1)


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from edge_agent.store import BundleStore, Event
    from edge_agent.bundle import open_bundle
    data, bundle, sha, commit = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "commit"
    store = BundleStore(Path(data))
    store.begin({"deployment_id": "d2", "bundle_url": "http://127.0.0.1:1/x", "bundle_sha256": sha,
                 "model": {"name": "scorer", "version": 2}})
    store.advance(Event.OK)
    slot = store.deployment["slot"]
    target = store.prepare_slot(slot)
    store.advance(Event.OK)  # installing
    open_bundle(bundle, target)
    if commit:
        store.commit(slot, {"bundle_sha256": sha, "model": {"name": "scorer", "version": 2}})
    else:
        (target / "manifest.json").unlink()  # as if killed before the unpack finished
    print("ready", flush=True)
    sys.stdin.read()
""")


@pytest.mark.parametrize("commit", [False, True])
def test_kill_9_during_install_then_recovery_leaves_a_complete_slot(
        tmp_path: Path, signing_key: SigningKey, commit: bool) -> None:
    v1 = script_bundle(tmp_path / "v1.edb", signing_key, 1)
    v2 = script_bundle(tmp_path / "v2.edb", signing_key, 2)
    install(BundleStore(tmp_path / "data"), v1, order_for(v1, "d1", 1))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "data"), str(v2), bundle_sha256(v2),
                             "commit" if commit else "no"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.stdin.close()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    store = BundleStore(tmp_path / "data")
    state = store.recover()
    expected = v2 if commit else v1
    assert state is (DeployState.ACTIVE if commit else DeployState.ROLLED_BACK)
    assert store.active["bundle_sha256"] == bundle_sha256(expected)
    assert store.slot_complete(store.active["slot"])


def test_a_single_model_data_dir_moves_under_its_model_name_and_models_keep_their_own_slots(
        tmp_path: Path, signing_key: SigningKey) -> None:
    from edge_agent.store import ModelStores

    bundle = script_bundle(tmp_path / "v1.edb", signing_key, 1)
    legacy = BundleStore(tmp_path / "data")  # the layout before several models per device
    slot = install(legacy, bundle, order_for(bundle, "d-1", 1))
    stores = ModelStores(tmp_path / "data")
    scorer = stores.get("scorer")
    assert [name for name, _ in stores.items()] == ["scorer"] and scorer.state == DeployState.ACTIVE
    assert scorer.active["slot"] == slot and scorer.slot_complete(slot)
    assert not (tmp_path / "data" / "store.json").exists() and not (tmp_path / "data" / "slots").exists()

    detector = stores.get("detector")
    assert detector.state == DeployState.IDLE and detector.inactive_slot() == "a"
    install(detector, script_bundle(tmp_path / "d1.edb", signing_key, 1, name="detector"),
            dict(order_for(bundle, "d-2", 1), model={"name": "detector", "version": 1}))
    again = ModelStores(tmp_path / "data")  # after a restart, both are there, each with its own slots
    assert {name: s.active["model"]["name"] for name, s in again.items()} == {"detector": "detector",
                                                                            "scorer": "scorer"}
    assert again.latest() == "detector" and again.get("scorer").slot_complete(slot)
    with pytest.raises(ValidationError, match="invalid model name"):
        again.get("../escape")
