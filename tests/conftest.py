"""Shared fixtures: an isolated EDGEDEPLOY_HOME per test, a signing key, and real digits models."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
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


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a Docker engine that answers: ``DOCKER_HOST``, or Debian's dockerd on a private socket.

    The private engine (root only) lives for the session and is stopped at the end; without
    dockerd/debootstrap or root the Docker tests skip and say why.
    """
    from packager.targets.dockerd import engine_answers, start_private_dockerd

    pytest.importorskip("docker")
    if os.environ.get("DOCKER_HOST") and engine_answers(os.environ["DOCKER_HOST"]):
        yield os.environ["DOCKER_HOST"]
        return
    if shutil.which("dockerd") is None or shutil.which("debootstrap") is None:
        pytest.skip("no Docker engine: dockerd/debootstrap not installed (run .ci/install-docker.sh)")
    if os.geteuid() != 0:
        pytest.skip("no Docker engine: DOCKER_HOST unset and a private dockerd needs root")
    private = start_private_dockerd(tmp_path_factory.mktemp("dockerd"))
    try:
        yield private.base_url
    finally:
        private.stop()


@pytest.fixture
def docker_host(docker_engine: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``DOCKER_HOST`` set to the engine for this test (the CLI and the Python API find it there)."""
    monkeypatch.setenv("DOCKER_HOST", docker_engine)
    return docker_engine


@pytest.fixture
def pg_database() -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database (random name), dropped after the test."""
    from tests.postgres import scratch_database

    with scratch_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A controller store URL on each backend: a SQLite file in tmp_path, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'controller.db'}"
    return str(request.getfixturevalue("pg_database"))
