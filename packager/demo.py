"""``make demo``: the whole workflow on embedded defaults, on one machine, in about a minute.

Builds a digits model, registers it, packages it (static int8, validated against fp32), starts an
MQTT broker (Mosquitto when installed, else the embedded amqtt broker), the bundle server and three
edge agents, rolls the bundle out (canary, then a wave), scores over REST and gRPC, prints the
fleet table and telemetry, and stops everything. State lives in a temporary EDGEDEPLOY_HOME unless
``--workdir`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from packager.targets.base import free_port, wait_port

__all__ = ["main"]

AGENTS = ("pi-kitchen-01", "pi-hall-02", "jetson-lab-03")


def _step(text: str) -> None:
    print(f"\n=== {text}", flush=True)



class _Processes:
    """Child processes started by the demo, all stopped on exit whatever happens."""

    def __init__(self) -> None:
        self._children: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        handle = open(log, "wb")  # noqa: SIM115 - owned by the child for its lifetime
        child = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        handle.close()
        self._children.append(child)
        return child

    def stop_all(self) -> None:
        for child in self._children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self._children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _start_broker(procs: _Processes, work: Path) -> str:
    port = free_port()
    mosquitto = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if os.environ.get("EDGEDEPLOY_DEMO_BROKER") == "amqtt":
        mosquitto = None
    if mosquitto:
        conf = work / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        procs.start([mosquitto, "-c", str(conf)], work / "mosquitto.log")
        kind = "Mosquitto"
    else:
        conf = work / "amqtt.yaml"
        conf.write_text(f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\n"
                        "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n")
        procs.start([sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)], work / "amqtt.log")
        kind = "amqtt (embedded Python broker; Mosquitto is not installed)"
    wait_port(port, timeout=20.0)
    print(f"{kind} on 127.0.0.1:{port}")
    return f"mqtt://127.0.0.1:{port}"


@contextlib.contextmanager
def _workdir(path: str | None) -> Iterator[Path]:
    if path:
        work = Path(path).resolve()
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    work = Path(tempfile.mkdtemp(prefix="edgedeploy-demo-"))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_and_package(work: Path) -> tuple[Path, Any]:
    from packager import generate_key, package, register_model
    from packager.cli.bundle import describe
    from packager.cli.output import print_table
    from packager.examples import build_digits_mlp, digits_data
    from packager.report import format_report

    _step("1. build a sample model (scikit-learn MLP on the bundled digits data, exported to ONNX)")
    model_path = build_digits_mlp(work / "digits.onnx")
    data = digits_data()
    np.savez(work / "calibration.npz", input=data.x_train[:200])
    np.savez(work / "validation.npz", input=data.x_test, labels=data.y_test)
    (work / "sample.json").write_text(json.dumps({"data": data.x_test[:2].tolist()}))
    print(f"{model_path} ({model_path.stat().st_size} bytes)")

    _step("2. register it")
    record = register_model("digits", model_path, tags={"team": "demo"}, description="8x8 digits MLP")
    print(f"registered {record.name}:{record.version} sha256 {record.sha256[:16]}…")

    _step("3. sign and package it for cpu-x86_64 with static int8, gated on accuracy")
    generate_key()
    bundle = work / "digits.edb"
    result = package("digits", "cpu-x86_64", bundle, quantize="static-int8",
                     calibration=work / "calibration.npz", validation=work / "validation.npz",
                     input_sample=work / "sample.json")
    print(format_report(result.report))

    _step("4. inspect the bundle")
    print_table(describe(result.manifest), ["field", "value"])
    return bundle, data


def _write_agent_configs(work: Path, broker: str) -> list[Path]:
    from packager.keys import export_public_key

    public_key = work / "publisher.pub"
    export_public_key(public_key)
    configs = []
    for index, device_id in enumerate(AGENTS):
        folder = work / "agents" / device_id
        folder.mkdir(parents=True)
        config = {
            "device_id": device_id,
            "profile": "cpu-x86_64",
            "groups": ["demo", "canary" if index == 0 else "main"],
            "tags": {"site": "demo-lab"},
            "broker": broker,
            "data_dir": str(folder / "data"),
            "trusted_keys": [str(public_key)],
            "http_port": 0,
            "grpc_port": 0,
            "telemetry_period_s": 2,
        }
        path = folder / "agent.yaml"
        path.write_text(json.dumps(config, indent=2))
        configs.append(path)
    return configs


def _score(devices: list[dict[str, Any]], data: Any) -> None:
    import tritonclient.grpc as grpcclient

    rest = next(d for d in devices if d.get("http_port"))
    body = json.dumps({"data": data.x_test[:3].tolist()}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{rest['http_port']}/score", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.loads(response.read())
    print(f"REST /score on {rest['device_id']}: labels {answer.get('label')} (truth {data.y_test[:3].tolist()})")

    target = devices[-1]
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{target['grpc_port']}")
    infer_input = grpcclient.InferInput("input", [3, 64], "FP32")
    infer_input.set_data_from_numpy(data.x_test[:3])
    result = client.infer("digits", [infer_input])
    print(f"gRPC ModelInfer on {target['device_id']} (tritonclient): labels {result.as_numpy('label').tolist()}")
    client.close()


def run_demo(work: Path) -> None:
    """Run every step in ``work``; raises on the first failure after stopping what it started."""
    os.environ["EDGEDEPLOY_HOME"] = str(work / "home")
    bundle, data = _build_and_package(work)
    procs = _Processes()
    try:
        _fleet_steps(work, bundle, data, procs)
    finally:
        _step("10. stop everything")
        procs.stop_all()
        print("broker, bundle server and agents stopped")


def _clock(value: Any) -> str:
    if isinstance(value, int | float):
        return time.strftime("%H:%M:%S", time.localtime(value))
    return str(value or "-")


def _latest_telemetry(broker: str, wait_s: float = 4.0) -> dict[str, dict[str, Any]]:
    """The newest telemetry message of every device, listening for ``wait_s`` seconds."""
    import paho.mqtt.client as mqtt

    from edge_agent.fleet_messages import parse_message, parse_topic, topic

    latest: dict[str, dict[str, Any]] = {}

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        device_id, kind = parse_topic(message.topic)
        latest[device_id] = parse_message(kind, message.payload)

    host, port = broker.removeprefix("mqtt://").rsplit(":", 1)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edgedeploy-demo-telemetry")
    client.on_message = on_message
    client.connect(host, int(port))
    client.subscribe(topic("+", "telemetry"), qos=0)
    client.loop_start()
    time.sleep(wait_s)
    client.loop_stop()
    client.disconnect()
    return latest


def _fleet_steps(work: Path, bundle: Path, data: Any, procs: _Processes) -> None:
    from packager.cli.output import print_table
    from packager.fleet import FleetController

    _step("5. start an MQTT broker")
    broker = _start_broker(procs, work)

    _step("6. start the bundle server")
    server_port = free_port()
    procs.start([sys.executable, "-m", "packager.cli.main", "serve", "--port", str(server_port)], work / "serve.log")
    wait_port(server_port, timeout=20.0)
    server_url = f"http://127.0.0.1:{server_port}"
    print(f"bundle server on {server_url}")

    _step("7. start three edge agents")
    for config in _write_agent_configs(work, broker):
        procs.start([sys.executable, "-m", "edge_agent.cli", "--config", str(config)], config.parent / "agent.log")
    controller = FleetController(broker)
    deadline = time.monotonic() + 30
    while len([d for d in controller.devices() if d["online"]]) < len(AGENTS):
        if time.monotonic() > deadline:
            raise RuntimeError("the agents did not come online; see the agent logs")
        time.sleep(0.3)
    print(f"{len(AGENTS)} agents online")

    _step("8. roll the bundle out: one canary, then the rest in a wave")
    rollout_id = controller.rollout(bundle, "group:demo", server_url=server_url, canary=1, wave="100%",
                                    max_failures="0%", wait=True)
    status = controller.status(rollout_id)
    print(f"rollout {rollout_id}: {status['state']} ({status['succeeded']} succeeded, {status['failed']} failed)")
    if status["state"] != "succeeded":
        raise RuntimeError(f"rollout ended {status['state']}")

    _step("9. score over REST and gRPC, then read the fleet table and telemetry")
    devices = sorted(controller.devices(), key=lambda d: d["device_id"])
    _score(devices, data)
    rows = [{**d, "last_seen": _clock(d["last_seen"]), "bundle_sha256": (d["bundle_sha256"] or "")[:12]}
            for d in controller.devices()]
    print_table(rows, ["device_id", "online", "model", "model_version", "bundle_sha256", "state", "last_seen"])
    print()
    telemetry_rows = []
    for device_id, telemetry in sorted(_latest_telemetry(broker).items()):
        served = telemetry.get("models", {}).get("digits", {})
        telemetry_rows.append({"device_id": device_id, "cpu_%": telemetry.get("cpu_percent"),
                               "rss_mb": telemetry.get("memory_rss_mb"), "uptime_s": telemetry.get("uptime_s"),
                               "requests": served.get("requests", 0), "errors": served.get("errors", 0),
                               "p50_ms": served.get("p50_ms"), "p99_ms": served.get("p99_ms")})
    print_table(telemetry_rows, ["device_id", "cpu_%", "rss_mb", "uptime_s", "requests", "errors", "p50_ms",
                                 "p99_ms"])
    controller.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m packager.demo``."""
    parser = argparse.ArgumentParser(prog="python -m packager.demo", description=__doc__)
    parser.add_argument("--workdir", help="keep everything in this folder instead of a temporary one")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with _workdir(args.workdir) as work:
        run_demo(work)
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
