"""Device profiles (packager/profiles.py): every shipped profile validates; bad ones name the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge_agent.errors import NotFoundError, ValidationError
from edge_agent.profiles import BUILTIN_PROFILES_DIR, list_profiles, load_profile, validate_profile

REQUIRED = {"cpu-x86_64", "cpu-arm64", "nvidia-jetson-orin", "nvidia-gpu-server", "xilinx-kria-kv260",
            "fpga-emulator", "lattice-ice40-up5k"}


def test_every_required_profile_ships_and_validates() -> None:
    names = {p.name for p in list_profiles()}
    assert names >= REQUIRED
    for path in BUILTIN_PROFILES_DIR.glob("*.yaml"):
        profile = load_profile(path)
        assert profile.execution_providers[-1] == "CPUExecutionProvider", "CPU must be the last fallback"
        assert profile.default_quantization == "none" or any(
            p in profile.precisions for p in ("int8", "fp16"))


def test_gpu_profiles_prefer_tensorrt_then_cuda() -> None:
    for name in ("nvidia-jetson-orin", "nvidia-gpu-server"):
        assert load_profile(name).execution_providers[:2] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]


def _document(**changes: object) -> dict[str, object]:
    document = yaml.safe_load((BUILTIN_PROFILES_DIR / "cpu-x86_64.yaml").read_text())
    document.update(changes)
    return document


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"execution_providers": ["CPUExecutionProvider", "MagicEP"]}, "execution_providers[1]"),
        ({"memory_mb": "lots"}, "memory_mb"),
        ({"architecture": "sparc"}, "architecture"),
        ({"default_quantization": "int4"}, "default_quantization"),
        ({"accelerators": [{"kind": "gpu", "vendor": "x"}]}, "accelerators[0]"),
        ({"colour": "blue"}, "(top level)"),
    ],
)
def test_invalid_profile_names_the_bad_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate_profile(_document(**changes), "custom.yaml")
    assert f"invalid field {field}" in str(info.value)
    assert str(info.value).startswith("custom.yaml:")


def test_user_profiles_on_the_search_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "my-board.yaml").write_text(yaml.safe_dump(_document(name="my-board", cpu_cores=1)))
    monkeypatch.setenv("EDGEDEPLOY_PROFILES", str(folder))
    assert load_profile("my-board").document["cpu_cores"] == 1
    (folder / "broken.yaml").write_text(yaml.safe_dump(_document(name="other-name")))
    with pytest.raises(ValidationError, match="must match the file name"):
        load_profile("broken")


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(NotFoundError, match="cpu-x86_64"):
        load_profile("toaster")


def test_cli_profile_list_and_show() -> None:
    run = [sys.executable, "-m", "packager.cli.main", "profile"]
    listed = json.loads(subprocess.run([*run, "list", "--json"], capture_output=True, text=True, check=True).stdout)
    assert {row["name"] for row in listed} >= REQUIRED
    shown = json.loads(subprocess.run([*run, "show", "cpu-arm64", "--json"], capture_output=True, text=True,
                                      check=True).stdout)
    assert shown["architecture"] == "arm64"
    bad = subprocess.run([*run, "show", "toaster"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: unknown device profile")
