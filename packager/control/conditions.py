"""Target conditions: which devices a deployment is for, in a small SQL-like language.

``tags.site = 'milan' AND profile = 'cpu-arm64'`` (Azure IoT Edge's target conditions). A
hand-written tokenizer and recursive-descent parser turn the text into a tree of closures once;
:meth:`Condition.matches` then only calls them, so a condition is cheap to test against every
device of a large fleet. Grammar (keywords and the fixed field names in any case)::

    condition := or END
    or        := and {OR and}
    and       := not {AND not}
    not       := NOT not | primary
    primary   := '(' or ')' | '*' | test
    test      := operand [cmp operand | [NOT] IN '(' value {',' value} ')' | [NOT] IN field]
    operand   := field | value
    cmp       := '=' | '!=' | '<>' | '<' | '<=' | '>' | '>='
    value     := 'single-quoted string' (a quote inside is written '') | number | TRUE | FALSE
    field     := deviceId | device_id | profile | groups | online | tags | tags.KEY | reported | reported.PATH

Semantics. Each test reads one field and compares it with a value; two fields or two values are
refused. A field that is absent (or JSON null) makes every test on it false, ``!=`` and ``NOT IN``
included: they match devices that *have* the field with another value. ``NOT`` is the plain
logical complement, so ``NOT (tags.site = 'milan')`` also matches devices without a site tag.
Numbers compare numerically when both sides are numbers; strings compare exactly (case-sensitive,
code-point order for ``<``); a string never equals a number (``tags.floor = 3`` does not match the
tag ``'3'``), and ordering a string against a number is false. ``true``/``false`` equal only
booleans. ``'kitchen' IN groups`` is list membership (on a map such as ``tags`` it tests for a key);
``profile IN ('a', 'b')`` is one of the values (a list field matches when any element is one). A
field alone means ``FIELD = true`` (``online AND tags.site = 'milan'``); ``*`` matches every device.

Bounds: at most 4 KiB of text and 32 levels of nesting (parentheses and NOT). Every error is a
:class:`~edge_agent.errors.UsageError` of one line naming the option, what is wrong and the column.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from edge_agent.errors import UsageError, brief

__all__ = ["FIELDS_HELP", "MAX_CONDITION_BYTES", "MAX_DEPTH", "Condition", "parse_condition"]

MAX_CONDITION_BYTES = 4096
MAX_DEPTH = 32
FIELDS_HELP = "fields: deviceId, profile, groups, tags.KEY, reported.PATH, online"

Predicate = Callable[[dict[str, Any]], bool]
_MISSING: Any = object()
_KEYWORDS = ("AND", "OR", "NOT", "IN", "TRUE", "FALSE")
_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq, "!=": operator.ne, "<>": operator.ne,
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}
_MIRRORED = {"=": "=", "!=": "!=", "<>": "<>", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_OPERATOR_CHARS = "=!<>&|~^"
_NUMBER_TYPES = (int, float)  # compared by exact type: bool is an int subclass and must not count


@dataclass(frozen=True)
class _Token:
    kind: str  # "name", "value", "keyword", "op", "(", ")", ",", "*", "end"
    value: Any
    column: int
    text: str


@dataclass(frozen=True)
class _Field:
    name: str  # canonical: "device_id", "tags.site", "reported.a.b"
    kind: str  # "str", "bool", "list", "map", "any"
    get: Callable[[dict[str, Any]], Any]  # the value, or _MISSING


@dataclass(frozen=True)
class Condition:
    """A parsed target condition: ``matches(device)`` and the fields it reads."""

    text: str
    fields: frozenset[str]
    _predicate: Predicate

    def matches(self, device: dict[str, Any]) -> bool:
        """True when ``device`` (``device_id``, ``profile``, ``groups``, ``tags``, ``online``, ``reported``)
        is targeted."""
        return self._predicate(device)

    def __repr__(self) -> str:
        return f"Condition({self.text!r})"


def parse_condition(text: str, option: str = "--target") -> Condition:
    """Parse a target condition; a :class:`UsageError` names ``option``, the problem and its column."""
    if not isinstance(text, str):
        raise UsageError(f"{option}: the condition must be a string, not {type(text).__name__}")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_CONDITION_BYTES:
        raise UsageError(f"{option}: the condition is {size} bytes; at most {MAX_CONDITION_BYTES} are allowed")
    parser = _Parser(text, option)
    predicate = parser.parse()
    return Condition(text.strip(), frozenset(parser.fields), predicate)


# -- tokens --------------------------------------------------------------------------------------

class _Tokenizer:
    """Characters to tokens; every token keeps its 1-based column for messages."""

    def __init__(self, text: str, option: str) -> None:
        self.text, self.option = text, option
        self.i = 0

    def fail(self, message: str, column: int, hint: str = "") -> NoReturn:
        raise UsageError(f"{self.option}: {message} at column {column}" + (f" ({hint})" if hint else ""))

    def tokens(self) -> list[_Token]:
        out: list[_Token] = []
        text = self.text
        while self.i < len(text):
            ch = text[self.i]
            if ch.isspace():
                self.i += 1
            elif ch == "'":
                out.append(self._string())
            elif ch.isdigit() or (ch in "+-." and self._at_number(self.i + 1)):
                out.append(self._number())
            elif ch.isalpha() or ch == "_":
                out.append(self._name())
            elif ch in _OPERATOR_CHARS:
                out.append(self._operator())
            elif ch in "(),*":
                out.append(_Token(ch, ch, self.i + 1, ch))
                self.i += 1
            elif ch == '"':
                self.fail("strings take single quotes", self.i + 1, "write 'milan', not \"milan\"")
            else:
                self.fail(f"unexpected character {ch!r}", self.i + 1)
        out.append(_Token("end", None, len(text) + 1, "the end"))
        return out

    def _at_number(self, j: int) -> bool:
        text = self.text
        return j < len(text) and (text[j].isdigit() or (text[j] == "." and j + 1 < len(text) and text[j + 1].isdigit()))

    def _string(self) -> _Token:
        start, text, parts = self.i, self.text, []
        j = start + 1
        while True:
            end = text.find("'", j)
            if end < 0:
                self.fail("unterminated string", start + 1, "close it with '")
            parts.append(text[j:end])
            if text.startswith("''", end):  # SQL's escape: '' is one quote inside a string
                parts.append("'")
                j = end + 2
                continue
            self.i = end + 1
            return _Token("value", "".join(parts), start + 1, text[start:end + 1])

    def _number(self) -> _Token:
        start, text = self.i, self.text
        j = start + 1
        while j < len(text) and (text[j].isalnum() or text[j] in "._" or (text[j] in "+-" and text[j - 1] in "eE")):
            j += 1
        raw = text[start:j]
        self.i = j
        if "_" in raw:
            self.fail(f"bad number {brief(raw, 40)!r}", start + 1)
        try:
            value: int | float = int(raw) if raw.lstrip("+-").isdigit() else float(raw)
        except ValueError:
            self.fail(f"bad number {brief(raw, 40)!r}", start + 1)
        if not math.isfinite(value):
            self.fail(f"number {brief(raw, 40)!r} is out of range", start + 1)
        return _Token("value", value, start + 1, raw)

    def _name(self) -> _Token:
        start, text = self.i, self.text
        j = start
        while j < len(text) and (text[j].isalnum() or text[j] in "_.-"):
            j += 1
        raw = text[start:j]
        self.i = j
        if raw.upper() in _KEYWORDS:
            word = raw.upper()
            if word in ("TRUE", "FALSE"):
                return _Token("value", word == "TRUE", start + 1, raw)
            return _Token("keyword", word, start + 1, raw)
        return _Token("name", raw, start + 1, raw)

    def _operator(self) -> _Token:
        start, text = self.i, self.text
        j = start
        while j < len(text) and text[j] in _OPERATOR_CHARS:
            j += 1
        raw = text[start:j]
        self.i = j
        if raw not in _COMPARISONS:
            self.fail(f"unknown operator {brief(raw, 40)!r}", start + 1,
                      "write AND, OR, NOT, IN or one of = != < <= > >=")
        return _Token("op", raw, start + 1, raw)


# -- fields --------------------------------------------------------------------------------------

def _top(key: str) -> Callable[[dict[str, Any]], Any]:
    def get(device: dict[str, Any]) -> Any:
        value = device.get(key)
        return _MISSING if value is None else value
    return get


def _tag(key: str) -> Callable[[dict[str, Any]], Any]:
    def get(device: dict[str, Any]) -> Any:
        tags = device.get("tags")
        value = tags.get(key) if isinstance(tags, dict) else None
        return _MISSING if value is None else value
    return get


def _reported(path: tuple[str, ...]) -> Callable[[dict[str, Any]], Any]:
    def get(device: dict[str, Any]) -> Any:
        value = device.get("reported")
        for key in path:
            if not isinstance(value, dict):
                return _MISSING
            value = value.get(key)
        return _MISSING if value is None else value
    return get


_FIXED_FIELDS = {
    "deviceid": _Field("device_id", "str", _top("device_id")),
    "device_id": _Field("device_id", "str", _top("device_id")),
    "profile": _Field("profile", "str", _top("profile")),
    "groups": _Field("groups", "list", _top("groups")),
    "online": _Field("online", "bool", _top("online")),
    "tags": _Field("tags", "map", _top("tags")),
    "reported": _Field("reported", "map", _top("reported")),
}


# -- values --------------------------------------------------------------------------------------

def _same(value: Any, literal: Any) -> bool:
    """Equality that keeps booleans, numbers and strings apart (True is not 1, '3' is not 3)."""
    if isinstance(literal, bool) or isinstance(value, bool):
        return value is literal
    if type(literal) in _NUMBER_TYPES:
        return type(value) in _NUMBER_TYPES and value == literal
    return bool(value == literal)


def _comparable(value: Any, literal: Any) -> bool:
    """Whether ``<`` and friends apply: two numbers or two strings."""
    if type(literal) in _NUMBER_TYPES:
        return type(value) in _NUMBER_TYPES
    return type(value) is str


class _Members:
    """A literal list split by type, so membership is one set lookup and keeps types apart."""

    def __init__(self, values: list[Any]) -> None:
        self.strings = {v for v in values if type(v) is str}
        self.numbers = {v for v in values if type(v) in _NUMBER_TYPES}
        self.booleans = {v for v in values if type(v) is bool}

    def __contains__(self, value: Any) -> bool:
        kind = type(value)
        if kind is str:
            return value in self.strings
        if kind in _NUMBER_TYPES:
            return value in self.numbers
        if kind is bool:
            return value in self.booleans
        return False


def _describe(literal: Any) -> str:
    if isinstance(literal, bool):
        return "true" if literal else "false"
    return repr(literal)


# -- parser --------------------------------------------------------------------------------------

def _always(device: dict[str, Any]) -> bool:
    return True


def _any_of(parts: list[Predicate]) -> Predicate:
    if len(parts) == 1:
        return parts[0]

    def either(device: dict[str, Any]) -> bool:
        return any(part(device) for part in parts)
    return either


def _all_of(parts: list[Predicate]) -> Predicate:
    if len(parts) == 1:
        return parts[0]

    def both(device: dict[str, Any]) -> bool:
        return all(part(device) for part in parts)
    return both


def _negation(inner: Predicate) -> Predicate:
    def negated(device: dict[str, Any]) -> bool:
        return not inner(device)
    return negated


class _Parser:
    """Recursive descent over the tokens; each rule returns a compiled predicate."""

    def __init__(self, text: str, option: str) -> None:
        self.option = option
        self.tokens = _Tokenizer(text, option).tokens()
        self.pos = 0
        self.depth = 0
        self.fields: set[str] = set()

    # helpers
    def fail(self, message: str, token: _Token, hint: str = "") -> NoReturn:
        raise UsageError(f"{self.option}: {message} at column {token.column}" + (f" ({hint})" if hint else ""))

    def peek(self) -> _Token:
        return self.tokens[self.pos]

    def take(self) -> _Token:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def at_keyword(self, word: str, ahead: int = 0) -> bool:
        token = self.tokens[min(self.pos + ahead, len(self.tokens) - 1)]
        return token.kind == "keyword" and token.value == word

    def nest(self, token: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"the condition is nested deeper than {MAX_DEPTH} levels", token)

    def shown(self, token: _Token) -> str:
        if token.kind == "end" or (token.kind == "value" and isinstance(token.value, str)):
            return brief(token.text, 40)  # the end, or a string literal: already in quotes
        return repr(brief(token.text, 40))

    # rules
    def parse(self) -> Predicate:
        if self.peek().kind == "end":
            raise UsageError(f"{self.option}: empty condition (write * for every device)")
        predicate = self.parse_or()
        token = self.peek()
        if token.kind != "end":
            hint = "join conditions with AND or OR" if token.kind != ")" else "no '(' is open"
            self.fail(f"unexpected {self.shown(token)} after a complete condition", token, hint)
        return predicate

    def parse_or(self) -> Predicate:
        parts = [self.parse_and()]
        while self.at_keyword("OR"):
            self.take()
            parts.append(self.parse_and())
        return _any_of(parts)

    def parse_and(self) -> Predicate:
        parts = [self.parse_not()]
        while self.at_keyword("AND"):
            self.take()
            parts.append(self.parse_not())
        return _all_of(parts)

    def parse_not(self) -> Predicate:
        if not self.at_keyword("NOT"):
            return self.parse_primary()
        self.nest(self.take())
        inner = self.parse_not()
        self.depth -= 1
        return _negation(inner)

    def parse_primary(self) -> Predicate:
        token = self.peek()
        if token.kind == "(":
            self.nest(self.take())
            inner = self.parse_or()
            if self.peek().kind != ")":
                self.fail(f"missing ')' before {self.shown(self.peek())} to close the '('", self.peek(),
                          f"opened at column {token.column}")
            self.take()
            self.depth -= 1
            return inner
        if token.kind == "*":
            self.take()
            return _always
        if token.kind in ("end", ")") or (token.kind == "keyword" and token.value in ("AND", "OR", "IN")):
            before = self.tokens[self.pos - 1] if self.pos else None
            if before is not None and before.kind in ("keyword", "("):
                self.fail(f"missing operand after {before.text!r}", token)
            self.fail(f"missing operand before {self.shown(token)}", token)
        return self.parse_test()

    def parse_operand(self, after: _Token | None = None) -> Any:
        token = self.peek()
        if token.kind == "name":
            self.take()
            return self.field(token)
        if token.kind == "value":
            self.take()
            return token.value
        if after is not None:
            self.fail(f"missing value after {after.text!r}, found {self.shown(token)}", token)
        self.fail(f"expected a field or a value, found {self.shown(token)}", token)

    def field(self, token: _Token) -> _Field:
        raw: str = token.value
        lower = raw.lower()
        found = _FIXED_FIELDS.get(lower)
        if found is None and lower.startswith("tags.") and len(raw) > 5:
            found = _Field("tags." + raw[5:], "any", _tag(raw[5:]))
        elif found is None and lower.startswith("reported.") and all(raw[9:].split(".")):
            path = tuple(raw[9:].split("."))
            found = _Field("reported." + ".".join(path), "any", _reported(path))
        if found is None:
            self.fail(f"unknown field {brief(raw, 80)!r}", token, FIELDS_HELP)
        self.fields.add(found.name)
        return found

    def parse_test(self) -> Predicate:
        start = self.peek()
        left = self.parse_operand()
        token = self.peek()
        if token.kind == "op":
            self.take()
            right = self.parse_operand(after=token)
            return self.comparison(left, token, right, start)
        negate = self.at_keyword("NOT") and self.at_keyword("IN", ahead=1)
        if negate:
            self.take()
        if self.at_keyword("IN"):
            return self.membership(left, self.take(), negate, start)
        if isinstance(left, _Field):
            if left.kind not in ("bool", "any"):
                self.fail(f"field {left.name!r} alone is not a condition", start, _usage(left))
            return _compare(left, "=", True)
        self.fail(f"missing operator after {self.shown(start)}", token, "write e.g. tags.site = 'milan'")

    def comparison(self, left: Any, op: _Token, right: Any, start: _Token) -> Predicate:
        if isinstance(left, _Field) == isinstance(right, _Field):
            what = "two fields" if isinstance(left, _Field) else "two values"
            self.fail(f"{op.text!r} compares {what}", start, "compare one field with one value")
        symbol = op.value if isinstance(left, _Field) else _MIRRORED[op.value]
        field, literal = (left, right) if isinstance(left, _Field) else (right, left)
        if field.kind in ("list", "map"):
            self.fail(f"field {field.name!r} is a {field.kind}", start, _usage(field))
        ordering = symbol not in ("=", "!=", "<>")
        if field.kind == "bool" and (ordering or not isinstance(literal, bool)):
            self.fail(f"field {field.name!r} is true or false", start, "compare it with = true or = false")
        if field.kind == "str" and not isinstance(literal, str):
            self.fail(f"field {field.name!r} is a string", start, f"quote the value: '{_describe(literal)}'")
        if ordering and isinstance(literal, bool):
            self.fail(f"{op.text!r} needs a number or a string, not {_describe(literal)}", op)
        return _compare(field, symbol, literal)

    def membership(self, left: Any, word: _Token, negate: bool, start: _Token) -> Predicate:
        token = self.peek()
        if token.kind == "(":
            if not isinstance(left, _Field):
                self.fail(f"{self.shown(start)} IN (...) tests no field", start, "write FIELD IN ('a', 'b')")
            if left.kind == "map":
                self.fail(f"field {left.name!r} is a map", start, _usage(left))
            values = self.value_list()
            if left.kind in ("str", "bool"):
                wanted = str if left.kind == "str" else bool
                odd = next((v for v in values if not isinstance(v, wanted)), None)
                if odd is not None:
                    self.fail(f"field {left.name!r} cannot equal {_describe(odd)}", start, _usage(left))
            return _one_of(left, _Members(values), negate)
        if token.kind == "name":
            field = self.field(self.take())
            if isinstance(left, _Field):
                self.fail("IN compares two fields", start, "write 'value' IN FIELD or FIELD IN ('a', 'b')")
            if field.kind in ("str", "bool"):
                self.fail(f"field {field.name!r} is not a list", token, f"write {field.name} IN ('a', 'b')")
            return _contains(field, left, negate)
        self.fail(f"missing list or field after {word.text!r}, found {self.shown(token)}", token,
                  "write IN ('a', 'b') or 'a' IN groups")

    def value_list(self) -> list[Any]:
        opening = self.take()
        self.nest(opening)
        values: list[Any] = []
        while True:
            token = self.peek()
            if token.kind != "value":
                after = self.tokens[self.pos - 1]
                what = "a list holds values, not fields" if token.kind == "name" else ""
                self.fail(f"missing value after {after.text!r}, found {self.shown(token)}", token, what)
            values.append(self.take().value)
            token = self.take()
            if token.kind == ")":
                self.depth -= 1
                return values
            if token.kind != ",":
                self.fail(f"missing ',' or ')' in the list before {self.shown(token)}", token,
                          f"opened at column {opening.column}")


def _usage(field: _Field) -> str:
    if field.kind == "list":
        return f"write 'kitchen' IN {field.name}"
    if field.kind == "map":
        return f"write {field.name}.KEY = 'value', or 'KEY' IN {field.name}"
    if field.kind == "bool":
        return f"write {field.name} = true"
    return f"write {field.name} = 'value'"


# -- compiled tests --------------------------------------------------------------------------------

def _compare(field: _Field, symbol: str, literal: Any) -> Predicate:
    get = field.get
    if symbol == "=":
        def equal(device: dict[str, Any]) -> bool:
            value = get(device)
            return value is not _MISSING and _same(value, literal)
        return equal
    if symbol in ("!=", "<>"):
        def different(device: dict[str, Any]) -> bool:
            value = get(device)
            return value is not _MISSING and not _same(value, literal)
        return different
    compare = _COMPARISONS[symbol]

    def ordered(device: dict[str, Any]) -> bool:
        value = get(device)
        return value is not _MISSING and _comparable(value, literal) and bool(compare(value, literal))
    return ordered


def _one_of(field: _Field, members: _Members, negate: bool) -> Predicate:
    get = field.get

    def one_of(device: dict[str, Any]) -> bool:
        value = get(device)
        if value is _MISSING:
            return False
        hit = any(v in members for v in value) if isinstance(value, list) else value in members
        return hit != negate
    return one_of


def _contains(field: _Field, literal: Any, negate: bool) -> Predicate:
    get = field.get

    def contains(device: dict[str, Any]) -> bool:
        value = get(device)
        if value is _MISSING:
            return False
        if isinstance(value, list):
            hit = any(_same(v, literal) for v in value)
        else:
            hit = isinstance(value, dict) and isinstance(literal, str) and literal in value
        return hit != negate
    return contains
