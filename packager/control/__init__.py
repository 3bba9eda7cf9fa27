"""The fleet control plane: ``edgedeploy controller`` and what it is made of.

* :mod:`packager.control.store` — the database (SQLite by default, PostgreSQL by URL): devices,
  deployments, rollouts and their per-device steps, order sequence numbers, events, telemetry;
  versioned migrations (:mod:`packager.control.migrations`), leadership, retention.
* :mod:`packager.control.conditions` — the target-condition language of deployments.
* :mod:`packager.control.policy` — rollout policies: waves, pacing, windows, failure thresholds, gates.
* :mod:`packager.control.engine` — the reconciler and the ``ControlPlane`` facade.
* :mod:`packager.control.daemon` — ``run_controller``: store, leadership, engine and HTTP server.
* :mod:`packager.control.api`, :mod:`packager.control.client`, ``console/`` — HTTP JSON API, its
  client, the web console.

This package file imports nothing, so that importing one module never drags in the others.
"""
