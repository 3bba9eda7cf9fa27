"""``edgedeploy bundle``: inspect, verify and safely extract bundles, and export one for offline devices."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edge_agent.bundle import BundleManifest, SignatureInfo, bundle_sha256, open_bundle, read_manifest, verify_bundle
from packager.cli.output import print_json, print_table
from packager.tuf_repo import parse_duration

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bundle", help="inspect, verify and extract bundles")
    sub = parser.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    inspect = sub.add_parser("inspect", help="show a bundle's manifest and who signed it")
    inspect.add_argument("bundle", type=Path)
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=_inspect)
    verify = sub.add_parser("verify", help="exit 0 only if signature, trust and every hash hold")
    verify.add_argument("bundle", type=Path)
    verify.set_defaults(func=_verify)
    extract = sub.add_parser("extract", help="verify, then unpack into an empty folder")
    extract.add_argument("bundle", type=Path)
    extract.add_argument("-o", "--output", required=True, type=Path)
    extract.set_defaults(func=_extract)
    export = sub.add_parser("export", help="write a folder (USB stick) with the bundle and its TUF metadata")
    export.add_argument("bundle", type=Path)
    export.add_argument("--for-offline", action="store_true", required=True,
                        help="for `edge-agent install DIR` on a device without network")
    export.add_argument("-o", "--output", required=True, type=Path)
    export.add_argument("--valid-for", type=parse_duration, metavar="DURATION",
                        help="re-sign snapshot and timestamp to stay valid this long (e.g. 14d; default: as published)")
    export.add_argument("--json", action="store_true")
    export.set_defaults(func=_export)


def _signature_text(info: SignatureInfo) -> str:
    if not info.trusted:
        return f"key {info.key_id} (NOT trusted here)"
    return f"key {info.key_id} ({'valid' if info.valid else 'INVALID signature'})"


def describe(manifest: BundleManifest) -> list[dict[str, Any]]:
    """Rows of (field, value) summarising a manifest."""
    model = manifest.model
    runtime = manifest.runtime
    io_text = "; ".join(f"{t.name} {t.datatype}{list(t.shape)}" for t in manifest.inputs)
    out_text = "; ".join(f"{t.name} {t.datatype}{list(t.shape)}" for t in manifest.outputs)
    rows = [
        ("model", f"{model['name']}:{model.get('version') or '-'}"),
        ("profile", manifest.profile_name),
        ("backend", runtime.get("backend")),
        ("precision", runtime.get("precision")),
        ("execution providers", ", ".join(runtime.get("execution_providers", []))),
        ("inputs", io_text or "-"),
        ("outputs", out_text or "-"),
        ("entry script", (manifest.entry_script or {}).get("script", "-")),
        ("accelerator", (manifest.accelerator or {}).get("board", "-")),
        ("files", f"{len(manifest.files)} ({sum(f.size for f in manifest.files)} bytes)"),
    ]
    return [{"field": k, "value": v} for k, v in rows]


def _inspect(args: argparse.Namespace) -> int:
    manifest, info = read_manifest(args.bundle)
    if args.json:
        print_json({
            "bundle": str(args.bundle),
            "sha256": bundle_sha256(args.bundle),
            "signature": {"key_id": info.key_id, "trusted": info.trusted, "valid": info.valid},
            "manifest": manifest.to_dict(),
        })
        return 0
    print(f"bundle {args.bundle}  sha256 {bundle_sha256(args.bundle)}")
    print(f"signed by {_signature_text(info)}")
    print_table(describe(manifest), ["field", "value"])
    print()
    print_table([f.to_dict() for f in manifest.files], ["path", "role", "size", "sha256"])
    return 0


def _verify(args: argparse.Namespace) -> int:
    manifest = verify_bundle(args.bundle)
    print(f"ok: {args.bundle} ({manifest.name}:{manifest.version or '-'}, {len(manifest.files)} files verified)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from packager.offline import export_offline  # brings the agent's install code: only when exporting

    document = export_offline(args.bundle, args.output, valid_for=args.valid_for)
    if args.json:
        print_json(document)
        return 0
    model = document["model"]
    print(f"wrote {args.output} for {model['name']}:{model['version']} (bundle {document['bundle_sha256'][:12]})")
    if document["metadata"] is None:
        print("note: no TUF repository here (edgedeploy repo init): devices with tuf_root refuse this folder")
    else:
        print(f"its TUF metadata expires at {document['metadata_expires']}")
    return 0


def _extract(args: argparse.Namespace) -> int:
    manifest = open_bundle(args.bundle, args.output)
    print(f"extracted {len(manifest.files)} verified files to {args.output}")
    return 0
