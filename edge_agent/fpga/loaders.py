"""Board loaders: program a real FPGA with a bundle's bitstream and run inferences on it.

One small interface (:class:`BoardLoader`) over three ways of reaching hardware:

* :class:`PynqLoader`: Zynq / Kria boards running PYNQ. Loads the ``.bit`` (with its ``.hwh`` beside
  it) as an overlay and moves fixed-point tensors through the AXI DMA of the hls4ml IP.
* :class:`XrtLoader`: boards with Xilinx Runtime (Kria with XRT, Alveo). Loads the ``.xclbin``,
  allocates buffer objects in the kernel's memory banks and runs the kernel.
* :class:`Ice40Loader`: iCE40 boards (iCEBreaker): ``iceprog -S`` writes the bitstream to the FPGA's
  SRAM, and inferences go over the board's serial link in the frame format below.

None of these ran on the build machines (no board). Everything before the device is touched — the
checks, the commands, the buffer layouts, the frames — is plain code tested on its own.

iCE40 serial frames (both directions): ``0xA5 | length (u16 LE) | payload | CRC-8 (poly 0x07)``
over 115200 8N1. The request payload is the int8 input vector; the reply payload is the int32
(LE) logits of the last layer.
"""

from __future__ import annotations

import importlib
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_agent.errors import DeploymentError, InvalidInputError

__all__ = [
    "BoardLoader",
    "FixedPoint",
    "Ice40Loader",
    "PynqLoader",
    "XrtLoader",
    "crc8",
    "decode_frame",
    "encode_frame",
    "iceprog_command",
    "pack_fixed",
    "unpack_fixed",
]

FRAME_START = 0xA5


class BoardLoader(Protocol):
    """Programs one board and runs inferences on it."""

    def program(self) -> None:
        """Load the bitstream / firmware onto the device."""

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Run a batch ``[N, inputs]`` and return ``[N, outputs]``."""

    def close(self) -> None:
        """Release the device."""


@dataclass(frozen=True)
class FixedPoint:
    """``ap_fixed<width, integer>`` as the HLS IP reads it, each value in a ``container``-bit word."""

    width: int
    integer: int

    @property
    def fraction(self) -> int:
        return self.width - self.integer

    @property
    def container(self) -> int:
        return 8 if self.width <= 8 else 16 if self.width <= 16 else 32

    @property
    def dtype(self) -> np.dtype:
        return np.dtype({8: "<i1", 16: "<i2", 32: "<i4"}[self.container])


def pack_fixed(x: np.ndarray, fmt: FixedPoint) -> np.ndarray:
    """Float values to the IP's words: truncated toward -inf (AP_TRN) and wrapped (AP_WRAP), as ap_fixed does."""
    scaled = np.floor(np.asarray(x, dtype=np.float64) * (1 << fmt.fraction)).astype(np.int64)
    modulus = 1 << fmt.width
    wrapped = ((scaled + (modulus >> 1)) % modulus) - (modulus >> 1)
    return np.ascontiguousarray(wrapped.astype(fmt.dtype))


def unpack_fixed(words: np.ndarray, fmt: FixedPoint) -> np.ndarray:
    """The IP's words back to float32 values."""
    return (np.asarray(words, dtype=np.int64) / float(1 << fmt.fraction)).astype(np.float32)


def _require_module(name: str, board: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DeploymentError(f"{board} needs the '{name}' Python package on the device (it comes with the "
                              f"board's image); it is not installed here") from None


def _require_file(path: Path, what: str) -> Path:
    if not Path(path).is_file():
        raise DeploymentError(f"{what} {path} is missing from the bundle")
    return Path(path)


def _check_batch(x: np.ndarray, inputs: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != inputs:
        raise InvalidInputError(f"the board takes [N, {inputs}] inputs, not {list(x.shape)}")
    return x


class PynqLoader:
    """A Zynq/Kria board under PYNQ: overlay from ``bitstream`` (``.hwh`` beside it), data through AXI DMA."""

    def __init__(self, bitstream: Path, inputs: int, outputs: int, input_format: FixedPoint,
                 output_format: FixedPoint, dma: str = "axi_dma_0") -> None:
        self.bitstream = _require_file(bitstream, "bitstream")
        _require_file(self.bitstream.with_suffix(".hwh"), "hardware handoff (.hwh) for")
        self.inputs, self.outputs, self.dma_name = inputs, outputs, dma
        self.input_format, self.output_format = input_format, output_format
        self._overlay: Any = None

    def buffer_shapes(self, batch: int) -> tuple[tuple[int, int], np.dtype, tuple[int, int], np.dtype]:
        """Shapes and word types of the DMA buffers for a batch (row-major, one sample per row)."""
        return ((batch, self.inputs), self.input_format.dtype, (batch, self.outputs), self.output_format.dtype)

    def program(self) -> None:
        """Download the overlay to the programmable logic."""
        pynq = _require_module("pynq", "a PYNQ board")
        self._overlay = pynq.Overlay(str(self.bitstream))
        if not hasattr(self._overlay, self.dma_name):
            raise DeploymentError(f"the overlay has no {self.dma_name}; its IP blocks are "
                                  f"{sorted(self._overlay.ip_dict)}")

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Stream one batch through the IP and read its outputs."""
        x = _check_batch(x, self.inputs)
        pynq = _require_module("pynq", "a PYNQ board")
        in_shape, in_type, out_shape, out_type = self.buffer_shapes(len(x))
        dma = getattr(self._overlay, self.dma_name)
        source = pynq.allocate(shape=in_shape, dtype=in_type)
        sink = pynq.allocate(shape=out_shape, dtype=out_type)
        try:
            source[:] = pack_fixed(x, self.input_format)
            dma.sendchannel.transfer(source)
            dma.recvchannel.transfer(sink)
            dma.sendchannel.wait()
            dma.recvchannel.wait()
            return unpack_fixed(np.array(sink), self.output_format)
        finally:
            source.freebuffer()
            sink.freebuffer()

    def close(self) -> None:
        """Forget the overlay (the logic stays programmed until the next download)."""
        self._overlay = None


class XrtLoader:
    """A board with Xilinx Runtime: ``.xclbin`` loaded with pyxrt, the kernel run on buffer objects."""

    def __init__(self, xclbin: Path, kernel: str, inputs: int, outputs: int, input_format: FixedPoint,
                 output_format: FixedPoint, device_index: int = 0) -> None:
        self.xclbin = _require_file(xclbin, "xclbin")
        self.kernel_name, self.device_index = kernel, device_index
        self.inputs, self.outputs = inputs, outputs
        self.input_format, self.output_format = input_format, output_format
        self._device: Any = None
        self._kernel: Any = None

    def kernel_arguments(self, batch: int) -> list[tuple[str, int]]:
        """The kernel's arguments in order: (role, bytes) — input buffer, output buffer, batch size."""
        return [("input", batch * self.inputs * self.input_format.dtype.itemsize),
                ("output", batch * self.outputs * self.output_format.dtype.itemsize),
                ("batch", batch)]

    def program(self) -> None:
        """Open the device and load the xclbin."""
        pyxrt = _require_module("pyxrt", "an XRT board")
        self._device = pyxrt.device(self.device_index)
        uuid = self._device.load_xclbin(str(self.xclbin))
        self._kernel = pyxrt.kernel(self._device, uuid, self.kernel_name)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Run the kernel on one batch."""
        x = _check_batch(x, self.inputs)
        pyxrt = _require_module("pyxrt", "an XRT board")
        (_, in_bytes), (_, out_bytes), (_, batch) = self.kernel_arguments(len(x))
        source = pyxrt.bo(self._device, in_bytes, pyxrt.bo.normal, self._kernel.group_id(0))
        sink = pyxrt.bo(self._device, out_bytes, pyxrt.bo.normal, self._kernel.group_id(1))
        source.write(pack_fixed(x, self.input_format).tobytes(), 0)
        source.sync(pyxrt.xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE)
        self._kernel(source, sink, batch).wait()
        sink.sync(pyxrt.xclBOSyncDirection.XCL_BO_SYNC_BO_FROM_DEVICE)
        words = np.frombuffer(bytes(sink.read(out_bytes, 0)), dtype=self.output_format.dtype)
        return unpack_fixed(words.reshape(batch, self.outputs), self.output_format)

    def close(self) -> None:
        """Drop the kernel and the device handle."""
        self._kernel = self._device = None


def iceprog_command(bitstream: Path, sram: bool = True, device: str | None = None) -> list[str]:
    """The ``iceprog`` call that programs ``bitstream`` (into SRAM by default: fast, gone on power-off)."""
    binary = shutil.which("iceprog")
    if binary is None:
        raise DeploymentError("iceprog is not installed: apt-get install fpga-icestorm")
    command = [binary]
    if sram:
        command.append("-S")
    if device:
        command += ["-d", device]
    return [*command, str(_require_file(bitstream, "bitstream"))]


def crc8(data: bytes) -> int:
    """CRC-8 with polynomial 0x07, initial 0 (what the UART wrapper computes)."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def encode_frame(payload: bytes) -> bytes:
    """``0xA5 | len u16 LE | payload | crc8(len + payload)``."""
    if len(payload) > 0xFFFF:
        raise InvalidInputError(f"a frame carries at most 65535 bytes, not {len(payload)}")
    header = struct.pack("<H", len(payload))
    return bytes([FRAME_START]) + header + payload + bytes([crc8(header + payload)])


def decode_frame(frame: bytes) -> bytes:
    """The payload of one complete frame; DeploymentError on a bad start byte, length or CRC."""
    if len(frame) < 4 or frame[0] != FRAME_START:
        raise DeploymentError("serial reply is not a frame (bad start byte or too short)")
    (length,) = struct.unpack("<H", frame[1:3])
    if len(frame) != length + 4:
        raise DeploymentError(f"serial reply has {len(frame) - 4} payload bytes, its header says {length}")
    if crc8(frame[1:-1]) != frame[-1]:
        raise DeploymentError("serial reply failed its CRC check")
    return bytes(frame[3:-1])


class Ice40Loader:
    """An iCE40 board: ``iceprog -S`` programs it, int8 vectors go over its serial port."""

    def __init__(self, bitstream: Path, port: str, inputs: int, outputs: int, baud: int = 115200,
                 timeout: float = 2.0) -> None:
        self.bitstream = _require_file(bitstream, "bitstream")
        self.port, self.baud, self.timeout = port, baud, timeout
        self.inputs, self.outputs = inputs, outputs
        self._serial: Any = None

    def program(self) -> None:
        """Write the bitstream to the FPGA's SRAM, then open the serial link."""
        result = subprocess.run(iceprog_command(self.bitstream), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise DeploymentError(f"iceprog failed ({result.returncode}): {result.stderr.strip()[-400:]}")
        serial = _require_module("serial", "an iCE40 board's serial link")
        self._serial = serial.Serial(self.port, self.baud, timeout=self.timeout)

    def request(self, x_int8: np.ndarray) -> bytes:
        """The frame that asks for one inference."""
        vector = np.asarray(x_int8)
        if vector.shape != (self.inputs,) or vector.dtype != np.int8:
            raise InvalidInputError(f"the board takes {self.inputs} int8 values, not {vector.dtype} "
                                    f"{list(vector.shape)}")
        return encode_frame(vector.tobytes())

    def parse_reply(self, frame: bytes) -> np.ndarray:
        """The int32 logits in a reply frame."""
        payload = decode_frame(frame)
        if len(payload) != 4 * self.outputs:
            raise DeploymentError(f"the board answered {len(payload)} bytes, expected {4 * self.outputs}")
        return np.frombuffer(payload, dtype="<i4").copy()

    def infer(self, x: np.ndarray) -> np.ndarray:
        """One request per sample (the design computes one vector at a time)."""
        x = _check_batch(x, self.inputs)
        rows = []
        for vector in x.astype(np.int8):
            self._serial.write(self.request(vector))
            reply = self._serial.read(4 + 4 * self.outputs)
            rows.append(self.parse_reply(reply))
        return np.stack(rows)

    def close(self) -> None:
        """Close the serial port."""
        if self._serial is not None:
            self._serial.close()
            self._serial = None
