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

from edge_agent.errors import BundleError

__all__ = ["CSimModel", "cxx_compiler", "firmware_digest"]

log = logging.getLogger(__name__)

_SOURCES = ("firmware", "myproject_bridge.cpp")
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


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
        # the firmware keeps its weights in statics it fills on the first call, and dlopen gives every
        # loader of one path the same copy: one lock per library, not per instance
        with _LOCKS_GUARD:
            self._lock = _LOCKS.setdefault(str(library), threading.Lock())

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
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            _compile(project, home)
        else:
            log.info("firmware %s: C simulation reused from %s", key[:12], home)
        return cls(library, inputs, outputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Outputs [N, outputs] for float inputs [N, inputs] (any shape that flattens to it), through the
        bridge's ``myproject_double``: float64, because the result type can be wider than float32's 24 bits
        and every fixed-point value is exact in a double. Safe to call from several threads."""
        batch = np.ascontiguousarray(np.asarray(x, dtype=np.float64).reshape(len(x), -1))
        if batch.shape[1] != self.inputs:
            raise ValueError(f"the firmware takes {self.inputs} values per sample, not {batch.shape[1]}")
        out = np.zeros((len(batch), self.outputs), dtype=np.float64)
        pointer = ctypes.POINTER(ctypes.c_double)
        with self._lock:
            for row in range(len(batch)):
                self._call(batch[row].ctypes.data_as(pointer), out[row].ctypes.data_as(pointer))
        return out


def cxx_compiler() -> str | None:
    """The C++ compiler the emulator uses (``$CXX``, default g++), or None when it is not installed."""
    return shutil.which(os.environ.get("CXX", "g++"))


def _accepts(compiler: str, flag: str) -> bool:
    probe = subprocess.run([compiler, "-Werror", "-fsyntax-only", flag, "-xc++", "-", "-o", os.devnull],
                           input="", capture_output=True, text=True, check=False)
    return probe.returncode == 0


def _flags(compiler: str) -> list[str]:
    """hls4ml's build_lib.sh flags: -O3 -fPIC, C++23 when the compiler has it (else C++11), and
    -fno-gnu-unique, so two firmwares loaded in one process never share a template's statics."""
    flags = ["-O3", "-fPIC", "-std=c++23" if _accepts(compiler, "-std=c++23") else "-std=c++11"]
    return flags + (["-fno-gnu-unique"] if _accepts(compiler, "-fno-gnu-unique") else [])


def _compile(project: Path, home: Path) -> None:
    compiler = cxx_compiler()
    if compiler is None:
        raise BundleError("the FPGA emulator needs a C++ compiler (g++) on this device: apt-get install g++")
    partial = home.with_name(home.name + f".partial-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(project / "firmware" / "weights", partial / "weights")
    weights = f'"{home / "weights"}"'  # the library reads its weights from the cache, not from the bundle
    base = [compiler, *_flags(compiler), f"-I{project / 'firmware' / 'ap_types'}", f"-I{project / 'firmware'}",
            f"-DWEIGHTS_DIR={weights}"]
    try:
        sources = (project / "firmware" / "myproject.cpp", project / "myproject_bridge.cpp")
        objects = [str(partial / (source.stem + ".o")) for source in sources]
        # the two translation units compile in parallel: half the wait on a two-core device
        _run_all([[*base, "-c", str(source), "-o", obj] for source, obj in zip(sources, objects, strict=True)],
                 project)
        _run_all([[compiler, "-shared", *objects, "-o", str(partial / "myproject.so")]], project)
        for obj in objects:
            Path(obj).unlink()
        partial.rename(home)  # atomic; fails when another process installed the same digest first
    except OSError:
        if not (home / "myproject.so").exists():
            raise
        log.info("firmware %s was compiled by another process meanwhile", home.name)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("firmware compiled into %s", home)


def _run_all(commands: list[list[str]], cwd: Path) -> None:
    """Run the commands side by side; BundleError with the compiler's last lines when one fails."""
    running = [subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for command in commands]
    outputs = [process.communicate()[0] for process in running]
    for process, output in zip(running, outputs, strict=True):
        if process.returncode != 0:
            raise BundleError(f"building the firmware's C simulation failed ({process.returncode}):\n"
                              + _diagnosis(output))


def _diagnosis(output: str) -> str:
    """The compiler's error lines (ap_types floods its output with deprecation warnings), else its last lines."""
    lines = output.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower() and "warning:" not in line]
    return "\n".join((errors or lines)[-8:])
