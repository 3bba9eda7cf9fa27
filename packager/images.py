"""Container images: the edge-agent runtime with one signed bundle, unchanged, and the fleet controller.

Builds work offline: Python dependencies go into the build context as a wheelhouse (``pip download``
on the host, ``pip install --no-index`` in the image), and the default base image is a slim Debian
made locally with ``debootstrap`` and ``docker import`` (no registry is needed). Layers are ordered
from least to most specific (base, venv, wheels, bundle, labels) so a rebuild from the same bundle
and base reuses every cached layer. The controller's image (:func:`write_controller_context`) shares
the install layers (the base install plus the ``controller`` extra) and runs ``edgedeploy controller``
on port 8090 as user 10001, its SQLite store and order key in the ``/var/lib/edgedeploy`` volume and its
bearer tokens from a mounted secret (it refuses to listen on the network without them).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.bundle import bundle_sha256
from edge_agent.errors import DeploymentError

__all__ = [
    "BASE_IMAGE",
    "BUNDLE_PATH",
    "CONTROLLER_HOME",
    "CONTROLLER_TOKENS",
    "CONTROLLER_UID",
    "ImageBuild",
    "RUNTIME_REQUIREMENTS",
    "build_controller_image",
    "build_image",
    "cache_dir",
    "controller_requirements",
    "ensure_base_image",
    "image_tag",
    "write_context",
    "write_controller_context",
]

log = logging.getLogger(__name__)

BASE_IMAGE = "edgedeploy/base:bookworm"
BUNDLE_PATH = "/var/lib/edgedeploy/bundle/model.edb"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: What the serving process needs inside the container (no packaging or fleet extras).
RUNTIME_REQUIREMENTS = [
    "onnxruntime>=1.17", "onnx>=1.15", "numpy>=1.26", "grpcio>=1.85.1",
    "grpcio-health-checking>=1.85.1", "protobuf>=6.31", "pyyaml>=6.0", "psutil>=5.9",
    "cryptography>=42", "jsonschema>=4.20", "aiohttp>=3.9", "paho-mqtt>=2.0",
    "onnxconverter-common>=1.14", "docker>=7.0",
]
CONTROLLER_HOME = "/var/lib/edgedeploy"  # EDGEDEPLOY_HOME in the image: the order key and the SQLite store
CONTROLLER_TOKENS = "/run/secrets/edgedeploy-tokens"  # where `docker run --mount` or a Kubernetes secret puts them
CONTROLLER_PORT = 8090
#: The controller's user and group in its image: fixed and numeric, so a mounted token file can be given to
#: it (``chown 10001``) and Kubernetes' ``runAsNonRoot`` can check it.
CONTROLLER_UID = 10001


def controller_requirements() -> list[str]:
    """What the controller's image installs: the base install (the whole ``edgedeploy`` command line
    works there) plus the ``controller`` extra (PostgreSQL), as this project's metadata declares them."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    chosen = []
    for line in requires("edgedeploy") or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": "controller"}):
            continue
        requirement.marker = None
        chosen.append(str(requirement))
    return chosen


@dataclass
class ImageBuild:
    """A built image: its tag, id, size and the build time in seconds."""

    tag: str
    image_id: str
    size: int
    seconds: float
    bundle_sha256: str


def cache_dir() -> Path:
    """Where base-image tars and wheelhouses are cached between runs (~/.cache/edgedeploy)."""
    path = Path.home() / ".cache" / "edgedeploy"
    path.mkdir(parents=True, exist_ok=True)
    return path


def image_tag(name: str, bundle_sha256: str) -> str:
    """The tag of the image serving ``name`` from the bundle with this digest."""
    return f"edgedeploy/{name}:{bundle_sha256[:12]}"


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False,
                            env=None if env is None else {**os.environ, **env})
    if result.returncode != 0:
        raise DeploymentError(f"{what} failed ({result.returncode}): {result.stderr.strip()[-800:]}")


# What debootstrap leaves that an image does not need: the downloaded .debs, apt's package lists
# (``apt-get update`` fetches them again), manual pages and message translations; the docs go but
# each package's copyright file stays. About 145 of the rootfs's 275 MB.
_ROOTFS_LEFTOVERS = ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_*", "usr/share/man/*",
                     "usr/share/info/*", "usr/share/locale/*/")


def _slim_rootfs(rootfs: Path) -> None:
    """Remove :data:`_ROOTFS_LEFTOVERS` and the docs but the copyright files from a debootstrapped ``rootfs``."""
    for pattern in _ROOTFS_LEFTOVERS:
        for path in rootfs.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    for path in sorted((rootfs / "usr/share/doc").rglob("*"), reverse=True):  # children before parents
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        elif path.name != "copyright":
            path.unlink()


def _base_rootfs_tar(force: bool) -> Path:
    """A tar of a debootstrapped bookworm rootfs, slimmed (cached; under a minute and 130 MB cold)."""
    tar = cache_dir() / "base-bookworm.tar"
    if tar.exists() and not force:
        return tar
    if shutil.which("debootstrap") is None:
        raise DeploymentError("debootstrap is not installed: run .ci/install-docker.sh, or pass --base-image")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm",
              str(rootfs)], "debootstrap")
        _slim_rootfs(rootfs)
        partial = tar.with_suffix(".partial")
        _run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], "tar of the base rootfs")
        partial.replace(tar)
    return tar


def ensure_base_image(client: Any, tag: str = BASE_IMAGE, force: bool = False) -> str:
    """Make sure the default base image exists in the engine (debootstrap + import when absent)."""
    import docker

    if not force:
        try:
            client.images.get(tag)
            return tag
        except docker.errors.ImageNotFound:
            pass
    tar = _base_rootfs_tar(force)
    repository, _, version = tag.partition(":")
    log.info("importing base image %s from %s", tag, tar)
    client.api.import_image(src=str(tar), repository=repository, tag=version or "latest")
    return tag


def _wheelhouse(requirements: list[str] = RUNTIME_REQUIREMENTS, force: bool = False) -> Path:
    """Wheels of ``requirements`` (cached by their content)."""
    key = hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:12]
    house = cache_dir() / f"wheelhouse-{key}"
    if force and house.exists():
        shutil.rmtree(house)
    if not house.exists():
        partial = house.with_name(house.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d",
              str(partial), *requirements], "pip download of the image's dependencies")
        partial.replace(house)
    return house


def _project_wheel(dest: Path) -> Path:
    """A wheel of this project, rebuilt each time (it is small) but byte-stable for the cache."""
    dest.mkdir(parents=True, exist_ok=True)
    # zip entries take file mtimes unless SOURCE_DATE_EPOCH fixes them: with it, the same sources
    # give the same wheel bytes, so Docker's COPY layer (content-addressed) is reused on a rebuild
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
          str(dest), str(PROJECT_ROOT)], "pip wheel of edgedeploy", env={"SOURCE_DATE_EPOCH": "315532800"})
    wheels = sorted(dest.glob("edgedeploy-*.whl"))
    if not wheels:
        raise DeploymentError(f"pip wheel produced no edgedeploy wheel in {dest}")
    return wheels[-1]


# The layers both images share: a venv, the wheelhouse installed offline, then this project's wheel.
_INSTALL = """\
FROM {base}
RUN python3 -m venv /opt/edgedeploy
COPY wheelhouse /wheelhouse
RUN /opt/edgedeploy/bin/pip install -q --no-index --find-links /wheelhouse {requirements}
COPY app /app
RUN /opt/edgedeploy/bin/pip install -q --no-index --no-deps /app/*.whl
ENV PATH=/opt/edgedeploy/bin:$PATH PYTHONUNBUFFERED=1
"""
_DOCKERFILE = _INSTALL + """\
COPY bundle/model.edb {bundle_path}
LABEL edgedeploy.bundle.sha256="{sha}" edgedeploy.service="{name}" edgedeploy.base="{base}"
"""
# The health check reads /openapi.json, which needs no token; the API itself does.
_CONTROLLER_DOCKERFILE = _INSTALL + """\
ENV EDGEDEPLOY_HOME={home}
RUN groupadd --system --gid {uid} edgedeploy \\
    && useradd --system --uid {uid} --gid {uid} --home-dir {home} --create-home edgedeploy
USER {uid}:{uid}
VOLUME {home}
EXPOSE {port}
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \\
    CMD python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:{port}/openapi.json', timeout=4)"
ENTRYPOINT ["edgedeploy", "controller", "--host", "0.0.0.0", "--port", "{port}", "--token-file", "{tokens}"]
CMD ["--store", "sqlite:///{home}/controller.db"]
LABEL edgedeploy.role="controller" edgedeploy.base="{base}"
"""


def _fill_install_layers(context: Path, requirements: list[str]) -> str:
    """Put the wheelhouse and this project's wheel in ``context``; returns the quoted requirements."""
    shutil.copytree(_wheelhouse(requirements), context / "wheelhouse")
    _project_wheel(context / "app")
    return " ".join(f"'{r}'" for r in requirements)


def write_context(bundle: Path, name: str, base: str, context: Path) -> str:
    """Fill ``context`` (Dockerfile, wheelhouse, project wheel, bundle); return the bundle sha256."""
    bundle = Path(bundle)
    if not bundle.is_file():
        raise DeploymentError(f"bundle {bundle} does not exist")
    sha = bundle_sha256(bundle)
    requirements = _fill_install_layers(context, RUNTIME_REQUIREMENTS)
    (context / "bundle").mkdir(parents=True)
    shutil.copyfile(bundle, context / "bundle" / "model.edb")
    (context / "Dockerfile").write_text(_DOCKERFILE.format(
        base=base, requirements=requirements, bundle_path=BUNDLE_PATH, sha=sha, name=name))
    return sha


def _docker_build(client: Any, context: Path, tag: str, what: str) -> Any:
    """``docker build`` of ``context`` as ``tag``; DeploymentError with the log's tail when it fails."""
    import docker

    try:
        image, _logs = client.images.build(path=str(context), tag=tag, rm=True, network_mode="host")
    except docker.errors.BuildError as exc:
        tail = "".join(str(line.get("stream", line.get("error", ""))) for line in exc.build_log)
        raise DeploymentError(f"{what} failed: {tail[-1500:]}") from exc
    return image


def build_image(client: Any, bundle: Path, name: str, base: str = BASE_IMAGE,
                tag: str | None = None) -> ImageBuild:
    """Build the serving image for ``bundle``; DeploymentError with the build log tail on failure."""
    import time


    if base == BASE_IMAGE:
        ensure_base_image(client, base)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgedeploy-ctx-") as tmp:
        context = Path(tmp)
        sha = write_context(bundle, name, base, context)
        tag = tag or image_tag(name, sha)
        image = _docker_build(client, context, tag, f"image build for {name}")
    return ImageBuild(tag, image.id, int(image.attrs.get("Size", 0)),
                      time.monotonic() - started, sha)


def write_controller_context(context: Path, base: str = BASE_IMAGE) -> Path:
    """Fill ``context`` with the controller image's Dockerfile, wheelhouse and project wheel; returns it."""
    requirements = _fill_install_layers(context, controller_requirements())
    (context / "Dockerfile").write_text(_CONTROLLER_DOCKERFILE.format(
        base=base, requirements=requirements, home=CONTROLLER_HOME, port=CONTROLLER_PORT, tokens=CONTROLLER_TOKENS,
        uid=CONTROLLER_UID))
    return context


def build_controller_image(client: Any, base: str = BASE_IMAGE,
                           tag: str = "edgedeploy/controller:latest") -> ImageBuild:
    """Build the controller's image; DeploymentError with the build log tail on failure."""
    import time

    if base == BASE_IMAGE:
        ensure_base_image(client, base)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgedeploy-ctl-") as tmp:
        image = _docker_build(client, write_controller_context(Path(tmp), base), tag, "controller image build")
    return ImageBuild(tag, image.id, int(image.attrs.get("Size", 0)), time.monotonic() - started, "")
