"""The packager: (model, device profile, options) → one signed bundle.

Stages, each its own function: resolve the model → optimize (onnxruntime, offline) → quantize →
validate against fp32 (refuse a drop over the limit unless forced) → measure → write and sign.
A model that is not ONNX (a pickled estimator, a folder) is carried as is for an entry script.

Bundles are reproducible: the same inputs and key give the same bytes. What cannot be reproduced,
the latencies measured while packaging, stays out of the signed manifest; it is returned in
``PackageResult.report`` (which the CLI prints) and kept in the side report ``BUNDLE.report.json``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.atomic import atomic_write_json
from edge_agent.bundle import BundleManifest, canonical_json, tree_sha256
from edge_agent.errors import AccuracyError, NotFoundError, UsageError, ValidationError
from edge_agent.profiles import DeviceProfile, load_profile
from edge_agent.tensors import TensorSpec, v2_to_numpy
from packager.bundle import PayloadSource, write_bundle
from packager.evaluate import Predictor, accuracy_points, agreement_points, batch1_latency_ms
from packager.keys import load_signing_key
from packager.optimize import describe_io, operator_counts, optimize_model
from packager.quantize import PRECISION_OF, QUANTIZATIONS, quantize_model
from packager.samples import load_arrays, load_sample, match_inputs, sample_to_inputs, split_labels

__all__ = ["PackageResult", "ResolvedModel", "package", "parse_batching", "resolve_model", "side_report_path"]

Progress = Callable[[str], AbstractContextManager[None]]
_SERVED_BACKENDS = ("onnxruntime", "hls4ml", "ice40")
# what the signed report says in place of the measured timings (no path: it would vary with -o)
_TIMINGS_NOTE = "measured while packaging, not signed: printed, and kept in the side report BUNDLE.report.json"


@dataclass(frozen=True)
class ResolvedModel:
    """The model to package: where its files are and what the registry knows of it."""

    path: Path
    info: dict[str, Any]

    @property
    def is_onnx(self) -> bool:
        return self.path.is_file() and self.path.suffix == ".onnx"


@dataclass(frozen=True)
class PackageResult:
    """What ``package`` produced: the bundle file, its sha256, manifest and the full report.

    ``report`` includes the measured timings that the signed ``manifest.report`` leaves out; the side
    report at ``report_path`` keeps them beside the bundle.
    """

    bundle_path: Path
    sha256: str
    manifest: BundleManifest
    report: dict[str, Any]
    report_path: Path


def resolve_model(model: str | Path, name: str | None = None) -> ResolvedModel:
    """A path on disk, or a registered ``NAME[:VERSION]`` (latest when no version)."""
    candidate = Path(model)
    if candidate.exists():
        framework = "onnx" if candidate.suffix == ".onnx" else None
        info: dict[str, Any] = {"name": name or candidate.stem, "version": None, "sha256": tree_sha256(candidate),
                "framework": framework, "description": ""}
        return ResolvedModel(candidate, info)
    if "/" in str(model) or candidate.suffix in (".onnx", ".pkl", ".joblib", ".pt"):
        raise NotFoundError(f"{model!r} is neither a file nor a registered model (no such file)")
    from packager.registry import Registry, parse_model_ref

    ref_name, version = parse_model_ref(str(model))
    registry = Registry()
    try:
        record = registry.get(ref_name, version)
    except NotFoundError as exc:
        raise NotFoundError(f"{model!r} is neither a file nor a registered model ({exc})") from None
    path = registry.get_model_path(ref_name, record.version)
    info = {"name": name or record.name, "version": record.version, "sha256": record.sha256,
            "framework": record.framework, "description": record.description}
    return ResolvedModel(path, info)


def parse_batching(text: str) -> dict[str, Any]:
    """``max_batch=32,max_delay_us=500,preferred=8;16`` → the manifest's batching document."""
    names = {"max_batch": "max_batch_size", "max_delay_us": "max_queue_delay_us", "preferred": "preferred_batch_sizes"}
    result: dict[str, Any] = {"max_batch_size": 8, "max_queue_delay_us": 500, "preferred_batch_sizes": []}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in names:
            raise UsageError(f"bad --batching item {part!r}: use max_batch=N,max_delay_us=N,preferred=A;B")
        try:
            numbers = [int(v) for v in value.split(";") if v]
        except ValueError:
            raise UsageError(f"bad --batching value {value!r}: integers expected") from None
        if not numbers or any(n < 0 for n in numbers):
            raise UsageError(f"bad --batching value {value!r}: non-negative integers expected")
        field = names[key.strip()]
        result[field] = numbers if field == "preferred_batch_sizes" else numbers[0]
    if result["max_batch_size"] < 1:
        raise UsageError("--batching max_batch must be at least 1")
    return result


def _check_precision(profile: DeviceProfile, mode: str) -> str:
    if mode not in QUANTIZATIONS:
        raise UsageError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANTIZATIONS)}")
    precision = PRECISION_OF[mode]
    if precision not in profile.precisions:
        raise UsageError(
            f"profile {profile.name} does not run {precision} models (it lists {', '.join(profile.precisions)}); "
            "pick another --quantize"
        )
    return precision


def _dtypes(specs: list[TensorSpec]) -> dict[str, np.dtype]:
    return {spec.name: v2_to_numpy(spec.datatype) for spec in specs}


def _synthetic_inputs(specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {s.name: rng.random([d if d > 0 else 1 for d in s.shape]).astype(v2_to_numpy(s.datatype)) for s in specs}


def _validate(
    source: Path, packaged: Path, validation: Path, inputs: list[str], limit: float, force: bool
) -> dict[str, Any]:
    """Accuracy (with labels) or top-1 agreement with fp32 (without); refuses a drop over ``limit``."""
    arrays, labels = split_labels(load_arrays(validation, "validation set"))
    feed = match_inputs(arrays, inputs, "validation set")
    reference, candidate = Predictor(source), Predictor(packaged)
    if labels is not None:
        metric, fp32 = "accuracy", accuracy_points(reference, feed, labels)
        ours = accuracy_points(candidate, feed, labels)
    else:
        metric, fp32, ours = "agreement with fp32", 100.0, agreement_points(reference, candidate, feed)
    drop = fp32 - ours
    result = {"metric": metric, "fp32": round(fp32, 4), "packaged": round(ours, 4), "drop": round(drop, 4),
              "limit": limit, "samples": int(len(next(iter(feed.values())))), "forced": bool(force and drop > limit)}
    if drop > limit and not force:
        raise AccuracyError(
            f"{metric} drops {drop:.2f} points ({fp32:.2f} → {ours:.2f}), over the limit of {limit:.2f}; "
            "use another --quantize, a better --calibration set, or --force"
        )
    return result


def _measure(source: Path, packaged: Path, feed: dict[str, np.ndarray], timed: bool) -> dict[str, Any]:
    before = {"size": source.stat().st_size, "operators": operator_counts(source)}
    after = {"size": packaged.stat().st_size, "operators": operator_counts(packaged)}
    if timed:
        before["latency_ms"] = batch1_latency_ms(Predictor(source), feed)
        after["latency_ms"] = batch1_latency_ms(Predictor(packaged), feed)
    return {"before": before, "after": after}


def _available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


@dataclass
class _Options:
    quantize: str | None
    calibration: Path | None
    validation: Path | None
    max_accuracy_drop: float
    force: bool
    input_sample: Path | None
    output_sample: Path | None


def _package_onnx(
    model: ResolvedModel, profile: DeviceProfile, opts: _Options, scratch: Path, step: Progress
) -> tuple[Path, dict[str, Any], list[TensorSpec], list[TensorSpec], dict[str, Any]]:
    """Optimize, quantize, validate and measure; returns (model file, runtime, inputs, outputs, report)."""
    mode = opts.quantize or profile.default_quantization
    precision = _check_precision(profile, mode)
    inputs, outputs = describe_io(model.path)
    names = [s.name for s in inputs]
    # Quantizers need standard operators: int8 paths run onnxruntime's own pre-processing (basic
    # fusions), fp16 a basic pass; only an unquantized model gets the profile's full level.
    level = "extended" if profile.optimization_level == "all" else profile.optimization_level
    if mode != "none":
        level = "basic"
    if mode.endswith("int8"):
        source_for_quantizer = model.path  # the int8 quantizers run onnxruntime's own pre-processing
    else:
        with step(f"optimizing the graph ({level})"):
            source_for_quantizer = optimize_model(model.path, scratch / "optimized.onnx", level)
    calibration = None
    if opts.calibration is not None:
        calibration = match_inputs(load_arrays(opts.calibration, "calibration set"), names, "calibration set")
    with step(f"quantizing ({mode})"):
        packaged = quantize_model(source_for_quantizer, scratch / "model.onnx", mode, calibration)
    report: dict[str, Any] = {"quantization": mode, "precision": precision, "optimization": level}
    if opts.validation is not None:
        with step("validating against fp32"):
            report["validation"] = _validate(model.path, packaged, opts.validation, names,
                                             opts.max_accuracy_drop, opts.force)
    feed = calibration or _synthetic_inputs(inputs)
    with step("measuring"):
        report.update(_measure(model.path, packaged, feed, timed=True))
    report["execution_providers"] = profile.execution_providers
    report["available_here"] = [p for p in profile.execution_providers if p in _available_providers()]
    runtime = {"backend": "onnxruntime", "model_path": "model/model.onnx", "precision": precision,
               "execution_providers": profile.execution_providers, "optimization_level": level}
    return packaged, runtime, inputs, outputs, report


def _package_fpga(
    model: ResolvedModel, device: DeviceProfile, opts: _Options, scratch: Path, step: Progress,
    payload: dict[str, PayloadSource], roles: dict[str, str],
) -> tuple[dict[str, Any], list[TensorSpec], list[TensorSpec], dict[str, Any], dict[str, Any]]:
    """Compile for the profile's FPGA (see :mod:`packager.fpga.stage`); the source model rides along."""
    from packager.fpga.stage import compile_for_profile, input_specs

    if opts.quantize not in (None, "none"):
        raise UsageError(f"--quantize does not apply to {device.name}: its compiler chooses fixed-point or int8 "
                         "types itself from the calibration set")
    inputs = input_specs(model.path)
    names = [s.name for s in inputs]
    calibration = None
    if opts.calibration is not None:
        calibration = match_inputs(load_arrays(opts.calibration, "calibration set"), names, "calibration set")
    labels = None
    if opts.validation is not None:
        arrays, y = split_labels(load_arrays(opts.validation, "validation set"))
        if y is not None:
            labels = (match_inputs(arrays, names, "validation set")[names[0]], y)
    with step(f"compiling for {device.name} ({device.backend})"):
        stage = compile_for_profile(model.path, device, None if calibration is None else calibration[names[0]],
                                    scratch, labels)
    payload["model/model.onnx"] = model.path
    roles["model/model.onnx"] = "model"
    for path, source in stage.payload.items():
        payload[path], roles[path] = source, "accelerator"
    report = {"quantization": "none", "precision": stage.runtime["precision"], "accelerator": stage.report}
    return stage.runtime, inputs, stage.outputs, report, stage.accelerator


def _signed_report(report: dict[str, Any]) -> dict[str, Any]:
    """The report kept in the signed manifest: everything but the timings, which differ on every run."""
    stored = json.loads(json.dumps(report))
    timed = False
    for side in ("before", "after"):
        timed = stored.get(side, {}).pop("latency_ms", None) is not None or timed
    if timed:
        stored["timings"] = _TIMINGS_NOTE
    return stored


def side_report_path(bundle: str | Path) -> Path:
    """Where the packaging report with its timings is kept: ``BUNDLE.report.json`` beside the bundle."""
    bundle = Path(bundle)
    return bundle.with_name(bundle.name + ".report.json")


def _write_side_report(bundle: Path, digest: str, manifest: BundleManifest, report: dict[str, Any]) -> Path:
    path = side_report_path(bundle)
    document = {"bundle_sha256": digest, "model": manifest.model, "profile": manifest.profile_name,
                "report": report}
    atomic_write_json(path, document)
    return path


def _output_sample(packaged: Path, sample: Any, inputs: list[TensorSpec]) -> dict[str, Any]:
    feed = sample_to_inputs(sample, [s.name for s in inputs], _dtypes(inputs))
    predictor = Predictor(packaged)
    names = [o.name for o in predictor.session.get_outputs()]
    return {name: value.tolist() for name, value in zip(names, predictor.run(feed), strict=True)}


def _model_files(path: Path) -> Iterator[tuple[str, Path]]:
    if path.is_file():
        yield f"model/{path.name}", path
        return
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        yield f"model/{item.relative_to(path).as_posix()}", item


def _entry_payload(
    entry_script: Path, source_dir: Path | None, requirements: Path | None
) -> tuple[dict[str, PayloadSource], dict[str, Any]]:
    payload: dict[str, PayloadSource] = {}
    if source_dir is not None:
        if not source_dir.is_dir():
            raise NotFoundError(f"source folder not found: {source_dir}")
        for item in sorted(p for p in source_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            payload[f"src/{item.relative_to(source_dir).as_posix()}"] = item
        script = entry_script if entry_script.is_absolute() else source_dir / entry_script
        if not script.is_file() or source_dir.resolve() not in script.resolve().parents:
            raise UsageError(f"entry script {entry_script} must be a file inside --source-dir {source_dir}")
        script_path = f"src/{script.resolve().relative_to(source_dir.resolve()).as_posix()}"
    else:
        if not entry_script.is_file():
            raise NotFoundError(f"entry script not found: {entry_script}")
        script_path = f"src/{entry_script.name}"
        payload[script_path] = entry_script
    document: dict[str, Any] = {"script": script_path, "source_dir": "src", "requirements": None}
    if requirements is not None:
        if not requirements.is_file():
            raise NotFoundError(f"requirements file not found: {requirements}")
        payload["requirements.txt"] = requirements
        document["requirements"] = "requirements.txt"
    return payload, document


def package(
    model: str | Path,
    profile: str,
    out: str | Path,
    *,
    quantize: str | None = None,
    calibration: str | Path | None = None,
    validation: str | Path | None = None,
    max_accuracy_drop: float = 1.0,
    force: bool = False,
    entry_script: str | Path | None = None,
    source_dir: str | Path | None = None,
    requirements: str | Path | None = None,
    input_sample: str | Path | None = None,
    output_sample: str | Path | None = None,
    batching: dict[str, Any] | None = None,
    key_name: str | None = None,
    reproducible: bool = True,
    name: str | None = None,
    progress: Progress | None = None,
) -> PackageResult:
    """Package ``model`` (a path or ``NAME[:VERSION]``) for ``profile`` into the bundle ``out``.

    Every bundle is reproducible; ``reproducible`` is accepted for callers written when it was an
    option and changes nothing. The measured timings are in the result's ``report`` and side report.
    """
    del reproducible  # always: timings never enter the signed manifest
    step: Progress = progress or (lambda _label: nullcontext())
    key = load_signing_key(key_name)
    device = load_profile(profile)
    if device.backend not in _SERVED_BACKENDS:
        raise UsageError(f"profile {device.name} uses the {device.backend} backend, which this version cannot "
                         f"package; use one of: {', '.join(_SERVED_BACKENDS)}")
    if max_accuracy_drop < 0:
        raise UsageError("--max-accuracy-drop must be zero or more points")
    resolved = resolve_model(model, name)
    opts = _Options(quantize, _opt_path(calibration), _opt_path(validation), max_accuracy_drop, force,
                    _opt_path(input_sample), _opt_path(output_sample))
    with tempfile.TemporaryDirectory(prefix="edgedeploy-package-") as tmp:
        return _build(resolved, device, opts, Path(tmp), Path(out), key, step,
                      _opt_path(entry_script), _opt_path(source_dir), _opt_path(requirements), batching)


def _opt_path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


def _build(
    model: ResolvedModel, device: DeviceProfile, opts: _Options, scratch: Path, out: Path, key: Any,
    step: Progress, entry_script: Path | None, source_dir: Path | None, requirements: Path | None,
    batching: dict[str, Any] | None,
) -> PackageResult:
    payload: dict[str, PayloadSource] = {}
    roles: dict[str, str] = {}
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    packaged: Path | None = None
    accelerator = None
    if model.is_onnx and device.backend != "onnxruntime":
        if entry_script is not None:
            raise UsageError(f"profile {device.name} compiles the model for an FPGA: an entry script cannot run there")
        runtime, inputs, outputs, report, accelerator = _package_fpga(model, device, opts, scratch, step,
                                                                      payload, roles)
    elif model.is_onnx:
        packaged, runtime, inputs, outputs, report = _package_onnx(model, device, opts, scratch, step)
        payload["model/model.onnx"] = packaged
        roles["model/model.onnx"] = "model"
    elif entry_script is None:
        raise UsageError(f"{model.path} is not an ONNX model: give an --entry-script that loads it")
    else:
        for path, source in _model_files(model.path):
            payload[path], roles[path] = source, "model"
        runtime = {"backend": "entry-script", "precision": None, "execution_providers": device.execution_providers,
                   "model_path": f"model/{model.path.name}" if model.path.is_file() else "model"}
        report = {"quantization": "none", "note": "not an ONNX model: carried unchanged for the entry script"}
    entry_doc = None
    if entry_script is not None:
        entry_payload, entry_doc = _entry_payload(entry_script, source_dir, requirements)
        payload.update(entry_payload)
        roles.update({path: "source" for path in entry_payload})
        runtime["backend"] = "entry-script"
    samples = _samples(opts, packaged, inputs, entry_doc is None, payload, roles)
    manifest = BundleManifest(
        model=model.info, profile=device.to_dict(), runtime=runtime, inputs=inputs, outputs=outputs,
        entry_script=entry_doc, samples=samples, batching=batching, accelerator=accelerator,
        report=_signed_report(report), created_by=f"edgedeploy {_version()}",
    )
    with step("signing and writing the bundle"):
        digest = write_bundle(out, manifest, payload, key, roles)
    return PackageResult(out, digest, manifest, report, _write_side_report(out, digest, manifest, report))


def _samples(
    opts: _Options, packaged: Path | None, inputs: list[TensorSpec], can_compute: bool,
    payload: dict[str, PayloadSource], roles: dict[str, str],
) -> dict[str, Any] | None:
    if opts.input_sample is None and opts.output_sample is None:
        return None
    document: dict[str, Any] = {"input": None, "output": None}
    sample_in = load_sample(opts.input_sample, "input sample") if opts.input_sample else None
    if sample_in is not None:
        payload["samples/input.json"] = canonical_json(sample_in)
        document["input"] = "samples/input.json"
    if opts.output_sample is not None:
        sample_out = load_sample(opts.output_sample, "output sample")
    elif sample_in is not None and packaged is not None and can_compute:
        try:
            sample_out = _output_sample(packaged, sample_in, inputs)
        except (ValueError, TypeError) as exc:
            raise ValidationError(f"the input sample does not fit the model's inputs: {exc}") from None
    else:
        sample_out = None
    if sample_out is not None:
        payload["samples/output.json"] = canonical_json(sample_out)
        document["output"] = "samples/output.json"
    for path in ("samples/input.json", "samples/output.json"):
        if path in payload:
            roles[path] = "sample"
    return document


def _version() -> str:
    from packager import __version__

    return __version__
