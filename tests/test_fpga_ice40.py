"""The iCE40 target with the real open tools: int8 reference, iverilog, verilator, yosys/nextpnr/icepack, serving."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

from edge_agent.bundle import open_bundle
from edge_agent.errors import BundleError, InvalidInputError, PackagingError
from edge_agent.fpga.loaders import decode_frame, encode_frame
from edge_agent.fpga.verilator_sim import VerilatorModel
from packager.examples import DigitsData, build_digits_dense_mlp, build_digits_mlp
from packager.fpga.ice40 import Bitstream, build_bitstream, generate_verilog, run_testbench, write_hex
from packager.fpga.int8 import QuantizedMLP, _multiplier, quantize_layers, quantize_mlp, reference, requantize_int
from packager.packaging import package
from tests.fpga_serving import check_served_like_onnxruntime
from tests.servers import post_json, serving

TOOLS = ("iverilog", "vvp", "verilator", "yosys", "nextpnr-ice40", "icepack")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                 reason="needs iverilog, verilator, yosys, nextpnr-ice40, icepack "
                                        "(.ci/system-deps.sh)")]


@pytest.fixture(scope="module")
def float_layers(digits: DigitsData) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """The brief's test model: scikit-learn's MLPClassifier 64 -> 32 (ReLU) -> 10, as (W, b, relu) tuples.

    Trained exactly as :func:`build_digits_dense_mlp` trains it, so the ONNX export has the same weights.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=600, random_state=0).fit(digits.x_train,
                                                                                      digits.y_train)
    (w1, w2), (b1, b2) = clf.coefs_, clf.intercepts_
    return [(w1.astype(np.float32), b1.astype(np.float32), True), (w2.astype(np.float32), b2.astype(np.float32), False)]


@pytest.fixture(scope="module")
def qmodel(float_layers: list[tuple[np.ndarray, np.ndarray, bool]], digits: DigitsData) -> QuantizedMLP:
    return quantize_layers(float_layers, digits.x_train)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_digits_dense_mlp(tmp_path_factory.mktemp("ice40") / "digits_dense.onnx")


@pytest.fixture(scope="module")
def rtl(qmodel: QuantizedMLP, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("rtl")
    generate_verilog(qmodel, folder)
    return folder


@pytest.fixture(scope="module")
def bitstream(rtl: Path, tmp_path_factory: pytest.TempPathFactory) -> Bitstream:
    """The one bitstream build of this module (the packaging test's build is compared with it)."""
    return build_bitstream(rtl, tmp_path_factory.mktemp("bitstream"))


@pytest.fixture(scope="module")
def verilator_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("verilator-cache")


@pytest.fixture(scope="module")
def verilator_model(rtl: Path, verilator_cache: Path) -> VerilatorModel:
    """The one verilator build of this module; the served bundle must hit its cache."""
    return VerilatorModel.build(rtl, verilator_cache)


def test_int8_model_agrees_with_fp32(qmodel: QuantizedMLP, digits: DigitsData) -> None:
    int8 = qmodel.predict(digits.x_test).argmax(1)
    assert (int8 == qmodel.float_logits(digits.x_test).argmax(1)).mean() >= 0.97
    assert (int8 == digits.y_test).mean() >= 0.93
    assert all(np.abs(layer.weight).max() <= 127 and layer.weight.dtype == np.int8 for layer in qmodel.layers)
    assert all(layer.bias.dtype == np.int32 for layer in qmodel.layers)
    hidden = qmodel.layers[0]
    assert 2**14 <= hidden.multiplier < 2**15 and 0 < hidden.shift <= 46


def test_the_onnx_path_quantizes_to_the_same_integers(qmodel: QuantizedMLP, onnx_model: Path,
                                                      digits: DigitsData) -> None:
    """lower_onnx's Dense/Relu/Softmax layers and the (W, b, relu) tuples are one model to the quantizer."""
    from_onnx = quantize_mlp(onnx_model, digits.x_train)
    assert from_onnx.host_softmax and not qmodel.host_softmax
    for ours, theirs in zip(qmodel.layers, from_onnx.layers, strict=True):
        assert np.array_equal(ours.weight, theirs.weight) and np.array_equal(ours.bias, theirs.bias)
        assert (ours.multiplier, ours.shift, ours.relu) == (theirs.multiplier, theirs.shift, theirs.relu)
    x = qmodel.quantize_input(digits.x_test[:20])
    assert np.array_equal(reference(from_onnx, x), reference(qmodel, x))


def test_requantization_rounds_half_up_and_saturates() -> None:
    acc = np.array([3, 5, -3, -5, 1000, -1000])
    # m / 2**shift = 0.5: 1.5 -> 2, 2.5 -> 3, -1.5 -> -1, -2.5 -> -2, then the int8 clamps
    assert requantize_int(acc, 1 << 14, 15, relu=False).tolist() == [2, 3, -1, -2, 127, -128]
    assert requantize_int(acc, 1 << 14, 15, relu=True).tolist() == [2, 3, 0, 0, 127, 0]


def test_a_multiplier_that_rounds_up_to_2_15_stays_a_16_bit_signed_operand() -> None:
    real = (2**15 - 0.25) / 2**30
    multiplier, shift = _multiplier(real)
    assert multiplier < 2**15 and abs(multiplier / 2**shift - real) < 1e-9
    with pytest.raises(PackagingError, match="shift"):
        _multiplier(1e-20)


def test_unsupported_chains_and_overflowing_layers_are_refused(digits: DigitsData) -> None:
    w, b = np.ones((64, 4), np.float32), np.zeros(4, np.float32)
    w2 = np.ones((4, 2), np.float32)
    with pytest.raises(PackagingError, match="dense chains"):
        quantize_layers([(w, b, False), (w2, np.zeros(2, np.float32), False)], digits.x_train)
    with pytest.raises(PackagingError, match="dense chains"):
        quantize_layers([(w, b, True), (w2, np.zeros(2, np.float32), True)], digits.x_train)
    with pytest.raises(PackagingError, match="takes 5 inputs"):
        quantize_layers([(w, b, True), (np.ones((5, 2), np.float32), np.zeros(2, np.float32), False)],
                        digits.x_train)
    with pytest.raises(PackagingError, match="overflow"):
        quantize_layers([(w, np.full(4, 1e9, np.float32), False)], digits.x_train)


def test_iverilog_matches_the_integer_reference_exactly(rtl: Path, qmodel: QuantizedMLP, digits) -> None:
    x = qmodel.quantize_input(digits.x_test[:60])
    outputs, cycles = run_testbench(rtl, qmodel, x)
    assert np.array_equal(outputs, qmodel.reference(x))
    assert set(cycles.tolist()) == {qmodel.cycles}


def test_three_layers_with_saturation_and_negative_inputs_match_exactly(tmp_path: Path) -> None:
    """A 5 -> 4 -> 3 -> 2 chain driven past its calibrated range: every clamp and rounding path in Verilog."""
    rng = np.random.default_rng(7)
    layers = [(rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32), True),
              (rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32), True),
              (rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=2).astype(np.float32), False)]
    # calibrated on one input at a time: test rows that drive all five at once overflow the hidden ranges
    small = quantize_layers(layers, np.vstack([np.eye(5), -np.eye(5)]).astype(np.float32))
    x = rng.integers(-128, 128, size=(40, 5)).astype(np.int8)
    x[0], x[1] = -128, 127
    hidden = requantize_int(x.astype(np.int64) @ small.layers[0].weight + small.layers[0].bias,
                            small.layers[0].multiplier, small.layers[0].shift, relu=True)
    assert (hidden == 127).any() and (hidden == 0).any()  # both clamps are exercised
    generate_verilog(small, tmp_path / "rtl")
    outputs, cycles = run_testbench(tmp_path / "rtl", small, x)
    assert np.array_equal(outputs, reference(small, x))
    assert set(cycles.tolist()) == {small.cycles} == {4 * 8 + 3 * 7 + 2 * 6 + 1}


def test_verilator_model_matches_on_every_held_out_digit(rtl: Path, qmodel: QuantizedMLP, digits: DigitsData,
                                                         verilator_model: VerilatorModel,
                                                         verilator_cache: Path) -> None:
    model = verilator_model
    x = qmodel.quantize_input(digits.x_test)
    assert len(x) == 540
    outputs, cycles = model.predict_int8(x)
    assert np.array_equal(outputs, reference(qmodel, x))
    assert set(cycles.tolist()) == {qmodel.cycles}  # one MAC per clock: 32*(64+3) + 10*(32+3) + 1
    started = time.monotonic()
    again = VerilatorModel.build(rtl, verilator_cache)
    assert again.library == model.library and time.monotonic() - started < 1.0  # cached by digest
    with pytest.raises(InvalidInputError, match=r"int8 inputs \[N, 64\]"):
        model.predict_int8(x[:, :10])


def test_bitstream_is_a_real_ice40_image_that_fits_the_up5k(bitstream: Bitstream) -> None:
    data = bitstream.path.read_bytes()
    assert data[:8] == bytes.fromhex("ff0000ff7eaa997e")  # icepack's preamble: padding, then the iCE40 sync word
    assert 50_000 < len(data) < 200_000
    assert bitstream.sha256 == hashlib.sha256(data).hexdigest()
    resources = bitstream.resources
    for kind in ("LUT4", "BRAM_4K", "DSP"):
        assert 0 < resources[kind] <= resources["available"][kind]
    assert resources["BRAM_4K"] >= 5  # 2,368 weight bytes and the biases live in block RAM
    assert bitstream.fmax_mhz >= 12.0  # the board clock
    assert "Yosys" in bitstream.toolchain and "nextpnr" in bitstream.toolchain


def test_missing_tools_are_named_with_their_apt_package(rtl: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(PackagingError, match="apt-get install yosys"):
        build_bitstream(rtl, tmp_path / "out")
    with pytest.raises(BundleError, match="apt-get install verilator"):
        VerilatorModel.build(rtl, tmp_path / "cache")
    with pytest.raises(BundleError, match="no edgedeploy_mlp.v"):
        VerilatorModel.build(tmp_path, tmp_path / "cache")


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


def test_package_and_serve_the_ice40_bundle(digits: DigitsData, signing_key, onnx_model: Path,  # type: ignore[no-untyped-def]
                                           bitstream: Bitstream, verilator_model: VerilatorModel,
                                           verilator_cache: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A second flow run on the same model gives the same bitstream bytes; the agent serves the same Verilog."""
    monkeypatch.setenv("EDGEDEPLOY_FPGA_CACHE", str(verilator_cache))
    np.savez(tmp_path / "calib.npz", input=digits.x_train)
    np.savez(tmp_path / "valid.npz", input=digits.x_test, label=digits.y_test)
    result = package(onnx_model, "lattice-ice40-up5k", tmp_path / "digits-ice40.edb", name="digits",
                     calibration=tmp_path / "calib.npz", validation=tmp_path / "valid.npz")
    accelerator = result.manifest.accelerator
    assert accelerator["board"] == "icebreaker" and accelerator["part"] == "iCE40UP5K-SG48"
    assert accelerator["bitstream_sha256"] == bitstream.sha256  # yosys/nextpnr/icepack are reproducible
    unpacked = tmp_path / "unpacked"
    open_bundle(result.bundle_path, unpacked)
    assert hashlib.sha256((unpacked / "accelerator" / "ice40.bin").read_bytes()).hexdigest() == bitstream.sha256
    report = result.manifest.report["accelerator"]
    assert report["fmax_mhz"] > 0 and report["cycles_per_inference"] > 0 and report["accuracy_int8"] > 0.9
    libraries = sorted(verilator_cache.iterdir())
    with serving(tmp_path / "work", [result.bundle_path]) as server:
        status, answer = post_json(f"{server.http}/score", {"data": digits.x_test[:16].tolist()})
    assert status == 200
    assert sorted(verilator_cache.iterdir()) == libraries  # the bundle's RTL is the RTL verilated above
    assert libraries and not list((tmp_path / "work").rglob("*.so"))  # served from that cache, nothing else
    served = np.asarray(answer["probabilities"]).argmax(1)
    assert served.tolist() == quantize_mlp(onnx_model, digits.x_train).predict(digits.x_test[:16]).argmax(1).tolist()


@pytest.fixture(scope="module")
def skl2onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One verilator cache for both skl2onnx exports: they have the same weights, so the same RTL."""
    return tmp_path_factory.mktemp("skl2onnx-verilator-cache")


@pytest.mark.parametrize("zipmap", [False, True], ids=["probabilities", "zipmap"])
def test_the_readme_commands_package_and_serve_the_skl2onnx_model(zipmap: bool, digits: DigitsData, signing_key,  # type: ignore[no-untyped-def]
                                                                  skl2onnx_cache: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's digits MLP as skl2onnx writes it, on the iCE40 flow: served as onnxruntime serves it."""
    monkeypatch.setenv("EDGEDEPLOY_FPGA_CACHE", str(skl2onnx_cache))
    source = build_digits_mlp(tmp_path / "digits.onnx", zipmap=zipmap)
    np.savez(tmp_path / "calib.npz", input=digits.x_train[:400])
    np.savez(tmp_path / "val.npz", input=digits.x_test, label=digits.y_test)
    command = [sys.executable, "-m", "packager.cli.main"]
    assert subprocess.run([*command, "model", "register", "digits", str(source)], capture_output=True).returncode == 0
    bundle = tmp_path / "digits-ice40.edb"
    done = subprocess.run([*command, "package", "digits", "--profile", "lattice-ice40-up5k", "-o", str(bundle),
                           "--calibration", str(tmp_path / "calib.npz"), "--validation", str(tmp_path / "val.npz")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    manifest = open_bundle(bundle, tmp_path / "unpacked")
    logits = quantize_mlp(source, digits.x_train[:400]).predict(digits.x_test)
    with serving(tmp_path / "work", [bundle]) as server:
        agreement = check_served_like_onnxruntime(server, source, digits.x_test, logits,
                                                  manifest.report["accelerator"])
    assert agreement >= 0.95
