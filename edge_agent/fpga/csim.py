"""The FPGA emulator: an HLS firmware project built into its bit-accurate C simulation and called in-process.

A bundle for an HLS target carries the firmware sources (hls4ml's ``myproject.cpp``, the ``nnet_utils``
and ``ap_types`` headers, the weight files and the Python bridge). :meth:`CSimModel.build` compiles
them with g++ into a shared library, once per firmware digest: the library and a copy of the weights
it reads live together in the cache folder, so a library stays valid when the bundle's own folder
goes away. Nothing here needs hls4ml; a device needs only g++.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np

from packager.errors import BundleError

__all__ = ["CSimModel", "firmware_digest"]

log = logging.getLogger(__name__)

_SOURCES = ("firmware", "myproject_bridge.cpp")


def firmware_digest(project: Path) -> str:
    """sha256 over every firmware file's relative path and bytes (sorted): the cache key."""
    digest = hashlib.sha256()
    for top in _SOURCES:
        root = Path(project) / top
        paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".so") if root.is_dir() else [root]
        for path in paths:
            digest.update(str(path.relative_to(project)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class CSimModel:
    """A compiled firmware: ``predict`` runs samples through the C simulation, one at a time."""

    def __init__(self, library: Path, inputs: int, outputs: int) -> None:
        self.library = library
        self.inputs, self.outputs = inputs, outputs
        self._lib = ctypes.CDLL(str(library))
        self._call = self._lib.myproject_double
        pointer = ctypes.POINTER(ctypes.c_double)
        self._call.argtypes = [pointer, pointer]
        self._call.restype = None
        self._lock = threading.Lock()  # the firmware loads its weights into statics on the first call

    @classmethod
    def build(cls, project: Path, cache_dir: Path, inputs: int, outputs: int) -> CSimModel:
        """Compile ``project`` (or reuse the cached library for the same firmware digest)."""
        project = Path(project)
        for needed in ("firmware/myproject.cpp", "firmware/weights", "firmware/ap_types", "myproject_bridge.cpp"):
            if not (project / needed).exists():
                raise BundleError(f"the firmware in the bundle has no {needed}")
        key = firmware_digest(project)
        home = Path(cache_dir) / key[:24]
        library = home / "myproject.so"
        if not library.exists():
            _compile(project, home)
        else:
            log.info("firmware %s: C simulation reused from %s", key[:12], home)
        return cls(library, inputs, outputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Outputs [N, outputs] (float64, exact) for inputs [N, inputs]."""
        batch = np.ascontiguousarray(np.asarray(x, dtype=np.float64).reshape(len(x), -1))
        if batch.shape[1] != self.inputs:
            raise ValueError(f"the firmware takes {self.inputs} values per sample, not {batch.shape[1]}")
        out = np.zeros((len(batch), self.outputs), dtype=np.float64)
        pointer = ctypes.POINTER(ctypes.c_double)
        with self._lock:
            for row in range(len(batch)):
                self._call(batch[row].ctypes.data_as(pointer), out[row].ctypes.data_as(pointer))
        return out


def _compile(project: Path, home: Path) -> None:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise BundleError("the FPGA emulator needs a C++ compiler (g++) on this device: apt-get install g++")
    partial = home.with_name(home.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(project / "firmware" / "weights", partial / "weights")
    weights = f'"{home / "weights"}"'
    base = [compiler, "-O3", "-fPIC", "-std=c++11", f"-I{project / 'firmware' / 'ap_types'}",
            f"-I{project / 'firmware'}", f"-DWEIGHTS_DIR={weights}"]
    objects = []
    for source in (project / "firmware" / "myproject.cpp", project / "myproject_bridge.cpp"):
        target = partial / (source.stem + ".o")
        _run([*base, "-c", str(source), "-o", str(target)], project)
        objects.append(str(target))
    _run([compiler, "-shared", *objects, "-o", str(partial / "myproject.so")], project)
    shutil.rmtree(home, ignore_errors=True)
    partial.replace(home)
    log.info("firmware compiled into %s", home)


def _run(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
        raise BundleError(f"building the firmware's C simulation failed ({result.returncode}):\n{tail}")
