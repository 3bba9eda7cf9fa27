"""``edgedeploy image``: container images (the docker target's default base image, the controller's image)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_agent.errors import UsageError
from packager.cli.output import print_json

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("image", help="container images for the docker target")
    sub = parser.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    base = sub.add_parser("base", help="build the default slim Debian base image (debootstrap) when absent")
    base.add_argument("--force", action="store_true", help="rebuild even when it exists or is cached")
    base.add_argument("--json", action="store_true")
    base.set_defaults(func=_base)
    controller = sub.add_parser("controller", help="build the controller's image (edgedeploy controller), or "
                                                   "write its build context with --context")
    controller.add_argument("--tag", default="edgedeploy/controller:latest")
    controller.add_argument("--base-image", default=None, help="base image (default: the debootstrap one)")
    controller.add_argument("--context", type=Path, default=None, metavar="DIR",
                            help="write the build context (Dockerfile, wheels) to DIR instead of building")
    controller.add_argument("--json", action="store_true")
    controller.set_defaults(func=_controller)


def _base(args: argparse.Namespace) -> int:
    from packager.images import BASE_IMAGE, ensure_base_image
    from packager.targets.docker import DockerTarget

    target = DockerTarget()
    try:
        tag = ensure_base_image(target.client, BASE_IMAGE, force=args.force)
        image = target.client.images.get(tag)
        doc = {"image": tag, "id": image.id, "size": int(image.attrs.get("Size", 0))}
    finally:
        target.close()
    if args.json:
        print_json(doc)
    else:
        print(f"base image {doc['image']} ({doc['size'] / 1e6:.0f} MB) is ready")
    return 0


def _controller(args: argparse.Namespace) -> int:
    from packager.images import BASE_IMAGE, build_controller_image, write_controller_context

    base = args.base_image or BASE_IMAGE
    if args.context is not None:
        if args.context.exists() and any(args.context.iterdir()):
            raise UsageError(f"--context: {args.context} is not empty; give a new or empty folder")
        args.context.mkdir(parents=True, exist_ok=True)
        write_controller_context(args.context, base)
        doc = {"context": str(args.context), "dockerfile": str(args.context / "Dockerfile"), "base": base}
        _report(doc, args.json, f"controller build context written to {args.context} "
                                f"(docker build -t {args.tag} {args.context})")
        return 0
    from packager.targets.docker import DockerTarget

    target = DockerTarget()
    try:
        built = build_controller_image(target.client, base, args.tag)
    finally:
        target.close()
    doc = {"image": built.tag, "id": built.image_id, "size": built.size, "seconds": round(built.seconds, 1)}
    _report(doc, args.json, f"controller image {built.tag} ({built.size / 1e6:.0f} MB) is ready")
    return 0


def _report(doc: dict[str, object], as_json: bool, line: str) -> None:
    if as_json:
        print_json(doc)
    else:
        print(line)
