"""The iCE40 design served through a cycle-accurate verilator model of the very Verilog in the bundle.

:meth:`VerilatorModel.build` verilates ``edgedeploy_mlp.v`` from the bundle's ``accelerator/rtl``
folder, compiles it with a small C++ harness into a shared library and loads it with ctypes; the
harness clocks the design exactly as the board's UART front end does (write the inputs, pulse
``start``, clock until ``done``, read the outputs). Libraries are cached by the digest of the RTL
folder, with their own copy of the weight files the model reads, so a second load is instant.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np

from edge_agent.bundle import tree_sha256
from edge_agent.errors import BundleError, InvalidInputError

__all__ = ["VerilatorModel", "rtl_digest"]

log = logging.getLogger(__name__)

# a library loaded twice is one design in memory (ctypes shares the handle): one lock per library
_LOCKS: dict[str, threading.Lock] = {}

_HARNESS = r"""
#include <cstdint>
#include "Vedgedeploy_mlp.h"
#include "verilated.h"

static VerilatedContext* context = nullptr;
static Vedgedeploy_mlp* top = nullptr;

static void tick() {
    top->clk = 0; top->eval();
    top->clk = 1; top->eval();
}

extern "C" int edgedeploy_open() {
    if (top != nullptr) return 0;  // ctypes shares one handle per library: one design per process
    context = new VerilatedContext;
    top = new Vedgedeploy_mlp{context};
    top->rst = 1; tick(); tick(); top->rst = 0; tick();
    return 0;
}

extern "C" int edgedeploy_infer(const int8_t* in, int n_in, int32_t* out, int n_out, uint64_t* cycles) {
    for (int i = 0; i < n_in; i++) {
        top->in_we = 1; top->in_addr = i; top->in_data = (uint8_t)in[i]; tick();
    }
    top->in_we = 0; top->start = 1; tick(); top->start = 0;
    uint64_t guard = 0;
    while (!top->done) {
        tick();
        if (++guard > 100000000ULL) return -1;
    }
    *cycles = top->cycles;
    for (int k = 0; k < n_out; k++) {
        top->out_addr = k; top->eval();
        out[k] = (int32_t)top->out_data;
    }
    return 0;
}
"""


def rtl_digest(rtl: Path, salt: bytes = b"") -> str:
    """sha256 over ``salt`` and the RTL folder's tree digest (what a cached library was built from)."""
    return hashlib.sha256(salt + tree_sha256(rtl).encode()).hexdigest()


class VerilatorModel:
    """The compiled design; ``predict_int8`` runs one sample at a time (the design is sequential)."""

    def __init__(self, library: Path, inputs: int, outputs: int) -> None:
        self.library, self.inputs, self.outputs = library, inputs, outputs
        self._lib = ctypes.CDLL(str(library))
        self._lib.edgedeploy_infer.restype = ctypes.c_int
        self._lib.edgedeploy_open()
        self._lock = _LOCKS.setdefault(str(library), threading.Lock())  # one simulated design, one inference

    @classmethod
    def build(cls, rtl: Path, cache_dir: Path) -> VerilatorModel:
        """Verilate and compile ``rtl`` (or reuse the cached library for the same RTL digest)."""
        rtl = Path(rtl)
        design_file = rtl / "design.json"
        if not (rtl / "edgedeploy_mlp.v").is_file() or not design_file.is_file():
            raise BundleError("the bundle's RTL folder has no edgedeploy_mlp.v or design.json")
        design = json.loads(design_file.read_text())
        # the harness and the verilator release shape the library as much as the Verilog does
        home = Path(cache_dir) / rtl_digest(rtl, _HARNESS.encode() + _verilator_version().encode())[:24]
        library = home / "design.so"
        if not library.exists():
            _compile(rtl, home)
        return cls(library, int(design["inputs"]), int(design["outputs"]))

    def predict_int8(self, x_int8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(int32 outputs [N, outputs], cycles per inference [N]) for int8 inputs [N, inputs]."""
        given = np.asarray(x_int8)
        if given.ndim != 2 or given.shape[1] != self.inputs or given.dtype != np.int8:
            raise InvalidInputError(f"the design takes int8 inputs [N, {self.inputs}], not {given.dtype} "
                                    f"{list(given.shape)}")
        batch = np.ascontiguousarray(given)
        out = np.zeros((len(batch), self.outputs), dtype=np.int32)
        cycles = np.zeros(len(batch), dtype=np.uint64)
        with self._lock:
            for row in range(len(batch)):
                code = self._lib.edgedeploy_infer(
                    batch[row].ctypes.data_as(ctypes.c_void_p), self.inputs,
                    out[row].ctypes.data_as(ctypes.c_void_p), self.outputs,
                    cycles[row:].ctypes.data_as(ctypes.c_void_p))
                if code != 0:
                    raise BundleError("the simulated design never finished an inference")
        return out, cycles


def _verilator_version() -> str:
    """``verilator --version`` (empty when verilator is missing: :func:`_compile` says so)."""
    verilator = shutil.which("verilator")
    if verilator is None:
        return ""
    return subprocess.run([verilator, "--version"], capture_output=True, text=True, check=False).stdout.strip()


def _compile(rtl: Path, home: Path) -> None:
    verilator, compiler = shutil.which("verilator"), shutil.which(os.environ.get("CXX", "g++"))
    if verilator is None or compiler is None:
        raise BundleError("serving an iCE40 bundle without its board needs verilator and g++: "
                          "apt-get install verilator g++")
    include = Path(subprocess.run([verilator, "--getenv", "VERILATOR_ROOT"], capture_output=True, text=True,
                                  check=False).stdout.strip() or "/usr/share/verilator") / "include"
    partial = home.with_name(home.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for hexfile in rtl.glob("*.hex"):
        shutil.copy(hexfile, partial / hexfile.name)
    (partial / "harness.cpp").write_text(_HARNESS)
    hexdir = f'"{home}/"'
    _run([verilator, "--cc", "-Wno-fatal", "-CFLAGS", "-fPIC", "--Mdir", "obj", "--top-module", "edgedeploy_mlp",
          f"-GHEXDIR={hexdir}", str(rtl / "edgedeploy_mlp.v")], partial)
    _run(["make", "-s", "-C", "obj", "-f", "Vedgedeploy_mlp.mk", "OPT_FAST=-O2"], partial)
    _run([compiler, "-shared", "-fPIC", "-O2", "-std=c++17", "-Iobj", f"-I{include}", f"-I{include / 'vltstd'}",
          "harness.cpp", "obj/Vedgedeploy_mlp__ALL.a", str(include / "verilated.cpp"),
          str(include / "verilated_threads.cpp"), "-pthread", "-o", "design.so"], partial)
    try:
        partial.replace(home)
    except OSError:  # another process finished the same digest first: its library is as good as ours
        shutil.rmtree(partial, ignore_errors=True)
        if not (home / "design.so").is_file():
            raise BundleError(f"could not move the verilator model into its cache folder {home}") from None
    log.info("verilated %s into %s", rtl, home)


def _run(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
        raise BundleError(f"building the verilator model failed ({result.returncode}):\n{tail}")
