"""Bearer keys (primary and secondary) shared by the REST and gRPC servers.

Keys live in a JSON file ``{"primary_key": ..., "secondary_key": ...}`` (mode 0600). The file is
re-read when it changes, so ``edgedeploy service keys --regenerate`` takes effect at once.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
from pathlib import Path

from edge_agent.errors import AuthError, ValidationError

__all__ = ["AuthKeys", "generate_keys"]


def generate_keys() -> dict[str, str]:
    """A fresh pair of random keys."""
    return {"primary_key": secrets.token_urlsafe(32), "secondary_key": secrets.token_urlsafe(32)}


class AuthKeys:
    """Checks ``Authorization: Bearer <key>`` values against the keys file (when enabled)."""

    def __init__(self, keys_file: Path | None, enabled: bool) -> None:
        if enabled and keys_file is None:
            raise ValidationError("auth is enabled but no keys file is configured")
        self.enabled = enabled
        self._path = Path(keys_file) if keys_file else None
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._keys: tuple[str, ...] = ()
        if enabled:
            self._reload()

    def _reload(self) -> None:
        assert self._path is not None
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            raise ValidationError(f"keys file not found: {self._path}") from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if stamp == self._stamp:
                return
            document = json.loads(self._path.read_text())
            self._keys = tuple(k for k in (document.get("primary_key"), document.get("secondary_key")) if k)
            self._stamp = stamp

    def check(self, authorization: str | None) -> None:
        """Raise AuthError unless ``authorization`` carries a current key (or auth is off)."""
        if not self.enabled:
            return
        self._reload()
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthError("missing key: send 'Authorization: Bearer <key>' (edgedeploy service keys NAME)")
        if not any(hmac.compare_digest(token.strip(), key) for key in self._keys):
            raise AuthError("invalid key")
