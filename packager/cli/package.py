"""``edgedeploy package``: build one signed bundle for a device profile."""

from __future__ import annotations

import argparse
from pathlib import Path

from packager.cli.output import print_json, progress
from packager.packaging import package, parse_batching
from packager.quantize import QUANTIZATIONS
from packager.report import format_report

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("package", help="optimize, quantize, validate and sign a model into a bundle")
    parser.add_argument("model", help="NAME[:VERSION] of a registered model, or a path")
    parser.add_argument("--profile", required=True, help="device profile name or YAML file")
    parser.add_argument("-o", "--output", required=True, type=Path, help="the bundle file to write")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, help="default: the profile's default_quantization")
    parser.add_argument("--calibration", type=Path, help=".npz file or folder of .npy (static-int8)")
    parser.add_argument("--validation", type=Path, help=".npz with inputs and optional 'labels'")
    parser.add_argument("--max-accuracy-drop", type=float, default=1.0, metavar="POINTS")
    parser.add_argument("--force", action="store_true", help="package even when accuracy drops too much")
    parser.add_argument("--entry-script", type=Path, help="score.py with init() and run(data)")
    parser.add_argument("--source-dir", type=Path, help="folder holding the entry script and its modules")
    parser.add_argument("--requirements", type=Path, help="requirements.txt for the entry script")
    parser.add_argument("--input-sample", type=Path, help=".json /score body, or .npy/.npz")
    parser.add_argument("--output-sample", type=Path, help=".json, .npy or .npz (computed when omitted)")
    parser.add_argument("--batching", type=parse_batching, metavar="max_batch=32,max_delay_us=500,preferred=8;16")
    parser.add_argument("--name", help="model name in the bundle (default: the registered name or file stem)")
    parser.add_argument("--key", dest="key_name", help="signing key name (default: 'default')")
    # bundles are always reproducible now; the flag stays so that scripts using it keep working
    parser.add_argument("--reproducible", action="store_true",
                        help="no effect: measured timings never enter the bundle, the same inputs give the same bytes")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=_package)


def _package(args: argparse.Namespace) -> int:
    result = package(
        args.model, args.profile, args.output, quantize=args.quantize, calibration=args.calibration,
        validation=args.validation, max_accuracy_drop=args.max_accuracy_drop, force=args.force,
        entry_script=args.entry_script, source_dir=args.source_dir, requirements=args.requirements,
        input_sample=args.input_sample, output_sample=args.output_sample, batching=args.batching,
        key_name=args.key_name, name=args.name, progress=progress,
    )
    if args.json:
        print_json({"bundle": str(result.bundle_path), "sha256": result.sha256,
                    "model": result.manifest.model, "profile": result.manifest.profile_name,
                    "report": result.report, "report_path": str(result.report_path)})
        return 0
    print(format_report(result.report))
    print(f"\nwrote {result.bundle_path} (sha256 {result.sha256})")
    print(f"the report with its timings (not signed): {result.report_path}")
    return 0
