"""Fleet benchmark: one rollout to 50, 100 and 200 devices; idle agent RSS/CPU; idle MQTT traffic.

Real ``edge-agent --config`` processes are used when the daemon exists (each is a full Python
process). A size that does not fit in the memory available (measured RSS per agent x N) is not
run, and the result says so. Without the daemon the devices are protocol-level scripted devices
(threads speaking the MQTT contract and downloading from the real bundle server) and the results
are marked ``"devices": "scripted"``: that measures the controller, broker and bundle server only.
Sizes: ``FLEET_BENCH_SIZES=50,100,200``.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import print_table, write_results

__all__ = ["main"]

IDLE_WINDOW_S = 30.0


def _available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _proc_stats(pid: int) -> tuple[float, float]:
    """(RSS in MB, CPU seconds used) of a process."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return rss, cpu


class _Counter:
    """Counts every message under the prefix (what idle devices cost the broker)."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.count = 0
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, *a: c.subscribe("edgedeploy/devices/#", 0)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if not message.retain:  # retained replays at subscribe time are not traffic
            with self.lock:
                self.count += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _run_size(n: int, real: bool, work: Path, key: Any) -> dict[str, Any]:
    from packager.bundle_server import BundleServer
    from packager.fleet import FleetController
    from tests.e2e.conftest import Agent, Broker
    from tests.e2e.test_fleet import ScriptedDevice, script_bundle

    os.environ["EDGEDEPLOY_HOME"] = str(work / "home")
    broker_dir = work / f"broker-{n}"
    broker_dir.mkdir()
    broker = Broker(broker_dir)
    broker.start()
    server = BundleServer(port=0, home=work / "home")
    server.start()
    agents: list[Agent] = []
    scripted: list[ScriptedDevice] = []
    row: dict[str, Any] = {"devices": n, "kind": "edge-agent" if real else "scripted"}
    try:
        started = time.monotonic()
        if real:
            agents = _start_agents(n, broker, work, key)
        else:
            scripted = [ScriptedDevice(broker.port, f"sim-{i:04d}", [], set()) for i in range(n)]
        bundle = script_bundle(work / f"v{n}.edb", key, 1)
        with FleetController(broker.url, home=work / "home") as ctl:
            _wait_online(ctl, n, timeout=60 + 3 * n)
            row["startup_s"] = round(time.monotonic() - started, 1)
            t0 = time.monotonic()
            rollout_id = ctl.rollout(bundle, "all", server.url, canary=1, wave="25%", wait=True,
                                     wave_timeout=300)
            row["rollout_s"] = round(time.monotonic() - t0, 2)
            status = ctl.status(rollout_id, advance=False)
            row["succeeded"], row["failed"] = status["succeeded"], status["failed"]
        row.update(_idle(broker.port, agents, n))
    finally:
        for agent in agents:
            agent.kill()
        for device in scripted:
            device.close()
        server.stop()
        broker.stop()
    return row


def _start_agents(n: int, broker: Any, work: Path, key: Any) -> list[Any]:
    from packager.keys import export_public_key
    from tests.e2e.conftest import make_agent

    pub = work / "publisher.pub"
    if not pub.exists():
        export_public_key(pub)
    agents = []
    for i in range(n):
        agent = make_agent(work / f"agents-{n}", f"dev-{i:04d}", broker.url, pub)
        agent.start()
        agents.append(agent)
    return agents


def _wait_online(ctl: Any, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sum(d["online"] for d in ctl.devices()) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {sum(d['online'] for d in ctl.devices())} of {n} devices came online")
        ctl._connect().wait_change(1.0)


def _idle(port: int, agents: list[Any], n: int) -> dict[str, Any]:
    """RSS and CPU of idle agents and MQTT messages per device per minute, over IDLE_WINDOW_S."""
    counter = _Counter(port)
    before = {a.device_id: _proc_stats(a.proc.pid) for a in agents if a.alive}
    time.sleep(IDLE_WINDOW_S)  # the measurement window, not a wait for a condition
    after = {a.device_id: _proc_stats(a.proc.pid) for a in agents if a.alive and a.device_id in before}
    counter.close()
    result: dict[str, Any] = {"idle_msgs_per_device_min": round(counter.count / n * 60 / IDLE_WINDOW_S, 2)}
    if after:
        rss = sorted(v[0] for v in after.values())
        cpu = [(after[k][1] - before[k][1]) / IDLE_WINDOW_S * 100 for k in after]
        result.update(agent_rss_mb_median=round(rss[len(rss) // 2], 1), agent_rss_mb_max=round(rss[-1], 1),
                      agent_idle_cpu_percent=round(sum(cpu) / len(cpu), 2))
    return result


def main() -> None:
    """Run the fleet benchmark and write ``bench/results/fleet.json``."""
    from packager.keys import generate_key

    real = importlib.util.find_spec("edge_agent.daemon") is not None
    sizes = [int(s) for s in os.environ.get("FLEET_BENCH_SIZES", "50,100,200").split(",")]
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    old_home = os.environ.get("EDGEDEPLOY_HOME")
    with tempfile.TemporaryDirectory(prefix="edgedeploy-fleet-bench-") as tmp:
        work = Path(tmp)
        os.environ["EDGEDEPLOY_HOME"] = str(work / "home")
        key = generate_key()
        try:
            for n in sizes:
                per_agent = next((r["agent_rss_mb_max"] for r in rows if "agent_rss_mb_max" in r), 150.0)
                if real and per_agent * n > 0.85 * _available_mb():
                    notes.append(f"{n} agents skipped: {n} x {per_agent:.0f} MB > 85% of available memory")
                    continue
                rows.append(_run_size(n, real, work, key))
                print_table(rows[-1:], list(rows[-1]))
        finally:
            if old_home is None:
                os.environ.pop("EDGEDEPLOY_HOME", None)
            else:
                os.environ["EDGEDEPLOY_HOME"] = old_home
    if not real:
        notes.append("edge_agent.daemon missing: devices were scripted MQTT clients in one process")
    columns = ["devices", "kind", "startup_s", "rollout_s", "succeeded", "failed", "agent_rss_mb_median",
               "agent_idle_cpu_percent", "idle_msgs_per_device_min"]
    print_table(rows, columns)
    for note in notes:
        print(note)
    write_results("fleet", {"rows": rows, "notes": notes, "idle_window_s": IDLE_WINDOW_S,
                            "rollout": {"canary": 1, "wave": "25%"}})


if __name__ == "__main__":
    main()
