"""``edgedeploy fleet``: --broker is accepted before and after the action, as CLI.md's users write it."""

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
