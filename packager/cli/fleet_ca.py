"""``edgedeploy fleet enroll|ca|broker-config|acl``: the fleet CA, client identities and the broker's files."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edge_agent.fleet_messages import DEFAULT_PREFIX
from packager.cli.output import print_json
from packager.fleet_ca import KEY_TYPES, FleetCA, broker_acl

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the CA actions to ``edgedeploy fleet``."""
    enroll = sub.add_parser("enroll", help="a device's (or controller's) certificate and key from the fleet CA")
    enroll.add_argument("device", nargs="?", help="the device id (the certificate's common name)")
    enroll.add_argument("--controller", dest="controller_name", metavar="NAME",
                        help="enroll a controller identity instead: every device topic")
    enroll.add_argument("-o", "--output", required=True, type=Path, help="folder for the certificate, key and CA")
    enroll.add_argument("--days", type=int, default=365, help="days the certificate is valid (default 365)")
    enroll.add_argument("--json", action="store_true")
    enroll.set_defaults(func=_enroll)

    ca = sub.add_parser("ca", help="the fleet CA: init once, show")
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    init = ca_sub.add_parser("init", help="create the fleet CA under EDGEDEPLOY_HOME (once)")
    init.add_argument("--days", type=int, default=3650, help="days the CA is valid (default 3650)")
    init.add_argument("--key-type", choices=KEY_TYPES, default="p256", help="p256 (default) or ed25519")
    init.add_argument("--name", default="edgedeploy fleet CA", help="the CA's common name")
    init.set_defaults(func=_ca_init)
    show = ca_sub.add_parser("show", help="the CA's certificate and the identities it issued")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_ca_show)

    broker = sub.add_parser("broker-config", help="Mosquitto TLS listener, server certificate and ACL")
    broker.add_argument("-o", "--output", required=True, type=Path, help="folder for the broker's files")
    broker.add_argument("--hostname", action="append", default=[], required=True,
                        help="name or address devices use for the broker (repeatable)")
    broker.add_argument("--port", type=int, default=8883, help="listener port (default 8883)")
    broker.add_argument("--bind", help="listener address (default: every address)")
    broker.add_argument("--install-dir", type=Path,
                        help="where the files will lie on the broker (default: the -o folder)")
    broker.add_argument("--days", type=int, default=825, help="days the server certificate is valid")
    broker.add_argument("--topic-prefix", default=DEFAULT_PREFIX, help=f"topic prefix (default {DEFAULT_PREFIX})")
    broker.set_defaults(func=_broker_config)

    acl = sub.add_parser("acl", help="the broker's ACL alone (again after enrolling a controller)")
    acl.add_argument("-o", "--output", type=Path, help="write it here (default: stdout)")
    acl.add_argument("--topic-prefix", default=DEFAULT_PREFIX, help=f"topic prefix (default {DEFAULT_PREFIX})")
    acl.set_defaults(func=_acl)


def _enroll(args: argparse.Namespace) -> int:
    from edge_agent.errors import UsageError

    if (args.device is None) == (args.controller_name is None):
        raise UsageError("give a DEVICE id or --controller NAME (one of them)")
    role = "device" if args.controller_name is None else "controller"
    enrollment = FleetCA().enroll(args.device or args.controller_name, args.output, args.days, role)
    if args.json:
        print_json(enrollment.to_dict())
        return 0
    print(f"enrolled {role} {enrollment.name}: {enrollment.certificate}, {enrollment.key} (mode 0600) and "
          f"{enrollment.ca}; valid until {enrollment.not_after[:10]}")
    if role == "controller":
        print("the broker's ACL lists controllers by name: run `edgedeploy fleet acl -o FILE` (or broker-config)"
              " again and send mosquitto SIGHUP")
        print(f"controller: --broker mqtts://HOST:8883 --ca-file {enrollment.ca} --tls-cert {enrollment.certificate}"
              f" --tls-key {enrollment.key}  (or $EDGEDEPLOY_BROKER_CA, _CERT, _KEY)")
        return 0
    broker = args.broker or os.environ.get("EDGEDEPLOY_BROKER") or ""
    print("agent.yaml (beside these files; its paths are relative to its own folder):")
    print(enrollment.agent_yaml(broker if broker.startswith("mqtts://") else "mqtts://BROKER-HOST:8883"), end="")
    return 0


def _ca_init(args: argparse.Namespace) -> int:
    ca = FleetCA()
    ca.init(args.name, args.days, args.key_type)
    info = ca.show()
    print(f"created the fleet CA {info['subject']} ({info['key_type']}, until {info['not_after'][:10]}): "
          f"{ca.cert_path}; its key {ca.key_path} (mode 0600) stays on this machine")
    return 0


def _ca_show(args: argparse.Namespace) -> int:
    info = FleetCA().show()
    if args.json:
        print_json(info)
        return 0
    for key in ("subject", "key_type", "sha256", "not_before", "not_after", "certificate"):
        print(f"{key}: {info[key]}")
    for identity in info["identities"]:
        print(f"  {identity['role']:<10} {identity['name']}  until {identity['not_after'][:10]}")
    return 0


def _broker_config(args: argparse.Namespace) -> int:
    paths = FleetCA().write_broker_config(args.output, args.hostname, args.port, args.bind, args.topic_prefix,
                                          args.install_dir, args.days)
    print(f"wrote {', '.join(p.name for p in paths)} to {args.output} (server.key mode 0600; the broker's user "
          "must be able to read it)")
    return 0


def _acl(args: argparse.Namespace) -> int:
    text = broker_acl(args.topic_prefix, FleetCA().controllers())
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
        print(f"wrote {args.output}")
    return 0
