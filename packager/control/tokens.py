"""Bearer tokens of the controller's API, and the console's session cookie derived from them.

A token file holds one token per line (blank lines and ``#`` comments are skipped), so a team can
give each script its own and rotate them one at a time. The API takes ``Authorization: Bearer T``;
a browser logs in once through a form and keeps a cookie holding ``HMAC-SHA256(T, purpose)``, never
the token itself: a cookie copied out of a browser cannot be replayed as a bearer token, and it
stops working when its token leaves the file. Every comparison is constant-time and looks at every
token, so timing tells nothing about which one was close.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from edge_agent.errors import UsageError

__all__ = ["SESSION_COOKIE", "TokenGuard", "load_tokens"]

SESSION_COOKIE = "edgedeploy_session"
_SESSION_PURPOSE = b"edgedeploy controller console session v1"
_MIN_TOKEN_CHARS = 16  # about 96 bits from `openssl rand -base64 12`; shorter ones are guessable


def load_tokens(path: Path) -> list[str]:
    """The tokens of a token file; UsageError naming ``--token-file`` when it is missing, empty or weak."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--token-file: cannot read {path} ({exc.__class__.__name__})") from None
    tokens = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise UsageError(f"--token-file: {path} holds no token (one per line)")
    for number, token in enumerate(tokens, 1):
        if len(token) < _MIN_TOKEN_CHARS or any(c.isspace() for c in token):
            raise UsageError(f"--token-file: token {number} of {path} must be at least {_MIN_TOKEN_CHARS} "
                             "characters without spaces (e.g. `openssl rand -hex 32`)")
    return tokens


class TokenGuard:
    """Checks bearer tokens and session cookies; with no tokens, everything is open."""

    def __init__(self, tokens: list[str] | None) -> None:
        self._tokens = tuple(t.encode() for t in tokens or ())
        self._sessions = tuple(self._session_of(t) for t in self._tokens)

    @property
    def enabled(self) -> bool:
        """True when requests must carry a token (or a session cookie)."""
        return bool(self._tokens)

    @staticmethod
    def _session_of(token: bytes) -> bytes:
        return hmac.new(token, _SESSION_PURPOSE, hashlib.sha256).hexdigest().encode()

    @staticmethod
    def _any_equal(value: bytes, candidates: tuple[bytes, ...]) -> bool:
        matched = False
        for candidate in candidates:  # no early exit: every candidate is compared
            matched |= hmac.compare_digest(value, candidate)
        return matched

    def bearer_ok(self, authorization: str | None) -> bool:
        """True when ``authorization`` is ``Bearer <one of the tokens>`` (or tokens are off)."""
        if not self.enabled:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and self._any_equal(token.strip().encode(), self._tokens)

    def session_ok(self, cookie: str | None) -> bool:
        """True when ``cookie`` is the session value of one of the tokens (or tokens are off)."""
        if not self.enabled:
            return True
        return bool(cookie) and self._any_equal((cookie or "").encode(), self._sessions)

    def login(self, token: str) -> str | None:
        """The session cookie value for a correct ``token``; None for a wrong one."""
        raw = token.strip().encode()
        if not self.enabled or not self._any_equal(raw, self._tokens):
            return None
        return self._session_of(raw).decode()
