"""Throwaway PostgreSQL databases for tests, on the server of these machines (127.0.0.1:5432, user postgres).

``$EDGEDEPLOY_TEST_POSTGRES`` names another server (a URL to its maintenance database). Each database
gets a random name, so tests of several sessions never meet, and is dropped with its sessions closed.
Without psycopg or a server that answers, the tests that need one skip and say why.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

__all__ = ["ADMIN_URL", "admin_connection", "scratch_database"]

ADMIN_URL = os.environ.get("EDGEDEPLOY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextmanager
def admin_connection() -> Iterator[Any]:
    """An autocommit connection to the server's maintenance database (skips the test without a server)."""
    psycopg = pytest.importorskip("psycopg")
    try:
        conn = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL server at {ADMIN_URL}: {' '.join(str(exc).split())}")
    with conn:
        yield conn


@contextmanager
def scratch_database() -> Iterator[str]:
    """Create an empty database with a random name, yield its URL, drop it afterwards."""
    name = f"edgedeploy_test_{secrets.token_hex(6)}"
    with admin_connection() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
