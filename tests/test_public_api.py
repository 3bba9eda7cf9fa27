"""The public surface: every exported name resolves, and the CLI maps errors in one place."""

from __future__ import annotations

import subprocess
import sys

import pytest

import packager


@pytest.mark.parametrize("name", packager.__all__)
def test_every_exported_name_resolves(name: str) -> None:
    assert getattr(packager, name) is not None


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        _ = packager.no_such_thing  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["no-such-command"], 2),
        (["model", "show"], 2),
        (["package", "digits"], 2),
        (["bundle", "verify", "/no/such/bundle.edb"], 1),
    ],
)
def test_cli_errors_are_one_line_with_exit_code(args: list[str], code: int) -> None:
    result = subprocess.run([sys.executable, "-m", "packager.cli.main", *args], capture_output=True, text=True)
    assert result.returncode == code
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_every_command_group() -> None:
    result = subprocess.run([sys.executable, "-m", "packager.cli.main", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for group in ("model", "keys", "profile", "package", "bundle", "deploy", "service", "serve", "fleet"):
        assert group in result.stdout
