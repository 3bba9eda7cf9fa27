"""``edgedeploy fleet`` through a controller: ``--controller URL``, and ``deploy``/``deployments``/``undeploy``.

With ``--controller URL`` (or ``$EDGEDEPLOY_CONTROLLER``) the fleet commands talk to ``edgedeploy
controller`` over its HTTP API instead of to the broker; the bearer token comes from
``--token-file`` (its first token) or ``$EDGEDEPLOY_CONTROLLER_TOKEN``. Declarative deployments
exist only in a controller, so those three commands need one. ``fleet deploy`` checks what it can
before anything leaves this machine (the target condition, the rollout options, the bundle's
signature), then publishes the bundle to the bundle server folder as ``fleet rollout`` does and
sends the spec.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from edge_agent.errors import UsageError
from packager.cli.output import print_json, print_table
from packager.control.client import ControllerClient

__all__ = ["add_controller_options", "bundle_server_default", "register_deployments", "remote"]

# `fleet deploy` options that make the rollout policy, sent as the CLI wrote them (the controller parses them)
_POLICY_OPTIONS = ("canary", "wave", "rate", "ramp", "bake", "start", "window", "max_failures", "min_sample", "gate")


def bundle_server_default() -> str:
    """``--server``'s default: ``$EDGEDEPLOY_BUNDLE_SERVER``, else the local ``edgedeploy serve``."""
    return os.environ.get("EDGEDEPLOY_BUNDLE_SERVER", "http://127.0.0.1:8080")


def add_controller_options(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """``--controller`` and ``--token-file``, before the action (``parser``) or after it (``common``)."""
    url_help = "controller URL (default $EDGEDEPLOY_CONTROLLER; without one, commands talk to the broker)"
    token_help = "file whose first token authenticates to the controller (default $EDGEDEPLOY_CONTROLLER_TOKEN)"
    for where, default in ((parser, None), (common, argparse.SUPPRESS)):
        where.add_argument("--controller", default=default, metavar="URL", help=url_help)
        where.add_argument("--token-file", default=default, type=Path, metavar="FILE", help=token_help)


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        from packager.control.tokens import load_tokens

        return load_tokens(args.token_file)[0]
    return os.environ.get("EDGEDEPLOY_CONTROLLER_TOKEN") or None


def remote(args: argparse.Namespace) -> ControllerClient | None:
    """The controller client when ``--controller``/``$EDGEDEPLOY_CONTROLLER`` is set; None otherwise."""
    url = args.controller or os.environ.get("EDGEDEPLOY_CONTROLLER")
    return ControllerClient(url, _token(args)) if url else None


def _needs_controller(args: argparse.Namespace) -> ControllerClient:
    client = remote(args)
    if client is None:
        raise UsageError(f"fleet {args.fleet_command} needs a controller: set --controller URL or "
                         "$EDGEDEPLOY_CONTROLLER (edgedeploy controller runs one)")
    return client


def register_deployments(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``fleet deploy``, ``fleet deployments`` and ``fleet undeploy``."""
    deploy = sub.add_parser("deploy", parents=[common], help="declare a deployment: a bundle for every device "
                                                             "matching a target condition (needs a controller)")
    deploy.add_argument("name", help="the deployment's name (letters, digits, . _ -)")
    deploy.add_argument("bundle", type=Path)
    deploy.add_argument("--target", required=True, metavar="CONDITION",
                        help="which devices, e.g. \"tags.site = 'milan' AND profile = 'cpu-arm64'\"")
    deploy.add_argument("--priority", type=int, default=0,
                        help="a device matching several deployments runs the highest priority (default 0)")
    deploy.add_argument("--server", default=bundle_server_default(),
                        help="bundle server URL devices download from (edgedeploy serve)")
    deploy.add_argument("--canary", help="devices in the first wave (default 1)")
    deploy.add_argument("--wave", help="wave size: N devices or P%% (default 25%%)")
    deploy.add_argument("--rate", metavar="N/min", help="at most N devices ordered per minute")
    deploy.add_argument("--ramp", metavar="BASE,FACTOR", help="wave i goes at BASE * FACTOR**i devices per minute")
    deploy.add_argument("--bake", metavar="S", help="seconds each wave runs before the next may start")
    deploy.add_argument("--start", metavar="ISO-TIME", help="do not start before this time")
    deploy.add_argument("--window", metavar="HH:MM-HH:MM", help="order devices only in this window of their local "
                                                                "time (several: comma-separated)")
    deploy.add_argument("--max-failures", metavar="P%", help="failure share that halts and rolls back (default 10%%)")
    deploy.add_argument("--min-sample", metavar="N", help="judge the failure share once N devices finished")
    deploy.add_argument("--gate", metavar="RULES", help="telemetry gate per wave, e.g. p95<=1.2x,errors<=1%%")
    deploy.add_argument("--json", action="store_true")
    deploy.set_defaults(func=_deploy)

    listing = sub.add_parser("deployments", parents=[common], help="deployments with targeted/applied/failed counts")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_deployments)

    undeploy = sub.add_parser("undeploy", parents=[common], help="remove a deployment (its devices move to the "
                                                                 "next matching one)")
    undeploy.add_argument("name")
    undeploy.set_defaults(func=_undeploy)


def _policy_options(args: argparse.Namespace) -> dict[str, str]:
    return {key: str(getattr(args, key)) for key in _POLICY_OPTIONS if getattr(args, key) is not None}


def _check_locally(target: str, policy: dict[str, str]) -> None:
    """Refuse a bad condition or option before the bundle is published (the controller checks again)."""
    from packager.control.conditions import parse_condition
    from packager.control.policy import RolloutPolicy

    parse_condition(target)
    RolloutPolicy.from_options(**policy)


def _deploy(args: argparse.Namespace) -> int:
    from packager.fleet import publish_target

    client = _needs_controller(args)
    policy = _policy_options(args)
    _check_locally(args.target, policy)
    spec = {"name": args.name, **publish_target(args.bundle, args.server), "target": args.target,
            "priority": args.priority, "policy": policy}
    doc = client.deploy(spec)
    if args.json:
        print_json(doc)
    else:
        model = doc.get("model") or spec["model"]
        print(f"deployment {doc.get('name', args.name)}: {model.get('name')}:{model.get('version')} "
              f"({str(doc.get('bundle_sha256') or spec['bundle_sha256'])[:12]}) to {args.target!r}, "
              f"priority {args.priority}; {doc.get('targeted', 0)} device(s) targeted")
    return 0


def _model_cell(row: dict[str, Any]) -> str | None:
    model = row.get("model")
    return f"{model.get('name')}:{model.get('version')}" if isinstance(model, dict) and model else None


def _deployments(args: argparse.Namespace) -> int:
    rows = _needs_controller(args).deployments()
    if args.json:
        print_json(rows)
    else:
        print_table([dict(r, model=_model_cell(r)) for r in rows],
                    ["name", "target", "priority", "model", "targeted", "applied", "failed", "rollout_id"])
    return 0


def _undeploy(args: argparse.Namespace) -> int:
    _needs_controller(args).undeploy(args.name)
    print(f"deployment {args.name}: removed (its devices move to the next matching deployment)")
    return 0
