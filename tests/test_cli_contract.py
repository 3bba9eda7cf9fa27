"""The CLI shapes of `fleet` and `deploy` that CLI.md promises: options where users write them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e.conftest import free_port


@pytest.mark.parametrize("where", ["before", "after"])
def test_broker_option_in_either_position(where: str) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    args = ["fleet", "--broker", url, "devices"] if where == "before" else ["fleet", "devices", "--broker", url]
    result = subprocess.run([sys.executable, "-m", "packager.cli.main", *args], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"error: cannot reach the MQTT broker at {url} ([Errno 111] Connection refused); " \
                            "is it running?\n"


@pytest.mark.parametrize(
    ("extra", "code", "text"),
    [
        (["--dry-run", "-o", "manifests"], 2, "use it with --target kubernetes"),
        (["--target", "kubernetes", "--dry-run"], 2, "use it with --target kubernetes"),
        (["--target", "kubernetes", "--dry-run", "-o", "manifests"], 1, "kubernetes target is not available"),
    ],
)
def test_deploy_dry_run_is_part_of_the_command_line(extra: list[str], code: int, text: str, tmp_path: object) -> None:
    args = ["deploy", "svc", "--bundle", "/no/bundle.edb", *extra]
    result = subprocess.run([sys.executable, "-m", "packager.cli.main", *args], capture_output=True, text=True)
    assert result.returncode == code and text in result.stderr
