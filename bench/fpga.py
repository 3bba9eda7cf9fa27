"""FPGA targets: per precision, agreement with fp32, held-out accuracy, emulator latency vs onnxruntime, estimates.

HLS (hls4ml firmware, served by its bit-accurate C simulation): the digits MLP 64-32-10 at uniform
widths and at the width the precision search picks; each row is measured on the written firmware.
The digits CNN (Conv3x3x16 > ReLU > MaxPool2 > Dense) the same way, channels-last firmware.
iCE40 (our Verilog): LUT/BRAM/DSP and Fmax from nextpnr, cycles per inference from the simulation, the
inferences per second that gives at Fmax, and the verilator model's latency here.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.common import print_table, write_results
from edge_agent.fpga.csim import CSimModel
from edge_agent.fpga.verilator_sim import VerilatorModel
from packager.examples import build_digits_cnn, build_digits_dense_mlp, digits_data
from packager.fpga.hls import compile_hls, firmware_layout
from packager.fpga.ice40 import build_bitstream, generate_verilog
from packager.fpga.int8 import quantize_mlp

PART = "xck26-sfvc784-2LV-c"


def _per_sample_us(call: Any, x: np.ndarray, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        call(x)
        best = min(best, (time.perf_counter() - started) / len(x) * 1e6)
    return best


def _hls_rows(model: Path, folder: Path, data: Any, name: str, shape: tuple[int, ...]) -> list[dict[str, Any]]:
    session = ort.InferenceSession(str(model))
    x_test, x_train = data.x_test.reshape(-1, *shape), data.x_train[:500].reshape(-1, *shape)
    fp32 = session.run(None, {"input": x_test})[0]
    ort_us = _per_sample_us(lambda x: [session.run(None, {"input": x[i:i + 1]}) for i in range(len(x))], x_test)
    firmware_x = firmware_layout(x_test)
    rows = []
    for label, widths, target in [("search (>=99% top-1)", None, 0.99), ("uniform 16", (16,), 0.0),
                                  ("uniform 12", (12,), 0.0), ("uniform 8", (8,), 0.0), ("uniform 6", (6,), 0.0)]:
        kwargs = {"widths": widths} if widths else {}
        build = compile_hls(model, x_train, folder / f"{name}-{label.replace(' ', '_')}", part=PART,
                            target_agreement=target, csim_cache=folder / "cache", **kwargs)
        simulation = CSimModel.build(build.project, folder / "cache", build.inputs, build.outputs)
        logits = simulation.predict(firmware_x)
        rows.append({
            "model": name, "precision": label,
            "types": f"in {build.precision.input}, w {','.join(str(w) for w in build.precision.weights)}, "
                     f"act {','.join(str(a) for a in build.precision.activations)}",
            "agreement_fp32": float((logits.argmax(1) == fp32.argmax(1)).mean()),
            "accuracy": float((logits.argmax(1) == data.y_test).mean()),
            "emulator_us": _per_sample_us(simulation.predict, firmware_x), "onnxruntime_us": ort_us,
            "dsp_est": build.estimate["dsp"], "lut_mult_est": build.estimate["lut_for_multipliers"],
            "latency_cycles_est": build.estimate["latency_cycles"]})
    return rows


def _ice40(folder: Path, model: Path, data: Any) -> dict[str, Any]:
    qmodel = quantize_mlp(model, data.x_train)
    rtl = folder / "rtl"
    generate_verilog(qmodel, rtl)
    started = time.monotonic()
    bitstream = build_bitstream(rtl, folder / "bitstream")
    flow_s = time.monotonic() - started
    simulation = VerilatorModel.build(rtl, folder / "vcache")
    x = qmodel.quantize_input(data.x_test)
    outputs, cycles = simulation.predict_int8(x)
    logits = qmodel.dequantize(outputs)
    fp32 = qmodel.float_logits(data.x_test)
    return {"design": "int8 MLP 64-32-10, 1 MAC", **{k: bitstream.resources[k] for k in ("LUT4", "BRAM_4K", "DSP")},
            "fmax_mhz": bitstream.fmax_mhz, "cycles": int(cycles[0]),
            "inferences_per_s_at_fmax": bitstream.fmax_mhz * 1e6 / int(cycles[0]),
            "agreement_fp32": float((logits.argmax(1) == fp32.argmax(1)).mean()),
            "accuracy": float((logits.argmax(1) == data.y_test).mean()),
            "verilator_us": _per_sample_us(simulation.predict_int8, x), "flow_s": flow_s,
            "bitstream_bytes": bitstream.path.stat().st_size}


def main() -> None:
    data = digits_data()
    with tempfile.TemporaryDirectory(prefix="bench-fpga-") as tmp:
        folder = Path(tmp)
        model = build_digits_dense_mlp(folder / "digits_dense.onnx")
        rows = _hls_rows(model, folder, data, "digits MLP 64-32-10", (64,))
        cnn = build_digits_cnn(folder / "digits_cnn.onnx")
        rows += _hls_rows(cnn, folder, data, "digits CNN conv3x3x16-pool-dense", (1, 8, 8))
        print_table(rows, ["model", "precision", "types", "agreement_fp32", "accuracy", "emulator_us",
                           "onnxruntime_us", "dsp_est", "lut_mult_est", "latency_cycles_est"])
        ice40 = _ice40(folder, model, data)
        print_table([ice40], list(ice40))
    write_results("fpga", {"hls": rows, "ice40": ice40,
                           "notes": "estimates are edgedeploy's analytical ones (no vendor tools here); emulator "
                                    "and onnxruntime latencies are per sample at batch 1 on this machine"})


if __name__ == "__main__":
    main()
