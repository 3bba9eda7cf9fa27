"""The entry-script backend: a bundle's ``score.py`` with ``init()`` and ``run(...)``, Azure ML style.

Calling convention, as Azure ML's inference server does it, so migrated scripts run unchanged:
a ``run`` decorated with inference-schema's ``@input_schema`` gets the JSON body's fields as
keyword arguments (the decorators convert them to numpy/pandas); any other ``run`` gets the raw
body: the JSON text as ``str`` (Azure ML scripts call ``json.loads`` on it themselves), or
``bytes`` for a non-JSON body such as an image. While the model
loads, ``AZUREML_MODEL_DIR`` and ``EDGEDEPLOY_MODEL_DIR`` name the bundle's ``model`` folder, and
the bundle's source folder is importable. A script may also define ``configure(params)``: it gets
the run-time parameters a ``config`` request set (``edgedeploy fleet config``), after ``init()``
and on every change; what it raises refuses them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edge_agent.bundle import BundleManifest
from edge_agent.errors import BundleError, InferenceError, InvalidInputError, ModelNotReadyError, ValidationError
from edge_agent.runtime.base import CURRENT_MODEL_DIR, ModelInfo, ModelSpecs

__all__ = ["EntryScriptModel", "ensure_requirements", "load"]

log = logging.getLogger(__name__)
_ENV_LOCK = threading.Lock()
_MODULE_PREFIX = "edgedeploy_entry_"


def _unsatisfied(requirements: Path) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import InvalidRequirement, Requirement

    missing = []
    for line in requirements.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if not text or text.startswith("-"):
            continue
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            raise BundleError(f"requirements.txt: cannot parse {text!r}") from None
        try:
            if version(requirement.name) not in requirement.specifier:
                missing.append(text)
        except PackageNotFoundError:
            missing.append(text)
    return missing


def ensure_requirements(requirements: Path, deps_root: Path) -> Path | None:
    """Make the bundle's requirements importable: nothing when all are installed, else pip --target."""
    missing = _unsatisfied(requirements)
    if not missing:
        return None
    target = deps_root / hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    if not (target / ".complete").exists():
        log.info("installing entry-script requirements %s into %s", missing, target)
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), *missing],
                                capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise BundleError(f"cannot install the bundle's requirements {missing}: {last}")
        (target / ".complete").touch()
    return target


def _import_script(path: Path, module_name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise BundleError(f"cannot import entry script {path.name}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _importable(source_dir: Path) -> Iterator[None]:
    """``source_dir`` on sys.path while the script imports and initialises; afterwards its modules
    leave ``sys.modules`` again (the script keeps its references), so the next version of the same
    bundle imports its own ``helpers`` rather than the cached ones of the version it replaces."""
    before = set(sys.modules)
    sys.path.insert(0, str(source_dir))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(source_dir))
        for name in set(sys.modules) - before:
            if name.startswith(_MODULE_PREFIX):
                continue  # the entry script itself stays importable by name (pickles may refer to it)
            origin = getattr(sys.modules.get(name), "__file__", None) or ""
            if origin and Path(origin).resolve().is_relative_to(source_dir.resolve()):
                sys.modules.pop(name, None)


class EntryScriptModel(ModelSpecs):
    """A loaded entry script. ``failure`` holds the error when ``init()`` raised (model not ready)."""

    def __init__(self, module: ModuleType, info: ModelInfo) -> None:
        self.module = module
        self.info = info
        self.failure: str | None = None
        run = getattr(module, "run", None)
        if not callable(run):
            raise BundleError(f"entry script {info.manifest.entry_script} defines no run() function")
        self._run = run
        self._schema = _schema_of(run)

    def call_init(self) -> None:
        init = getattr(self.module, "init", None)
        if not callable(init):
            return
        token = CURRENT_MODEL_DIR.set(self.info.bundle_dir / "model")
        try:
            init()
        except Exception as exc:  # noqa: BLE001 - any failure of user code makes the model not ready
            self.failure = f"init() failed: {type(exc).__name__}: {exc}"
            log.error("model %s: %s", self.info.name, self.failure)
        finally:
            CURRENT_MODEL_DIR.reset(token)

    def score(self, body: Any, content_type: str) -> Any:
        if self.failure:
            raise ModelNotReadyError(f"model {self.info.name!r} is not ready: {self.failure}")
        if self._schema is not None:
            arguments = _json(body)
            if not isinstance(arguments, dict):
                raise InvalidInputError("this model's input schema needs a JSON object body")
            return self._call(**arguments)
        if isinstance(body, bytes) and "json" not in content_type:
            return self._call(body)
        # Azure ML's convention: a run() without a schema parses the JSON text itself
        text = body.decode() if isinstance(body, bytes) else json.dumps(body)
        _json(text)
        return self._call(text)

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        token = CURRENT_MODEL_DIR.set(self.info.bundle_dir / "model")
        try:
            return _jsonable(self._run(*args, **kwargs))
        except TypeError as exc:
            if self._schema is not None:
                raise InvalidInputError(f"the request does not fit run()'s input schema: {exc}") from None
            raise InferenceError(f"run() failed: TypeError: {exc}") from None
        except (InvalidInputError, ModelNotReadyError):
            raise
        except Exception as exc:  # noqa: BLE001 - user code: answer 500 with its message, keep serving
            raise InferenceError(f"run() failed: {type(exc).__name__}: {exc}") from None
        finally:
            CURRENT_MODEL_DIR.reset(token)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(inputs) == 1 and self._schema is None:
            body: Any = {"data": next(iter(inputs.values())).tolist()}
        else:
            body = {name: value.tolist() for name, value in inputs.items()}
        result = self.score(body, "application/json")
        if isinstance(result, dict):
            return {str(k): np.asarray(v) for k, v in result.items()}
        return {"output": np.asarray(result)}

    def schema(self) -> dict[str, Any] | None:
        return self._schema

    def configure(self, params: dict[str, Any]) -> None:
        """Hand run-time parameters to the script's ``configure(params)``, when it defines one.

        It gets the whole set each time, never a difference. What it raises refuses them
        (ValidationError with its message), and the agent keeps the previous set.
        """
        hook = getattr(self.module, "configure", None)
        if not callable(hook):
            return
        token = CURRENT_MODEL_DIR.set(self.info.bundle_dir / "model")
        try:
            hook(dict(params))
        except Exception as exc:  # noqa: BLE001 - user code: its refusal is the request's error
            raise ValidationError(f"configure() refused the parameters: {type(exc).__name__}: {exc}") from None
        finally:
            CURRENT_MODEL_DIR.reset(token)

    def unload(self) -> None:
        sys.modules.pop(self.module.__name__, None)


def _json(body: Any) -> Any:
    if isinstance(body, bytes | str):
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise InvalidInputError("the request body is not valid JSON") from None
    return body


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return value.to_dict(orient="records") if "orient" in value.to_dict.__code__.co_varnames else value.to_dict()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _schema_of(run: Any) -> dict[str, Any] | None:
    try:
        from inference_schema.schema_util import get_input_schema, get_output_schema, is_schema_decorated
    except ImportError:
        return None
    if not is_schema_decorated(run):
        return None
    return {"input": get_input_schema(run), "output": get_output_schema(run)}


def load(bundle_dir: Path, manifest: BundleManifest, info: ModelInfo) -> EntryScriptModel:
    """Import the bundle's entry script with its model folder and requirements, then call ``init()``."""
    entry = manifest.entry_script or {}
    script = bundle_dir / str(entry.get("script", ""))
    if not entry or not script.is_file():
        raise BundleError("the bundle names the entry-script backend but carries no entry script")
    source_dir = bundle_dir / str(entry.get("source_dir") or Path(str(entry["script"])).parent)
    if entry.get("requirements"):
        deps_root = (info.workdir or bundle_dir.parent) / "deps"
        deps = ensure_requirements(bundle_dir / str(entry["requirements"]), deps_root)
        if deps is not None and str(deps) not in sys.path:
            sys.path.insert(0, str(deps))
    model_dir = bundle_dir / "model"
    with _ENV_LOCK, _importable(source_dir):
        os.environ["AZUREML_MODEL_DIR"] = str(model_dir)
        os.environ["EDGEDEPLOY_MODEL_DIR"] = str(model_dir)
        module_name = f"{_MODULE_PREFIX}{hashlib.sha256(str(bundle_dir).encode()).hexdigest()[:12]}"
        try:
            model = EntryScriptModel(_import_script(script, module_name), info)
        except BundleError:
            sys.modules.pop(module_name, None)
            raise
        except Exception as exc:  # noqa: BLE001 - an import error in user code: refuse the bundle
            sys.modules.pop(module_name, None)
            raise BundleError(f"importing entry script {script.name} failed: {type(exc).__name__}: {exc}") from None
        model.call_init()
    info.platform = "entry-script"
    return model
