"""agent.yaml: schema validation, defaults, paths, and ``edge-agent --config --check``."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from edge_agent.config import load_agent_config
from edge_agent.errors import NotFoundError, ValidationError

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"device_id": "pi-kitchen-01", "profile": "cpu-arm64", "groups": ["kitchen", "canary"],
        "tags": {"site": "milan"}, "broker": "mqtts://broker.example:8883", "data_dir": "data",
        "trusted_keys": ["publisher.pub"], "http_port": 8001, "grpc_port": 0}


def write(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_valid_config_loads_with_defaults_and_resolved_paths(tmp_path: Path) -> None:
    config = load_agent_config(write(tmp_path, GOOD))
    assert config.device_id == "pi-kitchen-01" and config.groups == ["kitchen", "canary"]
    assert config.tags == {"site": "milan"} and config.grpc_port == 0
    assert config.data_dir == tmp_path / "data" and config.trusted_keys == [tmp_path / "publisher.pub"]
    assert config.broker_tls and config.broker_host == "broker.example" and config.broker_port == 8883
    assert config.telemetry_period_s == 30 and config.host == "127.0.0.1" and config.topic_prefix == "edgedeploy"


@pytest.mark.parametrize(("change", "message"), [
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"broker": "http://x"}, "broker"),
    ({"http_port": 70000}, "http_port"),
    ({"device_id": "a/b"}, "invalid device id"),
    ({"groups": "kitchen"}, "groups"),
    ({"telemetry_period_s": 0}, "telemetry_period_s"),
])
def test_bad_configs_say_what_is_wrong(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        load_agent_config(write(tmp_path, {**GOOD, **change}))


def test_missing_keys_files_and_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="data_dir"):
        load_agent_config(write(tmp_path, {k: v for k, v in GOOD.items() if k != "data_dir"}))
    with pytest.raises(NotFoundError, match="does not exist"):
        load_agent_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("device_id: [unclosed")
    with pytest.raises(ValidationError, match="YAML"):
        load_agent_config(tmp_path / "bad.yaml")
    with pytest.raises(ValidationError, match="mapping"):
        load_agent_config(write(tmp_path, ["a", "list"]))


def test_edge_agent_check_validates_and_names_the_unknown_key(tmp_path: Path) -> None:
    def check(doc: dict) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edge_agent.cli", "--config", str(write(tmp_path, doc)),
                               "--check"], capture_output=True, text=True, cwd=ROOT, timeout=60)

    ok = check(GOOD)
    assert ok.returncode == 0, ok.stderr
    bad = check({**GOOD, "brokr": "mqtt://x"})
    assert bad.returncode != 0 and "brokr" in bad.stderr and "Traceback" not in bad.stderr


def test_mqtt_version_and_download_limits_have_defaults_and_are_checked(tmp_path: Path) -> None:
    config = load_agent_config(write(tmp_path, GOOD))
    assert config.mqtt_version == "auto" and config.download_deadline_s == 3600
    assert config.download_min_bytes_per_s == 1024
    for written, read in ((5, "5"), ("3.1.1", "3.1.1"), ("auto", "auto")):  # YAML reads a bare 5 as a number
        assert load_agent_config(write(tmp_path, {**GOOD, "mqtt_version": written})).mqtt_version == read
    for bad in ({"mqtt_version": "3"}, {"download_deadline_s": 0}, {"download_min_bytes_per_s": -1}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            load_agent_config(write(tmp_path, {**GOOD, **bad}))


@pytest.mark.parametrize("level", ["debug", "DEBUG"])
def test_log_level_of_agent_yaml_applies_to_edge_agent_config(tmp_path: Path, level: str) -> None:
    from packager.targets.base import free_port

    doc = {**GOOD, "broker": f"mqtt://127.0.0.1:{free_port()}", "trusted_keys": [], "http_port": 0,
           "log_level": level}
    lines: list[str] = []
    with subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "--config", str(write(tmp_path, doc))],
                          cwd=ROOT, stderr=subprocess.PIPE, text=True) as process:
        assert process.stderr is not None
        stderr = process.stderr

        def read() -> None:  # the agent retries the absent broker, logging at DEBUG meanwhile
            for line in stderr:
                lines.append(line)
                if " DEBUG " in line:
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(30)
        process.terminate()
    assert any(" DEBUG " in line for line in lines), "".join(lines)


def test_the_servers_settings_come_from_agent_yaml(tmp_path: Path) -> None:
    config = load_agent_config(write(tmp_path, {**GOOD, "max_inflight_bytes": 1000, "auth_enabled": True}))
    serving = config.serving
    assert (serving.http_port, serving.grpc_port, serving.auth_enabled) == (8001, 0, True)
    assert serving.max_inflight_bytes == 1000 and serving.max_request_bytes == 64 * 1024 * 1024
