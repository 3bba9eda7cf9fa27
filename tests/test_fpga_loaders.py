"""Board loaders up to the device: checks, commands, buffer layouts and serial frames (no board here)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import DeploymentError, InvalidInputError
from edge_agent.fpga.loaders import (
    FixedPoint,
    Ice40Loader,
    PynqLoader,
    XrtLoader,
    crc8,
    decode_frame,
    encode_frame,
    iceprog_command,
    pack_fixed,
    unpack_fixed,
)

Q16_6 = FixedPoint(16, 6)


def test_fixed_point_packing_truncates_and_wraps_like_ap_fixed() -> None:
    words = pack_fixed(np.array([1.5, -1.5, 0.0009, -0.0009, 31.99, 32.0, -32.0]), Q16_6)
    assert words.dtype == np.dtype("<i2")
    # 10 fraction bits: 1.5 -> 1536; truncation goes toward -inf; 32.0 wraps to -32.0
    assert words.tolist() == [1536, -1536, 0, -1, 32757, -32768, -32768]
    assert unpack_fixed(words, Q16_6)[:2].tolist() == [1.5, -1.5]
    assert FixedPoint(8, 3).dtype == np.dtype("<i1") and FixedPoint(18, 8).dtype == np.dtype("<i4")


def test_round_trip_is_exact_for_representable_values() -> None:
    values = np.arange(-512, 512) / 1024.0 * 7
    representable = np.floor(values * 1024) / 1024
    assert np.array_equal(unpack_fixed(pack_fixed(representable, Q16_6), Q16_6), representable.astype(np.float32))


def test_frames_round_trip_and_corruption_is_caught() -> None:
    payload = np.arange(-32, 32, dtype=np.int8).tobytes()
    frame = encode_frame(payload)
    assert frame[0] == 0xA5 and frame[1:3] == (64).to_bytes(2, "little") and len(frame) == 68
    assert decode_frame(frame) == payload
    assert crc8(b"123456789") == 0xF4  # the CRC-8 (poly 0x07) check value
    broken = bytearray(frame)
    broken[10] ^= 1
    with pytest.raises(DeploymentError, match="CRC"):
        decode_frame(bytes(broken))
    with pytest.raises(DeploymentError, match="header says"):
        decode_frame(frame[:-2] + frame[-1:])
    with pytest.raises(DeploymentError, match="start byte"):
        decode_frame(b"\x00" + frame[1:])


def test_ice40_requests_and_replies(tmp_path: Path) -> None:
    bitstream = tmp_path / "design.bin"
    bitstream.write_bytes(b"\xff\x00\x00\xff\x7e\xaa\x99\x7e")
    board = Ice40Loader(bitstream, "/dev/ttyUSB1", inputs=64, outputs=10)
    request = board.request(np.full(64, -3, dtype=np.int8))
    assert decode_frame(request) == bytes([0xFD] * 64)
    logits = np.arange(-5, 5, dtype="<i4")
    assert board.parse_reply(encode_frame(logits.tobytes())).tolist() == logits.tolist()
    with pytest.raises(InvalidInputError, match="64 int8 values"):
        board.request(np.zeros(64, dtype=np.float32))
    with pytest.raises(DeploymentError, match="expected 40"):
        board.parse_reply(encode_frame(b"\x00" * 8))
    with pytest.raises(DeploymentError, match="missing from the bundle"):
        Ice40Loader(tmp_path / "absent.bin", "/dev/ttyUSB1", 64, 10)


def test_iceprog_command(tmp_path: Path) -> None:
    bitstream = tmp_path / "design.bin"
    bitstream.write_bytes(b"\x7e\xaa\x99\x7e")
    if shutil.which("iceprog") is None:
        with pytest.raises(DeploymentError, match="fpga-icestorm"):
            iceprog_command(bitstream)
        return
    command = iceprog_command(bitstream, device="i:0x0403:0x6010")
    assert command[1:] == ["-S", "-d", "i:0x0403:0x6010", str(bitstream)]
    assert iceprog_command(bitstream, sram=False)[1:] == [str(bitstream)]


def test_xilinx_loaders_check_their_files_and_lay_out_buffers(tmp_path: Path) -> None:
    bit = tmp_path / "design.bit"
    bit.write_bytes(b"bit")
    with pytest.raises(DeploymentError, match=r"\.hwh"):
        PynqLoader(bit, 64, 10, Q16_6, Q16_6)
    bit.with_suffix(".hwh").write_text("<xml/>")
    pynq_board = PynqLoader(bit, 64, 10, Q16_6, FixedPoint(18, 8))
    assert pynq_board.buffer_shapes(32) == ((32, 64), np.dtype("<i2"), (32, 10), np.dtype("<i4"))
    with pytest.raises(DeploymentError, match="'pynq' Python package"):
        pynq_board.program()
    xclbin = tmp_path / "design.xclbin"
    xclbin.write_bytes(b"xclbin2")
    xrt_board = XrtLoader(xclbin, "myproject", 64, 10, Q16_6, Q16_6)
    assert xrt_board.kernel_arguments(4) == [("input", 512), ("output", 80), ("batch", 4)]
    with pytest.raises(DeploymentError, match="'pyxrt' Python package"):
        xrt_board.program()
    with pytest.raises(InvalidInputError, match=r"\[N, 64\]"):
        xrt_board.infer(np.zeros((2, 63), dtype=np.float32))
