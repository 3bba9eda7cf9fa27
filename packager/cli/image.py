"""``edgedeploy image``: container images for the docker target (the default base image)."""

from __future__ import annotations

import argparse

from packager.cli.output import print_json

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("image", help="container images for the docker target")
    sub = parser.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    base = sub.add_parser("base", help="build the default slim Debian base image (debootstrap) when absent")
    base.add_argument("--force", action="store_true", help="rebuild even when it exists or is cached")
    base.add_argument("--json", action="store_true")
    base.set_defaults(func=_base)


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
