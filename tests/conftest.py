"""Shared fixtures: an isolated EDGEDEPLOY_HOME per test, a signing key, and real digits models."""

from __future__ import annotations

from pathlib import Path

import pytest

from packager.examples import DigitsData, build_digits_cnn, build_digits_mlp, digits_data
from packager.keys import SigningKey, generate_key


@pytest.fixture(autouse=True)
def edgedeploy_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own registry, keys and services folder."""
    home = tmp_path / "edgedeploy-home"
    monkeypatch.setenv("EDGEDEPLOY_HOME", str(home))
    monkeypatch.delenv("EDGEDEPLOY_PROFILES", raising=False)
    return home


@pytest.fixture
def signing_key(edgedeploy_home: Path) -> SigningKey:
    """The default signing key, generated (and trusted) in this test's home."""
    return generate_key()


@pytest.fixture(scope="session")
def digits() -> DigitsData:
    return digits_data()


@pytest.fixture(scope="session")
def digits_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained digits MLP (skl2onnx): input 'input' [N,64], outputs 'label', 'probabilities'."""
    return build_digits_mlp(tmp_path_factory.mktemp("models") / "digits_mlp.onnx")


@pytest.fixture(scope="session")
def digits_cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits CNN (onnx.helper): input 'input' [N,1,8,8], output 'probabilities' [N,10]."""
    return build_digits_cnn(tmp_path_factory.mktemp("models") / "digits_cnn.onnx")
