"""What the TUF end-to-end tests share: a device that trusts the repository's root, the honest bundle
server, an attacker's mirror (a static copy of the repository folder, served by ``http.server``) and
the attacker's tools (re-signing metadata with keys it stole)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, TargetFile
from tuf.api.serialization.json import JSONSerializer

from edge_agent.bundle import bundle_sha256
from edge_agent.tuf_fetch import target_name
from packager.bundle_server import BundleServer, publish_bundle
from packager.keys import SigningKey, export_public_key
from packager.tuf_repo import TufRepository
from tests.e2e.conftest import ROOT
from tests.test_agent_mqtt import Observer, score, signed, start_agent
from tests.test_store import script_bundle


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``edgedeploy`` (packager.cli.main) or ``edge-agent`` (edge_agent.cli), as a user runs it."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=os.environ.copy(), cwd=ROOT, timeout=120)


class _MirrorHandler(SimpleHTTPRequestHandler):
    """Static files, except the paths the attacker made endless (sent without a length, forever)."""

    server: _MirrorServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path not in self.server.endless:
            super().do_GET()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        chunk = b"\0" * 65536
        while not self.server.stopping.is_set():
            try:
                self.wfile.write(chunk)
            except OSError:  # the device hung up: what it should do
                return


class _MirrorServer(ThreadingHTTPServer):
    daemon_threads = True
    endless: set[str]
    stopping: threading.Event


@dataclass
class Mirror:
    """The attacker's server: whatever is in ``folder`` (``bundles/`` and ``metadata/``), at ``url``."""

    folder: Path
    url: str
    endless: set[str] = field(default_factory=set)

    @property
    def metadata(self) -> Path:
        return self.folder / "metadata"

    def copy(self, home: Path) -> None:
        """Serve a copy of the honest repository folder as it is now."""
        for name in ("bundles", "metadata"):
            shutil.rmtree(self.folder / name, ignore_errors=True)
            shutil.copytree(home / name, self.folder / name)


@contextmanager
def serve_mirror(folder: Path) -> Iterator[Mirror]:
    """The attacker's server, on a free port until the block ends."""
    folder.mkdir()
    httpd = _MirrorServer(("127.0.0.1", 0), functools.partial(_MirrorHandler, directory=str(folder)))
    httpd.endless, httpd.stopping = set(), threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    served = Mirror(folder, f"http://127.0.0.1:{httpd.server_address[1]}", httpd.endless)
    try:
        yield served
    finally:
        httpd.stopping.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@contextmanager
def serve_origin(home: Path) -> Iterator[str]:
    """The honest bundle server (``edgedeploy serve``'s server), serving bundles and metadata."""
    server = BundleServer(home=home)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@dataclass
class Device:
    """A real ``edge-agent --config`` process trusting the repository's first root, and its broker observer."""

    observer: Observer
    config: Path
    log: Path
    proc: Any = None

    def start(self) -> None:
        self.proc = start_agent(self.config, self.log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def order(self, base: str, bundle: Path, version: int, deployment_id: str, **extra: Any) -> None:
        """A signed order (the controller's: the attacker cannot forge it) to fetch ``bundle`` from ``base``."""
        sha = bundle_sha256(bundle)
        self.observer.desire(signed({"deployment_id": deployment_id, "bundle_url": f"{base}/bundles/{sha}.edb",
                                     "bundle_sha256": sha, "model": {"name": "scorer", "version": version},
                                     "allow_downgrade": False, "rollout_id": None, **extra}))

    def wait(self, deployment_id: str, state: str) -> dict[str, Any]:
        return self.observer.wait("reported", lambda m: m["deployment_id"] == deployment_id and m["state"] == state,
                                  timeout=120)

    def events(self, deployment_id: str, to: str, timeout: float = 60) -> list[str | None]:
        """The reasons of the events of ``deployment_id`` that went ``to`` a state (waits for one)."""
        def found() -> list[str | None]:
            return [e["reason"] for e in self.observer.events if e["deployment_id"] == deployment_id and e["to"] == to]

        with self.observer.changed:
            assert self.observer.changed.wait_for(found, timeout), f"no {to!r} event for {deployment_id}"
            return found()

    def install(self, base: str, bundle: Path, version: int, deployment_id: str) -> dict[str, Any]:
        """Order a bundle and wait until it serves; returns the reported state."""
        self.order(base, bundle, version, deployment_id)
        report = self.wait(deployment_id, "active")
        assert score(report["http_port"]) == {"version": version}
        return report

    def refused(self, base: str, bundle: Path, version: int, deployment_id: str, serving: int, *words: str) -> str:
        """Order a bundle the attacker serves: it fails with one line naming the attack; ``serving`` still serves."""
        self.order(base, bundle, version, deployment_id)
        report = self.wait(deployment_id, "failed")
        error = report["error"]
        assert "\n" not in error and all(word in error for word in words), error
        assert self.events(deployment_id, "failed") == [error]
        assert report["active"]["version"] == serving and score(report["http_port"]) == {"version": serving}
        return error


@contextmanager
def running_device(broker: Any, repo: TufRepository, folder: Path) -> Iterator[Device]:
    """The device, given the repository's root as its tuf_root (what an operator copies to it once)."""
    folder.mkdir()
    export_public_key(folder / "publisher.pub")
    repo.export_root(folder / "root.json")
    config = folder / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": "dev-mqtt-1", "broker": broker.url, "data_dir": str(folder / "data"),
        "trusted_keys": [str(folder / "publisher.pub")], "tuf_root": str(folder / "root.json"),
        "http_port": 0, "grpc_port": 0, "telemetry_period_s": 60}))
    agent = Device(Observer(broker.port), config, folder / "agent.log")
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()
        agent.observer.close()


def release(folder: Path, key: SigningKey, version: int) -> Path:
    """A signed bundle published into the store, which lists it as a TUF target."""
    bundle = script_bundle(folder / f"v{version}.edb", key, version)
    publish_bundle(bundle)
    return bundle


def signers(home: Path, role: str) -> list[CryptoSigner]:
    """The private keys of ``role`` on the repository machine, as an attacker who copied them holds them."""
    return [CryptoSigner(load_pem_private_key(path.read_bytes(), None))  # type: ignore[arg-type]
            for path in sorted((home / "keys" / "tuf").glob(f"{role}-*.key"))]


def _resign(md: Metadata[Any], keys: list[CryptoSigner], folder: Path, name: str) -> bytes:
    md.signed.version += 1
    md.signatures.clear()
    for key in keys:
        md.sign(key, append=True)
    data = md.to_bytes(JSONSerializer())
    (folder / name.format(md.signed.version)).write_bytes(data)
    return data


def forge(mirror: Mirror, bundle: Path, targets_keys: list[CryptoSigner], home: Path) -> None:
    """Add ``bundle`` as a target of the mirror's metadata, signed with ``targets_keys``, and re-sign snapshot
    and timestamp with the repository's (stolen) keys, so that only the targets signatures can be wrong."""
    folder = mirror.metadata
    timestamp = Metadata.from_file(str(folder / "timestamp.json"))
    snapshot = Metadata.from_file(str(folder / f"{timestamp.signed.snapshot_meta.version}.snapshot.json"))
    targets = Metadata.from_file(str(folder / f"{snapshot.signed.meta['targets.json'].version}.targets.json"))
    info = TargetFile.from_file(target_name(bundle_sha256(bundle)), str(bundle), ["sha256"])
    targets.signed.targets[info.path] = info
    shutil.copyfile(bundle, mirror.folder / info.path)
    data = _resign(targets, targets_keys, folder, "{}.targets.json")
    snapshot.signed.meta["targets.json"] = MetaFile.from_data(targets.signed.version, data, ["sha256"])
    data = _resign(snapshot, signers(home, "snapshot"), folder, "{}.snapshot.json")
    timestamp.signed.snapshot_meta = MetaFile.from_data(snapshot.signed.version, data, ["sha256"])
    _resign(timestamp, signers(home, "timestamp"), folder, "timestamp.json")
