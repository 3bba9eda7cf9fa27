"""The iCE40 target with the real open tools: int8 reference, iverilog, verilator, yosys/nextpnr/icepack, serving."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge_agent.fpga.loaders import decode_frame, encode_frame
from edge_agent.fpga.verilator_sim import VerilatorModel
from packager.bundle import open_bundle
from packager.examples import build_digits_dense_mlp
from packager.fpga.ice40 import build_bitstream, generate_verilog, run_testbench, write_hex
from packager.fpga.int8 import QuantizedMLP, quantize_mlp
from packager.packaging import package
from tests.servers import post_json, serving

TOOLS = ("iverilog", "vvp", "verilator", "yosys", "nextpnr-ice40", "icepack")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                 reason="needs iverilog, verilator, yosys, nextpnr-ice40, icepack "
                                        "(.ci/system-deps.sh)")]


@pytest.fixture(scope="module")
def qmodel(tmp_path_factory: pytest.TempPathFactory, digits) -> QuantizedMLP:  # type: ignore[no-untyped-def]
    model = build_digits_dense_mlp(tmp_path_factory.mktemp("ice40") / "digits_dense.onnx")
    return quantize_mlp(model, digits.x_train)


@pytest.fixture(scope="module")
def rtl(qmodel: QuantizedMLP, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("rtl")
    generate_verilog(qmodel, folder)
    return folder


def test_int8_model_agrees_with_fp32(qmodel: QuantizedMLP, digits) -> None:
    int8 = qmodel.predict(digits.x_test).argmax(1)
    assert (int8 == qmodel.float_logits(digits.x_test).argmax(1)).mean() >= 0.97
    assert (int8 == digits.y_test).mean() >= 0.93
    assert all(np.abs(layer.weight).max() <= 127 for layer in qmodel.layers)


def test_iverilog_matches_the_integer_reference_exactly(rtl: Path, qmodel: QuantizedMLP, digits) -> None:
    x = qmodel.quantize_input(digits.x_test[:60])
    outputs, cycles = run_testbench(rtl, qmodel, x)
    assert np.array_equal(outputs, qmodel.reference(x))
    assert set(cycles.tolist()) == {qmodel.cycles}


def test_verilator_model_matches_on_every_held_out_digit(rtl: Path, qmodel: QuantizedMLP, digits,
                                                         tmp_path: Path) -> None:
    model = VerilatorModel.build(rtl, tmp_path / "cache")
    x = qmodel.quantize_input(digits.x_test)
    outputs, cycles = model.predict_int8(x)
    assert np.array_equal(outputs, qmodel.reference(x))
    assert int(cycles[0]) == qmodel.cycles
    again = VerilatorModel.build(rtl, tmp_path / "cache")
    assert again.library == model.library  # cached by the RTL digest


def test_bitstream_fits_the_up5k_and_is_reproducible(rtl: Path, tmp_path: Path) -> None:
    first = build_bitstream(rtl, tmp_path / "a")
    data = first.path.read_bytes()
    assert b"\x7e\xaa\x99\x7e" in data[:64]  # the iCE40 configuration sync word
    assert 50_000 < len(data) < 200_000
    resources = first.resources
    for kind in ("LUT4", "BRAM_4K", "DSP"):
        assert 0 < resources[kind] <= resources["available"][kind]
    assert resources["BRAM_4K"] >= 5  # 2,368 weight bytes and the biases live in block RAM
    assert first.fmax_mhz >= 12.0  # the board clock
    second = build_bitstream(rtl, tmp_path / "b")
    assert second.sha256 == first.sha256


_UART_TB = """`timescale 1ns/1ps
module tb;
    reg clk = 0; reg rx = 1; wire tx;
    reg [7:0] request [0:{last}];
    integer i, b, k;
    reg [7:0] byte_in;
    edgedeploy_top dut (.clk(clk), .rx(rx), .tx(tx));
    always #41 clk = ~clk;  // ~12 MHz
    task send(input [7:0] value);
        begin
            rx = 0; repeat (104) @(posedge clk);
            for (b = 0; b < 8; b = b + 1) begin rx = value[b]; repeat (104) @(posedge clk); end
            rx = 1; repeat (104) @(posedge clk);
        end
    endtask
    initial begin
        $readmemh("request.hex", request);
        repeat (300) @(posedge clk);
        for (i = 0; i <= {last}; i = i + 1) send(request[i]);
    end
    initial begin
        for (k = 0; k < {reply}; k = k + 1) begin
            @(negedge tx);
            repeat (52) @(posedge clk);
            for (b = 0; b < 8; b = b + 1) begin repeat (104) @(posedge clk); byte_in[b] = tx; end
            repeat (104) @(posedge clk);
            $display("%02x", byte_in);
        end
        $finish;
    end
endmodule
"""


def test_uart_front_end_answers_a_frame_like_the_board_would(rtl: Path, qmodel: QuantizedMLP, digits,
                                                             tmp_path: Path) -> None:
    """The serial wrapper in the bitstream, simulated bit by bit: the loaders' frame in, the outputs out."""
    x = qmodel.quantize_input(digits.x_test[:1])[0]
    request = encode_frame(x.tobytes())
    for path in rtl.iterdir():
        shutil.copy(path, tmp_path / path.name)
    write_hex(tmp_path / "request.hex", np.frombuffer(request, dtype=np.uint8), 8)
    reply_length = 4 + 4 * qmodel.outputs
    (tmp_path / "tb.v").write_text(_UART_TB.format(last=len(request) - 1, reply=reply_length))
    subprocess.run(["iverilog", "-g2012", "-o", "tb.vvp", "tb.v", "edgedeploy_top.v", "edgedeploy_mlp.v"],
                   cwd=tmp_path, check=True, capture_output=True)
    run = subprocess.run(["vvp", "-n", "tb.vvp"], cwd=tmp_path, check=True, capture_output=True, text=True,
                         timeout=600)
    reply = bytes(int(line, 16) for line in run.stdout.split() if len(line) == 2)
    assert len(reply) == reply_length
    logits = np.frombuffer(decode_frame(reply), dtype="<i4")
    assert logits.tolist() == qmodel.reference(x[None, :])[0].tolist()


def test_package_and_serve_the_ice40_bundle(digits, signing_key, tmp_path: Path) -> None:
    model = build_digits_dense_mlp(tmp_path / "digits_dense.onnx")
    np.savez(tmp_path / "calib.npz", input=digits.x_train)
    np.savez(tmp_path / "valid.npz", input=digits.x_test, label=digits.y_test)
    result = package(model, "lattice-ice40-up5k", tmp_path / "digits-ice40.edb", name="digits",
                     calibration=tmp_path / "calib.npz", validation=tmp_path / "valid.npz")
    manifest = result.manifest
    accelerator = manifest.accelerator
    assert accelerator["board"] == "icebreaker" and accelerator["part"] == "iCE40UP5K-SG48"
    unpacked = tmp_path / "unpacked"
    open_bundle(result.bundle_path, unpacked)
    import hashlib
    assert hashlib.sha256((unpacked / "accelerator" / "ice40.bin").read_bytes()).hexdigest() == \
        accelerator["bitstream_sha256"]
    report = manifest.report["accelerator"]
    assert report["fmax_mhz"] > 0 and report["cycles_per_inference"] > 0 and report["accuracy_int8"] > 0.9
    with serving(tmp_path / "work", [result.bundle_path]) as server:
        status, answer = post_json(f"{server.http}/score", {"data": digits.x_test[:16].tolist()})
        assert status == 200
        served = np.asarray(answer["probabilities"]).argmax(1)
        q = quantize_mlp(model, digits.x_train)
        assert served.tolist() == q.predict(digits.x_test[:16]).argmax(1).tolist()
