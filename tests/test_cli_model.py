"""``edgedeploy model`` as a user runs it: real subprocesses, real registry, CLI.md output shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from packager.registry import Registry

EDGEDEPLOY = Path(sys.executable).parent / "edgedeploy"
SHOW_FIELDS = {"name", "version", "sha256", "size", "tags", "properties", "description", "created"}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``edgedeploy`` with stdin closed (not a terminal), as in a script."""
    return subprocess.run([str(EDGEDEPLOY), *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60)


def ok(*args: str) -> str:
    result = run(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_register_list_show_path_download_delete(digits_mlp: Path, tmp_path: Path) -> None:
    assert ok("model", "register", "digits", str(digits_mlp), "--tag", "team=vision", "--property",
              "accuracy=0.97", "--description", "8x8 digits MLP").strip() == "digits:1"
    second = json.loads(ok("model", "register", "digits", str(digits_mlp), "--json"))
    assert second["version"] == 2 and second["framework"] == "onnx"

    listed = json.loads(ok("model", "list", "--tag", "team=vision", "--json"))
    assert [(m["name"], m["version"]) for m in listed] == [("digits", 1)]
    assert "digits" in ok("model", "list")

    shown = json.loads(ok("model", "show", "digits:1", "--json"))
    assert set(shown) >= SHOW_FIELDS
    assert shown["tags"] == {"team": "vision"} and shown["properties"] == {"accuracy": "0.97"}
    assert shown["description"] == "8x8 digits MLP"
    assert shown["size"] == digits_mlp.stat().st_size
    assert json.loads(ok("model", "show", "digits", "--json"))["version"] == 2

    path = Path(ok("model", "path", "digits:1").strip())
    assert path.name == "digits_mlp.onnx" and path.read_bytes() == digits_mlp.read_bytes()

    ok("model", "download", "digits:2", "-o", str(tmp_path / "out"))
    assert (tmp_path / "out" / "digits_mlp.onnx").read_bytes() == digits_mlp.read_bytes()

    refused = run("model", "delete", "digits:1")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert ok("model", "delete", "digits:1", "--yes").strip() == "deleted digits:1"
    assert [m["version"] for m in json.loads(ok("model", "list", "--json"))] == [2]
    ok("model", "delete", "digits", "--all-versions", "--yes")
    assert json.loads(ok("model", "list", "--json")) == []


def test_folder_model_path_is_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "resnet"
    (folder / "weights").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"\x08\x07" * 100)
    (folder / "weights" / "w0.bin").write_bytes(b"w" * 33)
    assert ok("model", "register", "resnet", str(folder), "--framework", "custom").strip() == "resnet:1"
    path = Path(ok("model", "path", "resnet").strip())
    assert path.is_dir() and (path / "weights" / "w0.bin").read_bytes() == b"w" * 33
    shown = json.loads(ok("model", "show", "resnet:1", "--json"))
    assert shown["framework"] == "custom" and shown["size"] == 233 and shown["kind"] == "folder"


@pytest.mark.parametrize(
    ("args", "expected_code", "message"),
    [
        (("model", "register", "m", "missing.onnx"), 1, "does not exist"),
        (("model", "show", "unknown"), 1, "no model named 'unknown'"),
        (("model", "show", "m:9"), 1, "no version 9"),
        (("model", "path", "m:9"), 1, "no version 9"),
        (("model", "download", "unknown:1", "-o", "out"), 1, "no model named"),
        (("model", "register", "m", "{model}", "--tag", "foo"), 2, "invalid tag 'foo'"),
        (("model", "register", "m", "{model}", "--tag", "=v"), 2, "invalid tag"),
        (("model", "register", "m", "{model}", "--property", "noequals"), 2, "invalid property"),
        (("model", "register", "bad/name", "{model}"), 1, "invalid model name"),
        (("model", "show", "m:latest"), 2, "invalid model reference"),
        (("model", "delete", "m"), 2, "--all-versions"),
        (("model", "delete", "m:9", "--yes"), 1, "no version 9"),
        (("model", "register", "m"), 2, "required"),
    ],
)
def test_bad_input_is_one_error_line(args: tuple[str, ...], expected_code: int, message: str,
                                     digits_mlp: Path) -> None:
    Registry().register("m", digits_mlp)
    result = run(*(a.replace("{model}", str(digits_mlp)) for a in args))
    assert result.returncode == expected_code
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert [r.ref for r in Registry().list()] == ["m:1"]  # nothing changed


def _delete_on_terminal(ref: str, answer: str) -> subprocess.CompletedProcess[str]:
    """Run ``model delete`` with a pseudo-terminal on stdin, answering the question."""
    import pty

    primary, secondary = pty.openpty()
    try:
        os.write(primary, answer.encode())
        return subprocess.run([str(EDGEDEPLOY), "model", "delete", ref], stdin=secondary,
                              capture_output=True, text=True, timeout=60)
    finally:
        os.close(primary)
        os.close(secondary)


def test_delete_asks_on_a_terminal(digits_mlp: Path) -> None:
    Registry().register("m", digits_mlp)
    declined = _delete_on_terminal("m:1", "n\n")
    assert declined.returncode == 1 and "delete m:1?" in declined.stdout
    assert [r.ref for r in Registry().list()] == ["m:1"]
    accepted = _delete_on_terminal("m:1", "y\n")
    assert accepted.returncode == 0 and "deleted m:1" in accepted.stdout
    assert Registry().list() == []
