"""``edgedeploy deploy``: start a service from a bundle and wait until it answers."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_agent.errors import UsageError
from packager import services
from packager.cli.output import progress
from packager.targets import target_names

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``deploy`` to the ``edgedeploy`` parser."""
    parser = subparsers.add_parser("deploy", help="start a service from a bundle (local, docker, kubernetes)")
    parser.add_argument("name", help="service name (lowercase letters, digits, '-')")
    parser.add_argument("--bundle", required=True, type=Path, help="signed bundle to serve")
    parser.add_argument("--target", default="local", choices=target_names(),
                        help="where the service runs: the installed deploy targets (edgedeploy.targets plug-ins)")
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
    parser.add_argument("--image", help="kubernetes: container image running edge-agent (default: the image "
                                        "`--target docker` builds for this bundle, which carries it)")
    parser.add_argument("--base-image", help="docker: base image with python3 (default: edgedeploy/base:bookworm, "
                                             "built locally by `edgedeploy image base` when absent)")
    parser.add_argument("--kubeconfig", type=Path, help="kubernetes: kubeconfig (default: $KUBECONFIG, ~/.kube/config)")
    parser.add_argument("--namespace", help="kubernetes: namespace (default: default)")
    parser.add_argument("--server", help="kubernetes: bundle server URL an init container pulls the bundle from "
                                         "(default: the bundle is baked into the image)")
    parser.set_defaults(func=_deploy)


def _deploy(args: argparse.Namespace) -> int:
    if args.dry_run or args.output is not None:
        if args.target != "kubernetes" or not (args.dry_run and args.output is not None):
            raise UsageError("--dry-run -o DIR writes Kubernetes manifests: use it with --target kubernetes")
        return _write_kubernetes(args)
    with progress(f"deploying {args.name} ({args.target})"):
        service = services.deploy(
            args.name, args.bundle, target=args.target, port=args.port, grpc_port=args.grpc_port,
            auth=args.auth, cpu=args.cpu, memory_mb=args.memory_mb, replicas=args.replicas,
            wait=args.wait, host=args.host, timeout=args.timeout, base_image=args.base_image,
            kubeconfig=args.kubeconfig, image=args.image, bundle_server=args.server, namespace=args.namespace,
        )
    if args.json:
        from packager.cli.output import print_json

        print_json(service.to_dict())
    else:
        print(service.scoring_uri or f"service {service.name} is {service.state}")
    return 0


def _write_kubernetes(args: argparse.Namespace) -> int:
    """Render the Kubernetes objects for a verified bundle into ``args.output``."""
    from edge_agent.auth import generate_keys
    from edge_agent.bundle import bundle_sha256, verify_bundle
    from packager.images import image_tag
    from packager.targets.kubernetes import KubernetesOptions, render_manifests, trusted_public_keys, write_manifests

    if not args.bundle.is_file():
        raise UsageError(f"bundle not found: {args.bundle}")
    verify_bundle(args.bundle)
    digest = bundle_sha256(args.bundle)
    url = None
    if args.server:
        from packager.bundle_server import publish_bundle

        url = args.server.rstrip("/") + publish_bundle(args.bundle)[1]
    options = KubernetesOptions(
        name=args.name, image=args.image or image_tag(args.name, digest), bundle_url=url, bundle_sha256=digest,
        replicas=args.replicas or 1, cpu=args.cpu, memory_mb=args.memory_mb,
        auth=True if args.auth is None else args.auth, keys=generate_keys(), trusted_keys=trusted_public_keys(),
    )
    paths = write_manifests(render_manifests(options), args.output)
    print(f"wrote {len(paths)} manifests to {args.output} (kubectl apply -f {args.output / 'all.yaml'})")
    return 0

