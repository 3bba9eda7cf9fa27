"""Bearer tokens and the console's session cookie (packager.control.tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.errors import UsageError
from packager.control.tokens import TokenGuard, load_tokens

A, B = "first-token-0123456789", "second-token-0123456789"


def test_a_token_file_holds_one_token_a_line_with_comments(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# CI\n{A}\n\n  {B}  \n")
    assert load_tokens(path) == [A, B]


@pytest.mark.parametrize(("text", "words"), [
    ("# nothing but a comment\n\n", "holds no token"),
    ("short\n", "at least 16 characters"),
    ("two words in one line\n", "without spaces"),
])
def test_an_unusable_token_file_is_one_error_naming_the_option(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(UsageError, match=words) as caught:
        load_tokens(path)
    assert str(caught.value).startswith("--token-file: ")
    with pytest.raises(UsageError, match="cannot read"):
        load_tokens(tmp_path / "missing")


def test_bearer_and_session_checks() -> None:
    guard = TokenGuard([A, B])
    assert guard.enabled
    assert guard.bearer_ok(f"Bearer {A}") and guard.bearer_ok(f"bearer {B}")
    assert not guard.bearer_ok(None) and not guard.bearer_ok(A) and not guard.bearer_ok(f"Bearer {A}x")
    assert not guard.bearer_ok(f"Basic {A}")
    session = guard.login(B)
    assert session is not None and B not in session and A not in session
    assert guard.session_ok(session) and not guard.session_ok(session[:-1]) and not guard.session_ok(None)
    assert guard.login("wrong-token-0123456789") is None
    assert not TokenGuard([A]).session_ok(session)  # a cookie stops working when its token leaves the file
    assert not guard.bearer_ok(f"Bearer {session}")  # and a cookie is never a bearer token


def test_without_tokens_everything_is_open() -> None:
    guard = TokenGuard(None)
    assert not guard.enabled and guard.bearer_ok(None) and guard.session_ok(None)
    assert guard.login(A) is None  # nothing to log in to
