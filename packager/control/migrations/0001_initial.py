"""The first schema: devices, deployments, rollouts and their devices, sequences, events, telemetry, leader.

JSON columns hold one JSON document each (``{json}``); times are float seconds since the epoch.
Events and telemetry are append-only and pruned by age, hence their ``ts`` indexes; the per-device
and per-rollout reads go through ``(device_id, ts)`` and ``(rollout_id, ts)``.
"""

__all__ = ["SQL"]

SQL = """
CREATE TABLE leader (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL,
    since {real} NOT NULL,
    heartbeat {real} NOT NULL
);
CREATE TABLE devices (
    device_id TEXT PRIMARY KEY,
    online {bool} NOT NULL,
    profile TEXT,
    groups {json} NOT NULL,
    tags {json} NOT NULL,
    reported {json} NOT NULL,
    status {json} NOT NULL,
    last_seen {real},
    first_seen {real}
);
CREATE TABLE deployments (
    name TEXT PRIMARY KEY,
    spec {json} NOT NULL,
    created {real} NOT NULL,
    updated {real} NOT NULL
);
CREATE TABLE rollouts (
    rollout_id TEXT PRIMARY KEY,
    doc {json} NOT NULL,
    created {real} NOT NULL,
    updated {real} NOT NULL
);
CREATE INDEX rollouts_created ON rollouts (created);
CREATE TABLE rollout_devices (
    rollout_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    wave INTEGER NOT NULL,
    state TEXT NOT NULL,
    target {json},
    previous {json},
    error TEXT,
    ordered_at {real},
    finished_at {real},
    PRIMARY KEY (rollout_id, device_id)
);
CREATE TABLE sequences (
    device_id TEXT PRIMARY KEY,
    seq {bigint} NOT NULL
);
CREATE TABLE events (
    id {id},
    ts {real} NOT NULL,
    kind TEXT NOT NULL,
    device_id TEXT,
    rollout_id TEXT,
    deployment TEXT,
    message TEXT,
    data {json} NOT NULL
);
CREATE INDEX events_ts ON events (ts);
CREATE INDEX events_device_ts ON events (device_id, ts);
CREATE INDEX events_rollout_ts ON events (rollout_id, ts);
CREATE INDEX events_deployment_ts ON events (deployment, ts);
CREATE TABLE telemetry (
    id {id},
    device_id TEXT NOT NULL,
    ts {real} NOT NULL,
    model TEXT,
    version {json},
    bundle_sha256 TEXT,
    requests {bigint},
    errors {bigint},
    p50_ms {real},
    p95_ms {real},
    p99_ms {real},
    cpu_percent {real},
    memory_rss_mb {real}
);
CREATE INDEX telemetry_device_ts ON telemetry (device_id, ts);
CREATE INDEX telemetry_ts ON telemetry (ts)
"""
