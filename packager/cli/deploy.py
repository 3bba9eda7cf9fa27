"""``edgedeploy deploy``: start a service from a bundle and wait until it answers."""

from __future__ import annotations

import argparse
from pathlib import Path

from packager import services
from packager.cli.output import progress
from packager.errors import UsageError
from packager.targets import KNOWN_TARGETS, get_target

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``deploy`` to the ``edgedeploy`` parser."""
    parser = subparsers.add_parser("deploy", help="start a service from a bundle (local now)")
    parser.add_argument("name", help="service name (lowercase letters, digits, '-')")
    parser.add_argument("--bundle", required=True, type=Path, help="signed bundle to serve")
    parser.add_argument("--target", default="local", choices=KNOWN_TARGETS)
    parser.add_argument("--port", type=int, default=None, help="REST port (default: a free one)")
    parser.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--auth", action=argparse.BooleanOptionalAction, default=None,
                        help="require a key (default: off on loopback, on otherwise)")
    parser.add_argument("--cpu", type=float, default=None,
                        help="CPU cores (recorded; enforced by container targets)")
    parser.add_argument("--memory-mb", type=int, default=None, help="memory limit in MiB (recorded)")
    parser.add_argument("--replicas", type=int, default=None, help="replicas (recorded)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for ready (default 60)")
    parser.add_argument("--no-wait", dest="wait", action="store_false",
                        help="return as soon as the process started")
    parser.add_argument("--json", action="store_true", help="print the service as JSON")
    parser.add_argument("--dry-run", action="store_true", help="kubernetes: write the manifests only (with -o)")
    parser.add_argument("-o", "--output", type=Path, help="folder for --dry-run manifests")
    parser.set_defaults(func=_deploy)


def _deploy(args: argparse.Namespace) -> int:
    if args.dry_run or args.output is not None:
        if args.target != "kubernetes" or not (args.dry_run and args.output is not None):
            raise UsageError("--dry-run -o DIR writes Kubernetes manifests: use it with --target kubernetes")
        get_target("kubernetes")  # refuses clearly while the Kubernetes target is not built
    with progress(f"deploying {args.name} ({args.target})"):
        service = services.deploy(
            args.name, args.bundle, target=args.target, port=args.port, grpc_port=args.grpc_port,
            auth=args.auth, cpu=args.cpu, memory_mb=args.memory_mb, replicas=args.replicas,
            wait=args.wait, host=args.host, timeout=args.timeout,
        )
    if args.json:
        from packager.cli.output import print_json

        print_json(service.to_dict())
    else:
        print(service.scoring_uri or f"service {service.name} is {service.state}")
    return 0
