"""The controller as a service: its systemd unit and its container image's build context.

No Docker engine is assumed: the image's build context is checked by doing what its Dockerfile
does, in a fresh virtual environment (install the wheelhouse offline, then the project's wheel) and
running its ENTRYPOINT there against a real broker: the controller must answer with the console and
the API the wheel carries.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from packager.cli.main import build_parser
from packager.images import controller_requirements, write_controller_context
from tests.controller_env import TOKEN, wait_for
from tests.e2e.conftest import MOSQUITTO, ROOT, Broker, free_port, stop_process

UNIT = ROOT / "packager" / "control" / "systemd" / "edgedeploy-controller.service"


def _unit_settings(text: str) -> dict[str, str]:
    return dict(line.removeprefix("Environment=").split("=", 1) for line in text.splitlines()
                if line.startswith("Environment="))


def _exec_start(text: str) -> list[str]:
    joined = text.replace("\\\n", " ")
    return next(line for line in joined.splitlines() if line.startswith("ExecStart=")).split("=", 1)[1].split()


def test_the_systemd_unit_is_accepted_by_systemd_and_its_command_line_parses(tmp_path: Path) -> None:
    text = UNIT.read_text()
    settings = _unit_settings(text)
    command = [settings.get(word[2:-1], word) if word.startswith("${") else word for word in _exec_start(text)]
    assert command[:2] == ["/usr/local/bin/edgedeploy", "controller"]
    args = build_parser().parse_args(command[1:])
    assert (args.store, args.host, args.port, args.retention) == (
        "sqlite:////var/lib/edgedeploy-controller/controller.db", "0.0.0.0", 8090, "7d")
    assert args.token_file == Path("/etc/edgedeploy-controller/tokens")  # on the network only with tokens
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    here = tmp_path / UNIT.name  # the same unit, pointing at this checkout's edgedeploy
    here.write_text(text.replace("/usr/local/bin/edgedeploy", str(Path(sys.executable).parent / "edgedeploy")))
    result = subprocess.run([analyze, "verify", str(here)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr


def _dockerfile_list(dockerfile: str, instruction: str) -> list[str]:
    line = next(line for line in dockerfile.splitlines() if line.startswith(instruction + " "))
    return list(json.loads(line.removeprefix(instruction + " ")))


@pytest.mark.slow
def test_the_image_context_installs_offline_and_its_entrypoint_serves(tmp_path: Path) -> None:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed")
    context = write_controller_context(tmp_path / "context")
    dockerfile = (context / "Dockerfile").read_text()
    entrypoint = _dockerfile_list(dockerfile, "ENTRYPOINT")
    assert entrypoint[:2] == ["edgedeploy", "controller"] and "--token-file" in entrypoint
    assert "USER 10001:10001" in dockerfile and "EXPOSE 8090" in dockerfile and "HEALTHCHECK" in dockerfile
    assert any(w.name.startswith("psycopg_binary") for w in (context / "wheelhouse").iterdir())  # PostgreSQL too

    venv = tmp_path / "image-venv"  # what the Dockerfile's RUN lines do, without an engine
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index"]
    subprocess.run([*pip, "--find-links", str(context / "wheelhouse"), *controller_requirements()], check=True,
                   timeout=600)
    subprocess.run([*pip, "--no-deps", *map(str, (context / "app").glob("*.whl"))], check=True, timeout=300)

    home = tmp_path / "home"
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "EDGEDEPLOY_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    subprocess.run([str(venv / "bin" / "edgedeploy"), "keys", "generate"], check=True, env=env, timeout=120,
                   capture_output=True)
    broker = Broker(tmp_path / "broker")
    broker.folder.mkdir()
    broker.start()
    tokens, port = tmp_path / "tokens", free_port()
    tokens.write_text(TOKEN + "\n")
    command = [str(venv / "bin" / entrypoint[0]), *entrypoint[1:], *_dockerfile_list(dockerfile, "CMD"),
               "--store", f"sqlite:///{tmp_path / 'ctl.db'}", "--token-file", str(tokens), "--port", str(port),
               "--host", "127.0.0.1", "--broker", broker.url]  # later options win: paths of this machine
    log = tmp_path / "controller.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"

        def health() -> dict[str, object] | None:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                request = urllib.request.Request(url + "/api/v1/health", headers={"Authorization": f"Bearer {TOKEN}"})
                with urllib.request.urlopen(request, timeout=5) as response:
                    doc: dict[str, object] = json.loads(response.read())
                    return doc if doc.get("leader") else None
            except OSError:
                return None

        assert wait_for(health, "the image's controller to lead", 120)["connected"] is True
        with urllib.request.urlopen(url + "/static/console.js", timeout=10) as response:
            assert b"followRollout" in response.read()  # the console's files came in the wheel
        with urllib.request.urlopen(url + "/login", timeout=10) as response:
            assert b'name="token"' in response.read()
    finally:
        stop_process(proc)
        broker.stop()
