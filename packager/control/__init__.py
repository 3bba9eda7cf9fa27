"""The fleet control plane: a long-running controller over a real store (issue #11).

``store`` keeps devices, deployments, rollouts, events and telemetry; ``conditions`` parses target
conditions; ``policy`` holds the pure rollout rules (waves, pacing, windows, thresholds, gates);
``engine`` reconciles the fleet against them. This package file stays empty of imports so that
importing one module never drags in the others.
"""
