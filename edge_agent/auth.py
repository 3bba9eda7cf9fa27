"""Bearer tokens: the serving keys of the REST and gRPC servers, and the bundle server's token file.

Serving keys live in a JSON file ``{"primary_key": ..., "secondary_key": ...}`` (mode 0600). A
token file (``edgedeploy serve --token-file``, the device's ``bundle_token_file``) holds one token
a line; blank lines and ``#`` comments are skipped. A server accepts every token in its file, so a
token is rotated by adding the new line, moving the devices over, then deleting the old line; a
client sends the first. Both files are re-read when they change (modification time or size), so
``edgedeploy service keys --regenerate`` or an edited token file takes effect at once. Tokens are
compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

from edge_agent.atomic import atomic_write_bytes
from edge_agent.errors import AuthError, NotFoundError, ValidationError

__all__ = ["AuthKeys", "TokenFile", "create_token_file", "generate_keys", "read_token", "token_lines"]


def generate_keys() -> dict[str, str]:
    """A fresh pair of random keys."""
    return {"primary_key": secrets.token_urlsafe(32), "secondary_key": secrets.token_urlsafe(32)}


def token_lines(text: str) -> tuple[str, ...]:
    """The tokens of a token file's text: one a line, without blank lines and ``#`` comments."""
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def _keys_of(text: str) -> tuple[str, ...]:
    document = json.loads(text)
    return tuple(k for k in (document.get("primary_key"), document.get("secondary_key")) if k)


def read_token(path: Path) -> str:
    """The token a client sends: the first of ``path``; NotFoundError / ValidationError say what is wrong."""
    try:
        tokens = token_lines(Path(path).read_text())
    except FileNotFoundError:
        raise NotFoundError(f"token file {path} does not exist") from None
    except OSError as exc:
        raise ValidationError(f"token file {path} cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ValidationError(f"token file {path} is not text (one token a line)") from None
    if not tokens:
        raise ValidationError(f"token file {path} holds no token (one a line)")
    return tokens[0]


def create_token_file(path: Path) -> bool:
    """Write a new random token to ``path`` (mode 0600) unless the file exists; True when it wrote one."""
    path = Path(path)
    if path.exists():
        return False
    atomic_write_bytes(path, (secrets.token_urlsafe(32) + "\n").encode(), mode=0o600)
    return True


class _WatchedTokens:
    """The tokens of one file, read again whenever the file changes."""

    def __init__(self, path: Path, parse: Callable[[str], tuple[str, ...]], what: str) -> None:
        self.path, self._parse, self._what = Path(path), parse, what
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._tokens: tuple[str, ...] = ()
        self.current()

    def current(self) -> tuple[str, ...]:
        """The tokens as the file holds them now."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            raise ValidationError(f"{self._what} not found: {self.path}") from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._tokens = self._parse(self.path.read_text())
                self._stamp = stamp
            return self._tokens

    def check(self, authorization: str | None, hint: str) -> None:
        """Raise AuthError unless ``authorization`` is ``Bearer <one of the tokens>``."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(f"missing key: send 'Authorization: Bearer <key>' ({hint})")
        if not any(hmac.compare_digest(token.strip(), known) for known in self.current()):
            raise AuthError("invalid key")


class AuthKeys:
    """Checks ``Authorization: Bearer <key>`` values against the keys file (when enabled)."""

    def __init__(self, keys_file: Path | None, enabled: bool) -> None:
        if enabled and keys_file is None:
            raise ValidationError("auth is enabled but no keys file is configured")
        self.enabled = enabled
        self._keys = _WatchedTokens(Path(keys_file), _keys_of, "keys file") if enabled and keys_file else None

    def check(self, authorization: str | None) -> None:
        """Raise AuthError unless ``authorization`` carries a current key (or auth is off)."""
        if self._keys is not None:
            self._keys.check(authorization, "edgedeploy service keys NAME")


class TokenFile:
    """Checks ``Authorization: Bearer <token>`` against a token file (``edgedeploy serve --token-file``)."""

    def __init__(self, path: Path) -> None:
        self._tokens = _WatchedTokens(path, token_lines, "token file")
        if not self._tokens.current():
            raise ValidationError(f"token file {path} holds no token (one a line)")

    def check(self, authorization: str | None) -> None:
        """Raise AuthError unless ``authorization`` carries a token of the file."""
        self._tokens.check(authorization, "the token of bundle_token_file in agent.yaml")
