"""``edgedeploy package`` from the command line: the happy path prints a report; bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from packager.keys import SigningKey


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "packager.cli.main", *args], capture_output=True, text=True)


def test_package_prints_the_report_and_writes_a_verified_bundle(
    digits_mlp: Path, signing_key: SigningKey, tmp_path: Path
) -> None:
    assert cli("model", "register", "digits", str(digits_mlp)).returncode == 0
    out = tmp_path / "digits.edb"
    result = cli("package", "digits:1", "--profile", "cpu-arm64", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "packaged (int8)" in result.stdout and "batch-1 latency" in result.stdout
    assert "XnnpackExecutionProvider" in result.stdout
    assert result.stderr == ""  # progress is shown only on a terminal
    assert cli("bundle", "verify", str(out)).returncode == 0
    shown = json.loads(cli("package", str(digits_mlp), "--profile", "cpu-x86_64", "-o", str(tmp_path / "b.edb"),
                           "--quantize", "fp16", "--json").stdout)
    assert shown["report"]["precision"] == "fp16" and len(shown["sha256"]) == 64


def test_package_twice_gives_the_same_bytes_and_prints_where_the_timings_are(
    digits_mlp: Path, signing_key: SigningKey, tmp_path: Path
) -> None:
    assert cli("model", "register", "digits", str(digits_mlp)).returncode == 0
    first = cli("package", "digits:1", "--profile", "cpu-x86_64", "-o", str(tmp_path / "a.edb"))
    # --reproducible is the default now and still accepted, so scripts that pass it keep working
    second = cli("package", "digits:1", "--profile", "cpu-x86_64", "-o", str(tmp_path / "b.edb"), "--reproducible")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert (tmp_path / "a.edb").read_bytes() == (tmp_path / "b.edb").read_bytes()
    assert f"the report with its timings (not signed): {tmp_path / 'a.edb.report.json'}" in first.stdout
    side = json.loads((tmp_path / "a.edb.report.json").read_text())
    assert side["report"]["after"]["latency_ms"] > 0


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["MODEL", "--profile", "toaster"], 1, "unknown device profile"),
        (["/no/such/model.onnx", "--profile", "cpu-x86_64"], 1, "neither a file nor a registered model"),
        (["MODEL", "--profile", "cpu-x86_64", "--quantize", "int4"], 2, "invalid choice"),
        (["MODEL", "--profile", "cpu-arm64", "--quantize", "fp16"], 2, "does not run fp16"),
        (["MODEL", "--profile", "cpu-x86_64", "--batching", "max_batch=x"], 2, "--batching"),
        (["MODEL", "--profile", "cpu-x86_64", "--input-sample", "/no/sample.json"], 1, "input sample not found"),
    ],
)
def test_bad_input_is_one_error_line(
    args: list[str], code: int, text: str, digits_mlp: Path, signing_key: SigningKey, tmp_path: Path
) -> None:
    out = tmp_path / "x.edb"
    result = cli("package", *[str(digits_mlp) if a == "MODEL" else a for a in args], "-o", str(out))
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1
    assert text in result.stderr
    assert not out.exists()


def test_no_signing_key_refuses(digits_mlp: Path, tmp_path: Path) -> None:
    result = cli("package", str(digits_mlp), "--profile", "cpu-x86_64", "-o", str(tmp_path / "x.edb"))
    assert result.returncode == 1 and "keys generate" in result.stderr
