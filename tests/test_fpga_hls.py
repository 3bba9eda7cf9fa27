"""The HLS target end to end: lowering, precision search, hls4ml firmware, bit-accurate emulator, bundle, serving."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edge_agent.bundle import open_bundle
from edge_agent.errors import BundleError, PackagingError, UsageError
from edge_agent.fpga.csim import CSimModel
from packager.examples import build_digits_dense_mlp, build_digits_mlp
from packager.fpga.fixed import FirmwareReference, FixedType, parse_fixed, to_fixed, to_fixed_as_written
from packager.fpga.hls import HLS_WIDTHS, compile_hls, firmware_layout, float_forward
from packager.fpga.lower import Conv2D, Dense, Flatten, MaxPool2D, Relu, Softmax, lower_onnx
from packager.packaging import package
from tests.fpga_serving import check_served_like_onnxruntime
from tests.servers import post_json, serving

pytest.importorskip("hls4ml")
pytestmark = pytest.mark.slow
PART = "xck26-sfvc784-2LV-c"


@pytest.fixture(scope="module", autouse=True)
def fpga_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One C simulation cache for the module: packaging confirms on it and the agent reuses it."""
    cache = tmp_path_factory.mktemp("fpga-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEDEPLOY_FPGA_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def dense_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_digits_dense_mlp(tmp_path_factory.mktemp("fpga") / "digits_dense.onnx")


@pytest.fixture(scope="module")
def firmware(dense_mlp: Path, digits, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("fw")
    (folder / "source.onnx").write_bytes(dense_mlp.read_bytes())
    return compile_hls(dense_mlp, digits.x_train[:500], folder / "build" / "project", part=PART)


@pytest.fixture(scope="module")
def simulation(firmware, fpga_cache: Path) -> CSimModel:  # type: ignore[no-untyped-def]
    return CSimModel.build(firmware.project, fpga_cache, 64, 10)  # compiled when compile_hls confirmed it


@pytest.fixture(scope="module")
def strict(dense_mlp: Path, digits, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The same MLP for a max-error goal: the same layer and symbol names, other types."""
    return compile_hls(dense_mlp, digits.x_train[:300], tmp_path_factory.mktemp("strict") / "p", part=PART,
                       max_error=0.05, confirm=False)


def test_lowering_reads_dense_and_conv_chains(dense_mlp: Path, digits_cnn: Path) -> None:
    assert [type(layer) for layer in lower_onnx(dense_mlp)] == [Dense, Relu, Dense, Softmax]
    assert lower_onnx(dense_mlp)[0].weight.shape == (64, 32)
    assert [type(layer) for layer in lower_onnx(digits_cnn)] == [Conv2D, Relu, MaxPool2D, Flatten, Dense, Softmax]


def _graph(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], path: Path) -> Path:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, ["N", 10])],
                              inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_lowering_reads_matmul_add_and_reshape_as_exported(tmp_path: Path) -> None:
    """torch.onnx's shape: Reshape to [N, -1], then MatMul + Add with the bias first or second."""
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(64, 10)).astype(np.float32), rng.normal(size=10).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(np.array([-1, 64], np.int64), "shape"),
             onnx.numpy_helper.from_array(weight, "W"), onnx.numpy_helper.from_array(bias, "b")]
    nodes = [helper.make_node("Reshape", ["input", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "W"], ["m"]), helper.make_node("Add", ["b", "m"], ["logits"])]
    layers = lower_onnx(_graph(nodes, inits, tmp_path / "exported.onnx"))
    assert [type(layer) for layer in layers] == [Flatten, Dense]
    assert np.array_equal(layers[1].weight, weight) and np.array_equal(layers[1].bias, bias)
    branch = [helper.make_node("Reshape", ["input", "shape"], ["flat"]), helper.make_node("Relu", ["flat"], ["r"]),
              helper.make_node("MatMul", ["flat", "W"], ["logits"])]  # skips the Relu: not a chain
    with pytest.raises(PackagingError, match="previous layer's output"):
        lower_onnx(_graph(branch, inits, tmp_path / "branch.onnx"))
    inits[0] = onnx.numpy_helper.from_array(np.array([-1, 8, 8], np.int64), "shape")
    with pytest.raises(PackagingError, match="not a flatten"):
        lower_onnx(_graph(nodes, inits, tmp_path / "reshape3d.onnx"))


def test_ap_fixed_conversion_truncates_and_wraps() -> None:
    kind = parse_fixed("ap_fixed<6,2>")
    assert kind == FixedType(6, 2) and parse_fixed("ap_ufixed<8,4>") == FixedType(8, 4, signed=False)
    assert parse_fixed("ap_uint<1>") == FixedType(1, 1, signed=False)
    # 4 fraction bits: 0.99 -> 15/16; -0.01 -> -1/16 (toward -inf); 2.0 wraps to -2.0
    assert to_fixed(np.array([0.99, -0.01, 2.0, 1.9375]), kind).tolist() == [15, -1, -32, 31]
    # hls4ml writes weights with `fraction` decimals: -1e-9 is "-0.0000" (0), 0.2499 at 2 decimals is "0.25" (1)
    assert to_fixed_as_written(np.array([-1e-9, 0.5]), kind).tolist() == [0, 8]
    assert to_fixed(np.array([-1e-9]), kind).tolist() == [-1]
    assert to_fixed_as_written(np.array([0.2499]), FixedType(4, 2)).tolist() == [1]


def test_precision_search_narrows_and_keeps_agreement(firmware, digits) -> None:  # type: ignore[no-untyped-def]
    chosen = firmware.precision
    assert chosen.input.width < HLS_WIDTHS[0] and chosen.weights[0].width < HLS_WIDTHS[0]
    assert firmware.agreement >= 0.99  # measured on the written firmware, not on the search's model
    # the search's model of the firmware is exact: its last kept candidate scores what the firmware scores
    last = [t for t in firmware.trials if t["kept"]][-1]
    assert (last["agreement_top1"], last["max_abs_error"]) == (firmware.agreement, firmware.max_abs_error)
    kept = [t for t in firmware.trials if t["kept"]]
    assert all(t["agreement_top1"] >= 0.99 for t in kept)
    refused = [t for t in firmware.trials if not t["kept"]]
    assert refused and all(t["agreement_top1"] < 0.99 for t in refused)  # each knob stopped where it failed
    report = json.loads((firmware.project / "precision.json").read_text())
    assert report["precision"]["input"] == str(chosen.input)
    assert report["estimate"]["multipliers"] > 0 and report["estimate"]["latency_cycles"] > 0


def test_precision_is_chosen_per_layer_and_written_into_the_firmware(firmware) -> None:  # type: ignore[no-untyped-def]
    chosen = firmware.precision
    knobs = {t["knob"] for t in firmware.trials}
    assert {"input", "weights[fc1]", "weights[fc2]", "activation[0]"} <= knobs
    layers = json.loads((firmware.project / "precision.json").read_text())["precision"]["layers"]
    assert list(layers) == ["fc1", "fc2"]
    for (name, types), kind in zip(layers.items(), chosen.weights, strict=True):
        assert types["weight"] == str(kind) and set(types) >= {"weight", "bias", "accum", "result"}, name
    assert layers["fc1"]["activation_after"] == str(chosen.activations[0])
    written = FirmwareReference(firmware.project)
    assert written.input_type == chosen.input
    assert [types["weight"] for types in written.layer_types()] == [str(kind) for kind in chosen.weights]


def test_the_firmware_is_confirmed_on_its_c_simulation(firmware, strict) -> None:  # type: ignore[no-untyped-def]
    assert firmware.csim_confirmed and not strict.csim_confirmed
    assert json.loads((firmware.project / "precision.json").read_text())["csim_confirmed"] is True


def test_a_max_error_goal_chooses_wider_types(strict, firmware) -> None:  # type: ignore[no-untyped-def]
    assert strict.max_abs_error <= 0.05
    assert strict.precision.weights[0].width > firmware.precision.weights[0].width


def test_firmware_project_is_relocatable(firmware, digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    machine = [str(firmware.project), tempfile.gettempdir() + "/", str(Path.home()), str(Path.cwd())]
    for path in firmware.project.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="ignore")
            assert not [prefix for prefix in machine if prefix in text], path
    assert not list(firmware.project.rglob("*.so")) and not list(firmware.project.rglob("*.o"))
    for needed in ("build_prj.tcl", "firmware/weights", "firmware/ap_types/ap_fixed.h", "precision.json"):
        assert (firmware.project / needed).exists(), needed
    moved = tmp_path / "elsewhere" / "firmware"
    shutil.copytree(firmware.project, moved)
    built = CSimModel.build(moved, tmp_path / "fresh-cache", 64, 10)  # compiled again, from the new place
    assert np.array_equal(built.predict(digits.x_test[:50]), FirmwareReference(moved).predict(digits.x_test[:50]))


def test_emulator_is_bit_accurate(simulation: CSimModel, firmware, digits) -> None:  # type: ignore[no-untyped-def]
    """The C simulation equals the independent integer reference exactly, for every held-out digit."""
    emulated = simulation.predict(digits.x_test)
    reference = FirmwareReference(firmware.project).predict(digits.x_test)
    assert np.array_equal(emulated, reference)
    # the exactness is that of the chosen fixed-point types: both differ from the fp32 logits
    dense = [layer for layer in lower_onnx(firmware_model(firmware)) if isinstance(layer, Dense)]
    assert np.abs(emulated - float_forward(dense, digits.x_test)[0]).max() > 1e-3
    step = 2.0 ** -firmware_output_fraction(firmware)
    assert np.array_equal(np.round(emulated / step), emulated / step)  # every output is on the type's grid


def firmware_model(firmware) -> Path:  # type: ignore[no-untyped-def]
    return firmware.project.parent.parent / "source.onnx"


def firmware_output_fraction(firmware) -> int:  # type: ignore[no-untyped-def]
    return FirmwareReference(firmware.project).steps[-1].result.fraction


def test_emulator_agrees_with_onnxruntime(simulation: CSimModel, dense_mlp: Path, digits) -> None:
    """>= 99% top-1 on the calibration set the search met it on (onnxruntime, not our float model);
    held-out digits lose a little, since the search narrows each type down to the goal."""
    session = ort.InferenceSession(str(dense_mlp))
    for x, goal in ((digits.x_train[:500], 0.99), (digits.x_test, 0.97)):
        fp32 = session.run(None, {"input": x})[0]
        assert (simulation.predict(x).argmax(1) == fp32.argmax(1)).mean() >= goal


def test_two_firmwares_in_one_process_keep_their_own_weights(simulation: CSimModel, firmware, strict,  # type: ignore[no-untyped-def]
                                                            digits, tmp_path: Path) -> None:
    """Both libraries export the same symbols (myproject, w13, ...): each must still run its own."""
    other = CSimModel.build(strict.project, tmp_path / "cache", 64, 10)
    x = digits.x_test[:100]
    expected = {id(simulation): FirmwareReference(firmware.project).predict(x),
                id(other): FirmwareReference(strict.project).predict(x)}
    assert not np.array_equal(expected[id(simulation)], expected[id(other)])
    for model in (other, simulation, other, simulation):
        assert np.array_equal(model.predict(x), expected[id(model)])


def test_concurrent_calls_give_the_sequential_answers(simulation: CSimModel, digits) -> None:
    x = digits.x_test[:200]
    expected = simulation.predict(x)
    answers: list[np.ndarray] = [np.empty(0)] * 4
    threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, simulation.predict(x))) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(np.array_equal(answer, expected) for answer in answers)


def test_a_broken_firmware_or_no_compiler_is_a_bundle_error(firmware, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(firmware.project, broken)
    source = broken / "firmware" / "myproject.cpp"
    source.write_text("#error edgedeploy-test-broken-firmware\n" + source.read_text())
    with pytest.raises(BundleError, match="edgedeploy-test-broken-firmware"):
        CSimModel.build(broken, tmp_path / "cache", 64, 10)
    assert not list((tmp_path / "cache").iterdir())  # nothing half-built is left to be reused
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(BundleError, match="needs a C\\+\\+ compiler"):
        CSimModel.build(firmware.project, tmp_path / "other-cache", 64, 10)


def test_the_emulator_does_not_need_hls4ml() -> None:
    code = "import sys, edge_agent.fpga.csim; assert not [m for m in sys.modules if m.startswith(('hls4ml', 'qonnx'))]"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_simulation_is_cached_by_firmware_digest(firmware, simulation: CSimModel) -> None:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    again = CSimModel.build(firmware.project, simulation.library.parent.parent, 64, 10)
    assert time.perf_counter() - started < 1.0  # a compile takes seconds
    assert again.library == simulation.library
    assert again.library.stat().st_mtime == simulation.library.stat().st_mtime


def test_cnn_firmware_is_bit_accurate_and_agrees(digits_cnn: Path, digits, fpga_cache: Path, tmp_path: Path) -> None:
    """Conv > ReLU > MaxPool > Dense: channels-last firmware, equal to the integer reference bit for bit."""
    build = compile_hls(digits_cnn, digits.x_train[:300].reshape(-1, 1, 8, 8), tmp_path / "cnn", part=PART)
    assert build.channels_last and build.agreement >= 0.99
    x = firmware_layout(digits.x_test.reshape(-1, 1, 8, 8))
    emulated = CSimModel.build(build.project, fpga_cache, 64, 10).predict(x)  # built when compile_hls confirmed
    assert np.array_equal(emulated, FirmwareReference(build.project).predict(x))
    fp32 = ort.InferenceSession(str(digits_cnn)).run(None, {"input": digits.x_test.reshape(-1, 1, 8, 8)})[0]
    assert (emulated.argmax(1) == fp32.argmax(1)).mean() >= 0.95
    steps = [step.function for step in FirmwareReference(build.project).steps]
    assert steps == ["conv_2d_cl", "relu", "pooling2d_cl", "dense"]


def test_layers_outside_the_chain_are_refused(digits, tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["r"]), helper.make_node("Softmax", ["r"], ["out"], axis=1)], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 64])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "relu.onnx")
    with pytest.raises(PackagingError, match="ending in Dense"):
        compile_hls(tmp_path / "relu.onnx", digits.x_train[:10], tmp_path / "out", part=PART)


def test_package_and_serve_on_the_emulator(dense_mlp: Path, digits, signing_key, tmp_path: Path) -> None:
    np.savez(tmp_path / "calib.npz", input=digits.x_train[:400])
    np.savez(tmp_path / "valid.npz", input=digits.x_test, label=digits.y_test)
    result = package(dense_mlp, "fpga-emulator", tmp_path / "digits-fpga.edb", name="digits",
                     calibration=tmp_path / "calib.npz", validation=tmp_path / "valid.npz")
    manifest = result.manifest
    assert manifest.runtime["backend"] == "hls4ml" and manifest.accelerator["board"] == "emulator"
    assert manifest.accelerator["firmware_sha256"] and manifest.report["accelerator"]["accuracy_fixed"] > 0.9
    roles = {entry.role for entry in manifest.files}
    assert {"model", "accelerator"} <= roles
    unpacked = tmp_path / "unpacked"
    open_bundle(result.bundle_path, unpacked)
    with serving(tmp_path / "work", [result.bundle_path]) as server:
        status, answer = post_json(f"{server.http}/score", {"data": digits.x_test[:8].tolist()})
        assert status == 200
        probabilities = np.asarray(answer["probabilities"])
        assert probabilities.shape == (8, 10) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        reference = FirmwareReference(unpacked / "accelerator" / "firmware").predict(digits.x_test[:8])
        assert np.array_equal(probabilities.argmax(1), reference.argmax(1))
        status, bad = post_json(f"{server.http}/score", {"data": [[0.0] * 63]})
        assert status == 400


def test_fpga_packaging_needs_calibration(dense_mlp: Path, signing_key, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--calibration"):
        package(dense_mlp, "fpga-emulator", tmp_path / "x.edb")
    assert not (tmp_path / "x.edb").exists()


def test_unsupported_model_is_refused_when_packaging(signing_key, digits, tmp_path: Path) -> None:
    node = helper.make_node("Tanh", ["input"], ["out"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "tanh.onnx")
    np.savez(tmp_path / "calib.npz", input=digits.x_train[:10])
    with pytest.raises(PackagingError, match="Tanh"):
        package(tmp_path / "tanh.onnx", "fpga-emulator", tmp_path / "t.edb", calibration=tmp_path / "calib.npz")


def test_cnn_bundle_serves_nchw_requests(digits_cnn: Path, digits, signing_key, tmp_path: Path) -> None:
    images = digits.x_train[:300].reshape(-1, 1, 8, 8)
    np.savez(tmp_path / "calib.npz", input=images)
    bundle = package(digits_cnn, "fpga-emulator", tmp_path / "cnn.edb", name="digits-cnn",
                     calibration=tmp_path / "calib.npz").bundle_path
    unpacked = tmp_path / "unpacked"
    manifest = open_bundle(bundle, unpacked)
    assert manifest.runtime["layout"] == "channels_last"
    x = digits.x_test[:6].reshape(-1, 1, 8, 8)
    with serving(tmp_path / "work", [bundle]) as server:
        status, answer = post_json(f"{server.http}/score", {"data": x.tolist()})
    assert status == 200
    expected = FirmwareReference(unpacked / "accelerator" / "firmware").predict(firmware_layout(x)).argmax(1)
    assert np.asarray(answer["probabilities"]).argmax(1).tolist() == expected.tolist()


def test_the_same_model_gives_the_same_firmware_bytes(dense_mlp: Path, digits, firmware, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from edge_agent.bundle import tree_sha256

    again = compile_hls(dense_mlp, digits.x_train[:500], tmp_path / "again", part=PART)
    assert tree_sha256(again.project) == tree_sha256(firmware.project)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "packager.cli.main", *args], capture_output=True, text=True)


@pytest.mark.parametrize("zipmap", [False, True], ids=["probabilities", "zipmap"])
def test_the_readme_commands_package_and_serve_the_skl2onnx_model(zipmap: bool, digits, signing_key,  # type: ignore[no-untyped-def]
                                                                  tmp_path: Path) -> None:
    """The README's digits MLP as skl2onnx writes it: packaged by the CLI, served as onnxruntime serves it."""
    source = build_digits_mlp(tmp_path / "digits.onnx", zipmap=zipmap)
    np.savez(tmp_path / "calib.npz", input=digits.x_train[:400])
    np.savez(tmp_path / "val.npz", input=digits.x_test, label=digits.y_test)
    assert _cli("model", "register", "digits", str(source)).returncode == 0
    bundle = tmp_path / "digits-fpga.edb"
    done = _cli("package", "digits", "--profile", "fpga-emulator", "-o", str(bundle), "--calibration",
                str(tmp_path / "calib.npz"), "--validation", str(tmp_path / "val.npz"))
    assert done.returncode == 0, done.stderr
    unpacked = tmp_path / "unpacked"
    manifest = open_bundle(bundle, unpacked)
    outputs = [o.name for o in ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).get_outputs()]
    assert [o.name for o in manifest.outputs] == outputs
    logits = FirmwareReference(unpacked / "accelerator" / "firmware").predict(digits.x_test)
    with serving(tmp_path / "work", [bundle]) as server:
        agreement = check_served_like_onnxruntime(server, source, digits.x_test, logits,
                                                  manifest.report["accelerator"])
    assert agreement >= 0.95
