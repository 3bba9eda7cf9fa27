"""The model registry on real SQLite and real files: round trips, versions, deletes, races, crashes."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.errors import EdgeDeployError, NotFoundError, UsageError, ValidationError
from packager.registry import Registry, parse_key_values, parse_model_ref

EDGEDEPLOY = Path(sys.executable).parent / "edgedeploy"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _blob_files(home: Path) -> list[Path]:
    return [p for p in (home / "registry" / "blobs" / "sha256").rglob("*") if p.is_file()]


@pytest.fixture
def folder_model(tmp_path: Path) -> Path:
    """A folder model: an ONNX-like file, a nested vocabulary and a config."""
    root = tmp_path / "bert-tiny"
    (root / "tokenizer").mkdir(parents=True)
    (root / "model.onnx").write_bytes(os.urandom(4096))
    (root / "tokenizer" / "vocab.txt").write_text("a\nb\nc\n")
    (root / "config.json").write_text('{"layers": 2}')
    return root


def test_file_model_round_trip(digits_mlp: Path, tmp_path: Path) -> None:
    registry = Registry()
    record = registry.register("digits", digits_mlp, tags={"team": "vision"}, properties={"accuracy": 0.97},
                               description="8x8 digits MLP")
    assert (record.name, record.version, record.kind) == ("digits", 1, "file")
    assert record.sha256 == _sha256(digits_mlp)
    assert record.size == digits_mlp.stat().st_size
    assert record.framework == "onnx"
    assert record.tags == {"team": "vision"} and record.properties == {"accuracy": "0.97"}

    shown = registry.get("digits").to_dict()
    for key in ("name", "version", "sha256", "size", "tags", "properties", "description", "created"):
        assert shown[key] == record.to_dict()[key]

    path = registry.get_model_path("digits")
    assert path.is_file() and path.name == "digits_mlp.onnx"
    assert path.read_bytes() == digits_mlp.read_bytes()
    path.unlink()  # a user removed the materialized copy: the next call brings it back
    assert registry.get_model_path("digits", 1).read_bytes() == digits_mlp.read_bytes()

    out = registry.download("digits", 1, tmp_path / "out")
    assert out == tmp_path / "out" / "digits_mlp.onnx"
    assert out.read_bytes() == digits_mlp.read_bytes()


def test_folder_model_round_trip(folder_model: Path, tmp_path: Path) -> None:
    registry = Registry()
    record = registry.register("bert", folder_model)
    files = _tree(folder_model)
    assert record.kind == "folder"
    assert record.size == sum(len(b) for b in files.values())
    expected = hashlib.sha256()
    for rel in sorted(files):
        expected.update(f"{rel}\0{hashlib.sha256(files[rel]).hexdigest()}\n".encode())
    assert record.sha256 == expected.hexdigest()
    assert record.framework == "onnx"  # a folder holding an .onnx file

    path = registry.get_model_path("bert", 1)
    assert path.is_dir() and path.name == "bert-tiny"
    assert _tree(path) == files

    out = registry.download("bert", None, tmp_path / "out")
    assert _tree(out) == files


def test_versions_count_up_and_deleted_numbers_are_not_reused(digits_mlp: Path, folder_model: Path) -> None:
    registry = Registry()
    assert [registry.register("m", digits_mlp).version for _ in range(3)] == [1, 2, 3]
    assert registry.register("other", folder_model).version == 1
    registry.delete("m", 3)
    assert registry.get("m").version == 2  # latest is now 2
    assert registry.register("m", folder_model).version == 4  # 3 is never handed out again
    registry.delete("m", all_versions=True)
    assert registry.register("m", digits_mlp).version == 5
    assert registry.get_model_path("m").name == "digits_mlp.onnx"


def test_list_filters_by_name_and_tags(digits_mlp: Path) -> None:
    registry = Registry()
    registry.register("a", digits_mlp, tags={"team": "vision", "stage": "prod"})
    registry.register("a", digits_mlp, tags={"team": "vision"})
    registry.register("b", digits_mlp, tags={"team": "audio", "stage": "prod"})
    assert [r.ref for r in registry.list()] == ["a:1", "a:2", "b:1"]
    assert [r.ref for r in registry.list(name="a")] == ["a:1", "a:2"]
    assert [r.ref for r in registry.list(tags={"stage": "prod"})] == ["a:1", "b:1"]
    assert [r.ref for r in registry.list(name="a", tags={"team": "vision", "stage": "prod"})] == ["a:1"]
    assert registry.list(name="nothing") == []


def test_delete_removes_only_unreferenced_blobs(digits_mlp: Path, folder_model: Path,
                                                edgedeploy_home: Path) -> None:
    registry = Registry()
    registry.register("m", digits_mlp)
    registry.register("m", digits_mlp)  # same content: one blob
    registry.register("m", folder_model)
    materialized = registry.get_model_path("m", 3)
    assert len(_blob_files(edgedeploy_home)) == 4

    registry.delete("m", 1)
    assert len(_blob_files(edgedeploy_home)) == 4  # version 2 still uses the file blob
    assert registry.get_model_path("m", 2).read_bytes() == digits_mlp.read_bytes()

    registry.delete("m", 3)
    assert len(_blob_files(edgedeploy_home)) == 1
    assert not materialized.exists()
    with pytest.raises(NotFoundError):
        registry.get("m", 3)

    assert registry.delete("m", all_versions=True) == [2]
    assert _blob_files(edgedeploy_home) == []
    with pytest.raises(NotFoundError, match="no model named 'm'"):
        registry.get("m")


def test_bad_input_raises_clear_errors_and_stores_nothing(digits_mlp: Path, tmp_path: Path) -> None:
    registry = Registry()
    with pytest.raises(NotFoundError, match="does not exist"):
        registry.register("m", tmp_path / "missing.onnx")
    with pytest.raises(ValidationError, match="invalid model name"):
        registry.register("../etc", digits_mlp)
    with pytest.raises(ValidationError, match="invalid model name"):
        registry.register("x" * 129, digits_mlp)
    with pytest.raises(UsageError, match="invalid tag key"):
        registry.register("m", digits_mlp, tags={"": "v"})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValidationError, match="holds no files"):
        registry.register("m", empty)
    assert registry.list() == []

    registry.register("m", digits_mlp)
    with pytest.raises(NotFoundError, match=r"no version 7 \(versions: 1\)"):
        registry.get("m", 7)
    with pytest.raises(NotFoundError, match="no model named 'nope'"):
        registry.get_model_path("nope")
    with pytest.raises(NotFoundError):
        registry.download("m", 2, tmp_path / "out")
    with pytest.raises(UsageError, match="--all-versions"):
        registry.delete("m")
    assert [r.ref for r in registry.list()] == ["m:1"]


def test_parse_helpers() -> None:
    assert parse_model_ref("digits") == ("digits", None)
    assert parse_model_ref("digits:12") == ("digits", 12)
    for bad in ("digits:", "digits:0", "digits:x", ":3"):
        with pytest.raises(EdgeDeployError):
            parse_model_ref(bad)
    assert parse_key_values(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    for bad in (["foo"], ["=v"], [" =v"]):
        with pytest.raises(UsageError, match="KEY=VALUE"):
            parse_key_values(bad)


def test_eight_concurrent_processes_get_versions_one_to_eight(digits_mlp: Path) -> None:
    command = [str(EDGEDEPLOY), "model", "register", "race", str(digits_mlp), "--tag"]
    procs = [
        subprocess.Popen([*command, f"proc={i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(8)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err for _, err in outputs]
    printed = sorted(int(out.strip().rsplit(":", 1)[1]) for out, _ in outputs)
    assert printed == list(range(1, 9))
    records = Registry().list(name="race")
    assert [r.version for r in records] == list(range(1, 9))
    assert sorted(r.tags["proc"] for r in records) == [str(i) for i in range(8)]


def test_killed_registration_leaves_no_partial_version(tmp_path: Path, edgedeploy_home: Path) -> None:
    big = tmp_path / "big.onnx"
    big.write_bytes(os.urandom(50 * 1024 * 1024))
    digest = _sha256(big)
    command = [str(EDGEDEPLOY), "model", "register", "big", str(big)]
    start = time.monotonic()
    subprocess.run(command, check=True, capture_output=True)
    full = time.monotonic() - start  # one whole run calibrates when to kill the others
    rng = random.Random(1234)
    for fraction in (0.5, 0.7, 0.85, 1.0, 1.15, 1.3):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(full * fraction * rng.uniform(0.9, 1.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    registry = Registry()
    visible = registry.list(name="big")
    assert visible, "the uninterrupted registration must be visible"
    for record in visible:
        assert record.sha256 == digest and record.size == big.stat().st_size
        out = registry.download("big", record.version, tmp_path / f"out{record.version}")
        assert _sha256(out) == digest

    record = registry.register("big", big)  # orphans of the killed runs do not get in the way
    assert record.version == len(visible) + 1
    assert _sha256(registry.get_model_path("big")) == digest
    registry.delete("big", all_versions=True)  # and a delete cleans them up
    assert not list((edgedeploy_home / "registry" / "blobs" / "tmp").iterdir())
    assert _blob_files(edgedeploy_home) == []


def test_delete_also_removes_blobs_left_by_a_killed_registration(digits_mlp: Path, tmp_path: Path,
                                                                 edgedeploy_home: Path) -> None:
    registry = Registry()
    registry.register("m", digits_mlp)
    registry.register("m", digits_mlp)
    orphan = tmp_path / "orphan.onnx"
    orphan.write_bytes(os.urandom(1000))
    registry.blobs.put_file(orphan)  # what a run killed between storing blobs and committing leaves
    assert len(_blob_files(edgedeploy_home)) == 2
    registry.delete("m", 1)
    assert [p.name for p in _blob_files(edgedeploy_home)] == [_sha256(digits_mlp)]
    assert registry.get_model_path("m").read_bytes() == digits_mlp.read_bytes()
