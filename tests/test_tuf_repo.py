"""The TUF repository (packager/tuf_repo.py, ``edgedeploy repo``, ``keys rotate``) and the device's client
(edge_agent/tuf_fetch.py) on real files and a real HTTP server; the attacks themselves run against the
real agent in tests/e2e/test_tuf_attacks.py."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata

from edge_agent.bundle import bundle_sha256
from edge_agent.config import parse_agent_config
from edge_agent.errors import NotFoundError, UpdateMetadataError, ValidationError
from edge_agent.tuf_fetch import BundleMetadata, metadata_url_for, target_name
from packager.bundle_server import BundleServer, publish_bundle
from packager.cli.main import main
from packager.keys import SigningKey, generate_key
from packager.tuf_repo import TufRepository, parse_duration, repository_exists
from tests.test_store import script_bundle


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, list[str]]:
    """``edgedeploy ARGS`` in this process: (exit code, stdout, stderr lines)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def device_view(repo: TufRepository, tmp_path: Path, root: bytes | None = None) -> BundleMetadata:
    """A device's TUF client reading a copy of the repository's metadata folder, trusting ``root`` (v1)."""
    folder = tmp_path / f"copy-{time.monotonic_ns()}"
    shutil.copytree(repo.metadata, folder / "metadata")
    trusted = tmp_path / "root.json"
    if not trusted.exists():
        trusted.write_bytes(root or (repo.metadata / "1.root.json").read_bytes())
    return BundleMetadata(trusted, tmp_path / "device-tuf", folder=folder)


def test_init_makes_private_keys_a_two_of_three_targets_role_default_expiry_and_versioned_files(
        signing_key: SigningKey, edgedeploy_home: Path) -> None:
    repo = TufRepository.init()
    status = repo.status()
    roles = status["roles"]
    assert roles["targets"]["threshold"] == 2 and len(roles["targets"]["keys"]) == 3
    assert roles["root"]["threshold"] == 1 and status["consistent_snapshot"] is True
    assert all(role["version"] == 1 and role["keys_here"] == len(role["keys"]) for role in roles.values())
    keys = sorted((edgedeploy_home / "keys" / "tuf").glob("*.key"))
    assert len(keys) == 6 and all(k.stat().st_mode & 0o777 == 0o600 for k in keys)
    assert (edgedeploy_home / "keys" / "tuf").stat().st_mode & 0o777 == 0o700
    lifetimes = {name: datetime.fromisoformat(role["expires"]) - datetime.now(UTC) for name, role in roles.items()}
    for name, days in (("timestamp", 1), ("snapshot", 7), ("targets", 90), ("root", 365)):
        assert timedelta(days=days) - timedelta(minutes=5) < lifetimes[name] <= timedelta(days=days)
    assert {p.name for p in repo.metadata.iterdir()} == {"1.root.json", "root.json", "1.targets.json",
                                                         "1.snapshot.json", "timestamp.json"}
    snapshot_meta = repo.timestamp().signed.snapshot_meta
    assert snapshot_meta.length == (repo.metadata / "1.snapshot.json").stat().st_size and snapshot_meta.hashes


def test_init_lists_the_stores_trusted_bundles_and_publishing_adds_targets(
        signing_key: SigningKey, edgedeploy_home: Path, tmp_path: Path) -> None:
    old = script_bundle(tmp_path / "old.edb", signing_key, 1)
    publish_bundle(old)  # before the repository: just stored
    stranger = generate_key("stranger")
    publish_bundle(script_bundle(tmp_path / "stranger.edb", stranger, 7))
    (edgedeploy_home / "trust" / f"{stranger.key_id}.pub").unlink()  # a signer no longer trusted here
    assert not repository_exists()
    repo = TufRepository.init()
    assert [t["sha256"] for t in repo.status()["targets"]] == [bundle_sha256(old)]
    new = script_bundle(tmp_path / "new.edb", signing_key, 2)
    publish_bundle(new)
    publish_bundle(new)  # idempotent: no second targets version
    targets = repo.targets().signed
    assert targets.version == 2 and set(targets.targets) == {target_name(bundle_sha256(old)),
                                                             target_name(bundle_sha256(new))}
    assert targets.targets[target_name(bundle_sha256(new))].custom == {"model": {"name": "scorer", "version": 2}}
    view = device_view(repo, tmp_path)
    assert view.target(bundle_sha256(new), "").length == new.stat().st_size


def test_publish_resigns_snapshot_and_timestamp_and_a_role_near_its_expiry(
        signing_key: SigningKey, tmp_path: Path) -> None:
    bundle = script_bundle(tmp_path / "v1.edb", signing_key, 1)
    publish_bundle(bundle)
    repo = TufRepository.init(expiry={"targets": parse_duration("4s")})
    assert repo.publish() == {"root": 1, "targets": 1, "snapshot": 2, "timestamp": 2}
    expires = repo.targets().signed.expires
    deadline = time.monotonic() + 30
    while expires - datetime.now(UTC) >= timedelta(seconds=1):  # the last quarter of its 4 s
        assert time.monotonic() < deadline
        time.sleep(0.1)
    versions = repo.publish()
    assert versions == {"root": 1, "targets": 2, "snapshot": 3, "timestamp": 3}
    assert repo.targets().signed.expires > expires
    assert device_view(repo, tmp_path).target(bundle_sha256(bundle), "").length == bundle.stat().st_size


def test_rotating_root_and_targets_keys_a_device_from_root_1_follows_and_old_keys_are_gone(
        signing_key: SigningKey, edgedeploy_home: Path, tmp_path: Path) -> None:
    repo = TufRepository.init()
    bundle = script_bundle(tmp_path / "v1.edb", signing_key, 1)
    publish_bundle(bundle)
    first_root = (repo.metadata / "1.root.json").read_bytes()
    old_root = repo.root().signed.roles["root"].keyids
    old_targets = repo.root().signed.roles["targets"].keyids
    rotated = repo.rotate("root")
    assert rotated["revoked"] == old_root and rotated["root_version"] == 2
    second = Metadata.from_file(str(repo.metadata / "2.root.json"))
    assert set(second.signatures) == set(old_root) | set(rotated["keys"])  # signed by the old and the new
    assert repo.rotate("targets")["root_version"] == 3
    assert not set(repo.root().signed.roles["targets"].keyids) & set(old_targets)
    assert set(repo.targets().signatures) == set(repo.root().signed.roles["targets"].keyids)
    remaining = {p.name.split("-", 1)[1][:16] for p in (edgedeploy_home / "keys" / "tuf").glob("*.key")}
    assert not {k[:16] for k in old_root + old_targets} & remaining
    view = device_view(repo, tmp_path, first_root)
    assert view.target(bundle_sha256(bundle), "").sha256 == bundle_sha256(bundle)
    assert (tmp_path / "device-tuf" / "root_history" / "3.root.json").is_file()  # walked 1 -> 2 -> 3


def test_a_role_is_signed_only_with_its_threshold_of_keys_on_this_machine(
        signing_key: SigningKey, edgedeploy_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    TufRepository.init()
    keys = sorted((edgedeploy_home / "keys" / "tuf").glob("targets-*.key"))
    keys[0].rename(tmp_path / keys[0].name)  # one key taken offline: two of three still sign
    first = script_bundle(tmp_path / "v1.edb", signing_key, 1)
    assert cli(capsys, "repo", "add", str(first))[0] == 0
    keys[1].rename(tmp_path / keys[1].name)
    second = script_bundle(tmp_path / "v2.edb", signing_key, 2)
    code, _, errors = cli(capsys, "repo", "add", str(second))
    assert code == 1 and len(errors) == 1 and "only 1 of the 2 targets keys" in errors[0]


def test_repo_and_keys_commands_print_json_and_one_error_line(
        signing_key: SigningKey, edgedeploy_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, errors = cli(capsys, "repo", "status")
    assert code == 1 and errors == [f"error: no TUF repository in {edgedeploy_home}: run `edgedeploy repo init` first"]
    assert cli(capsys, "repo", "init", "--targets-threshold", "4")[0] == 2
    assert cli(capsys, "repo", "init", "--expires", "timestamp=soon")[0] == 2
    code, out, _ = cli(capsys, "repo", "init", "--expires", "timestamp=6h,snapshot=2d", "--json")
    assert code == 0 and json.loads(out)["roles"]["timestamp"]["version"] == 1
    code, _, errors = cli(capsys, "repo", "init")
    assert code == 1 and len(errors) == 1 and "exists already" in errors[0]
    code, out, _ = cli(capsys, "repo", "status", "--json")
    status = json.loads(out)
    assert {"metadata_dir", "consistent_snapshot", "roles", "targets"} <= set(status)
    assert {"version", "expires", "expired", "threshold", "keys", "keys_here"} <= set(status["roles"]["root"])
    assert datetime.fromisoformat(status["roles"]["timestamp"]["expires"]) - datetime.now(UTC) <= timedelta(hours=6)
    assert cli(capsys, "repo", "publish", "--expires", "targets=1d")[0] == 2
    code, out, _ = cli(capsys, "keys", "rotate", "timestamp", "--json")
    assert code == 0 and json.loads(out)["root_version"] == 2
    assert cli(capsys, "keys", "rotate", "nobody")[0] == 2
    assert cli(capsys, "repo", "export-root", "-o", str(tmp_path / "root.json"))[0] == 0
    assert cli(capsys, "keys", "export", "-o", str(tmp_path / "p.pub"), "--tuf-root", str(tmp_path / "r.json"))[0] == 0
    assert (tmp_path / "root.json").read_bytes() == (tmp_path / "r.json").read_bytes() \
        == (TufRepository.open().metadata / "2.root.json").read_bytes()
    code, out, _ = cli(capsys, "repo", "publish", "--json")
    assert code == 0 and json.loads(out)["timestamp"] == 3  # 1 at init, 2 with the rotation


def test_the_bundle_server_serves_the_metadata_folder_and_nothing_else_of_the_home(
        signing_key: SigningKey, edgedeploy_home: Path) -> None:
    TufRepository.init()
    server = BundleServer(port=0)
    server.start()

    def get(path: str) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    try:
        status, headers, body = get("/metadata/timestamp.json")
        assert status == 200 and headers["cache-control"] == "no-cache" and json.loads(body)["signed"]["version"] == 1
        status, headers, body = get("/metadata/1.root.json")
        assert status == 200 and "immutable" in headers["cache-control"]
        assert body == (edgedeploy_home / "metadata" / "1.root.json").read_bytes()
        for path in ("/metadata/../keys/tuf/settings.json", "/metadata/settings.json", "/keys/tuf/settings.json",
                     "/metadata/2.root.json", "/metadata/%2e%2e/trust"):
            assert get(path)[0] == 404, path
    finally:
        server.stop()


class _Endless(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if not self.path.endswith("timestamp.json"):
            self.send_error(404)
            return
        self.send_response(200)
        self.end_headers()
        try:
            while True:
                self.wfile.write(b" " * 4096)
        except OSError:
            return


@pytest.fixture
def endless_metadata() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Endless)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/metadata/"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_the_device_client_refuses_endless_metadata_and_bad_roots_in_one_line(
        signing_key: SigningKey, tmp_path: Path, endless_metadata: str) -> None:
    repo = TufRepository.init()
    repo.export_root(tmp_path / "root.json")
    client = BundleMetadata(tmp_path / "root.json", tmp_path / "cache", endless_metadata)
    with pytest.raises(UpdateMetadataError, match="endless data") as refused:
        client.target("0" * 64, "")
    assert "\n" not in str(refused.value) and "timestamp.json" in str(refused.value)
    with pytest.raises(NotFoundError, match="export-root"):
        BundleMetadata(tmp_path / "absent.json", tmp_path / "cache")
    forged = json.loads((tmp_path / "root.json").read_text())
    forged["signed"]["expires"] = "2099-01-01T00:00:00Z"  # the signature no longer covers it
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    with pytest.raises(UpdateMetadataError, match="not a valid, self-signed TUF root"):
        BundleMetadata(tmp_path / "forged.json", tmp_path / "cache2")


def test_the_metadata_url_comes_from_the_bundle_url_or_agent_yaml(tmp_path: Path) -> None:
    assert metadata_url_for("http://cdn.example/edge/bundles/ab.edb?x=1") == "http://cdn.example/edge/metadata/"
    assert metadata_url_for("https://h:8080/bundles/ab.edb") == "https://h:8080/metadata/"
    with pytest.raises(UpdateMetadataError, match="tuf_metadata_url"):
        metadata_url_for("")
    config = parse_agent_config({"device_id": "d", "broker": "mqtt://127.0.0.1:1", "data_dir": "data",
                                 "tuf_root": "root.json", "tuf_metadata_url": "https://m.example/metadata/"},
                                base=tmp_path)
    assert config.tuf_root == tmp_path / "root.json" and config.tuf_metadata_url == "https://m.example/metadata/"
    with pytest.raises(ValidationError, match="tuf_metadata_url"):
        parse_agent_config({"device_id": "d", "broker": "mqtt://127.0.0.1:1", "data_dir": "data",
                            "tuf_metadata_url": "ftp://m/"}, base=tmp_path)
