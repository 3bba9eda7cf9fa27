"""Target conditions: the language, its comparison rules, its one-line errors and its bounds."""

from __future__ import annotations

import operator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import UsageError
from packager.control.conditions import MAX_DEPTH, parse_condition

KITCHEN = {"device_id": "pi-kitchen-01", "profile": "cpu-arm64", "groups": ["kitchen", "canary"],
           "tags": {"site": "milan", "floor": 3, "label": "3", "beta": True}, "online": True,
           "reported": {"agent_version": "0.1.0", "temp_c": 41.5, "net": {"wifi": True, "rssi": -61}}}
GARAGE = {"device_id": "pi-garage-02", "profile": "cpu-x86_64", "groups": [], "tags": {"site": "rome"},
          "online": False, "reported": {}}
BARE = {"device_id": "fresh-03", "groups": [], "tags": {}, "online": True}


@pytest.mark.parametrize(("text", "kitchen", "garage", "bare"), [
    ("tags.site = 'milan' AND profile = 'cpu-arm64'", True, False, False),
    ("tags.site = 'milan' OR tags.site = 'rome'", True, True, False),
    ("'kitchen' IN groups", True, False, False),
    ("'garage' IN groups", False, False, False),
    ("profile IN ('cpu-arm64', 'cpu-x86_64')", True, True, False),
    ("groups IN ('canary', 'lab')", True, False, False),
    ("deviceId = 'pi-garage-02'", False, True, False),
    ("device_id >= 'pi-'", True, True, False),
    ("online", True, False, True),
    ("NOT online", False, True, False),
    ("online = false", False, True, False),
    ("*", True, True, True),
    ("tags.floor >= 3", True, False, False),
    ("3 <= tags.floor", True, False, False),
    ("tags.floor < 3.5", True, False, False),
    ("reported.temp_c > 40", True, False, False),
    ("reported.net.rssi > -70 AND reported.net.wifi", True, False, False),
    ("reported.agent_version = '0.1.0'", True, False, False),
    ("'site' IN tags", True, True, False),
    ("'net' IN reported", True, False, False),
    ("tags.beta = true", True, False, False),
    ("online AND (tags.site = 'rome' OR 'canary' IN groups)", True, False, False),
    ("NOT (tags.site = 'milan') AND online", False, False, True),
])
def test_conditions_select_the_devices_they_describe(text: str, kitchen: bool, garage: bool, bare: bool) -> None:
    condition = parse_condition(text)
    assert [condition.matches(d) for d in (KITCHEN, GARAGE, BARE)] == [kitchen, garage, bare]


def test_a_missing_field_never_matches_a_test_not_even_a_negative_one() -> None:
    assert not parse_condition("tags.site != 'milan'").matches(BARE)
    assert parse_condition("tags.site != 'milan'").matches(GARAGE)
    assert not parse_condition("tags.site NOT IN ('milan')").matches(BARE)
    assert parse_condition("tags.site NOT IN ('milan')").matches(GARAGE)
    assert not parse_condition("profile <> 'cpu-arm64'").matches(BARE)
    # NOT is the logical complement: devices without the field are "not milan"
    assert parse_condition("NOT tags.site = 'milan'").matches(BARE)
    assert parse_condition("NOT (tags.site IN ('milan'))").matches(BARE)
    assert not parse_condition("'x' NOT IN groups").matches({"device_id": "d"})
    assert parse_condition("'x' NOT IN groups").matches(BARE)
    assert not parse_condition("tags.site = 'milan'").matches({"device_id": "d", "tags": {"site": None}})


def test_numbers_strings_and_booleans_stay_apart() -> None:
    assert parse_condition("tags.floor = 3.0").matches(KITCHEN)       # numbers compare numerically
    assert not parse_condition("tags.label = 3").matches(KITCHEN)     # the string '3' is no number
    assert parse_condition("tags.label = '3'").matches(KITCHEN)
    assert parse_condition("tags.label != 3").matches(KITCHEN)        # present and different
    assert not parse_condition("tags.label < 10").matches(KITCHEN)    # no order between a string and a number
    assert not parse_condition("tags.beta = 1").matches(KITCHEN)      # true is not 1
    assert not parse_condition("tags.floor = true").matches(KITCHEN)
    assert not parse_condition("tags.floor IN (true, 'x')").matches(KITCHEN)
    assert parse_condition("tags.floor IN (true, 3)").matches(KITCHEN)
    assert not parse_condition("tags.beta IN (1, 0)").matches(KITCHEN)
    assert parse_condition("tags.site > 'lisbon'").matches(KITCHEN)   # strings in code-point order
    assert not parse_condition("tags.site > 'rome'").matches(KITCHEN)
    assert not parse_condition("tags.site > 'Z'").matches({"device_id": "d", "tags": {"site": "Milan"}})


def test_keywords_and_fixed_field_names_ignore_case_values_do_not() -> None:
    assert parse_condition("TAGS.site = 'milan' and PROFILE = 'cpu-arm64' Or NoT ONLINE").matches(KITCHEN)
    assert parse_condition("'kitchen' in Groups AND DEVICEID = 'pi-kitchen-01'").matches(KITCHEN)
    assert parse_condition("tags.beta = TRUE").matches(KITCHEN)
    assert not parse_condition("tags.site = 'Milan'").matches(KITCHEN)
    assert not parse_condition("tags.Site = 'milan'").matches(KITCHEN)  # a tag key is data: exact


def test_a_quote_inside_a_string_is_written_twice() -> None:
    device = {"device_id": "d", "tags": {"owner": "o'brien"}}
    assert parse_condition("tags.owner = 'o''brien'").matches(device)
    assert not parse_condition("tags.owner = 'obrien'").matches(device)


def test_a_condition_knows_its_text_and_the_fields_it_reads() -> None:
    condition = parse_condition("  tags.site = 'milan' AND (deviceId IN ('a') OR NOT reported.net.wifi)  ")
    assert condition.text == "tags.site = 'milan' AND (deviceId IN ('a') OR NOT reported.net.wifi)"
    assert condition.fields == {"tags.site", "device_id", "reported.net.wifi"}
    assert parse_condition("*").fields == frozenset()
    assert parse_condition("'kitchen' IN groups AND 'site' IN tags").fields == {"groups", "tags"}


FIELDS = "(fields: deviceId, profile, groups, tags.KEY, reported.PATH, online)"


@pytest.mark.parametrize(("text", "message"), [
    ("tag.site = 'milan'", f"--target: unknown field 'tag.site' at column 1 {FIELDS}"),
    ("online AND site = 'x'", f"--target: unknown field 'site' at column 12 {FIELDS}"),
    ("tags. = 'x'", f"--target: unknown field 'tags.' at column 1 {FIELDS}"),
    ("reported.a..b = 1", f"--target: unknown field 'reported.a..b' at column 1 {FIELDS}"),
    ("tags.site = 'milan", "--target: unterminated string at column 13 (close it with ')"),
    ("tags.site = \"milan\"", "--target: strings take single quotes at column 13 (write 'milan', not \"milan\")"),
    ("tags.site == 'milan'", "--target: unknown operator '==' at column 11 "
                             "(write AND, OR, NOT, IN or one of = != < <= > >=)"),
    ("online && tags.x", "--target: unknown operator '&&' at column 8 "
                         "(write AND, OR, NOT, IN or one of = != < <= > >=)"),
    ("tags.site = ", "--target: missing value after '=', found the end at column 13"),
    ("tags.site = AND online", "--target: missing value after '=', found 'AND' at column 13"),
    ("online AND", "--target: missing operand after 'AND' at column 11"),
    ("OR online", "--target: missing operand before 'OR' at column 1"),
    ("online AND ()", "--target: missing operand after '(' at column 13"),
    ("tags.site = 'milan' profile", "--target: unexpected 'profile' after a complete condition at column 21 "
                                    "(join conditions with AND or OR)"),
    ("online)", "--target: unexpected ')' after a complete condition at column 7 (no '(' is open)"),
    ("(online", "--target: missing ')' before the end to close the '(' at column 8 (opened at column 1)"),
    ("", "--target: empty condition (write * for every device)"),
    ("  \t ", "--target: empty condition (write * for every device)"),
    ("groups = 'kitchen'", "--target: field 'groups' is a list at column 1 (write 'kitchen' IN groups)"),
    ("tags = 'x'", "--target: field 'tags' is a map at column 1 (write tags.KEY = 'value', or 'KEY' IN tags)"),
    ("online = 'yes'", "--target: field 'online' is true or false at column 1 (compare it with = true or = false)"),
    ("online > false", "--target: field 'online' is true or false at column 1 (compare it with = true or = false)"),
    ("profile = 5", "--target: field 'profile' is a string at column 1 (quote the value: '5')"),
    ("profile IN ('a', 1)", "--target: field 'profile' cannot equal 1 at column 1 (write profile = 'value')"),
    ("tags.x < true", "--target: '<' needs a number or a string, not true at column 8"),
    ("'a' = 'b'", "--target: '=' compares two values at column 1 (compare one field with one value)"),
    ("tags.a = tags.b", "--target: '=' compares two fields at column 1 (compare one field with one value)"),
    ("profile", "--target: field 'profile' alone is not a condition at column 1 (write profile = 'value')"),
    ("'x'", "--target: missing operator after 'x' at column 4 (write e.g. tags.site = 'milan')"),
    ("'x' IN ('x')", "--target: 'x' IN (...) tests no field at column 1 (write FIELD IN ('a', 'b'))"),
    ("'x' IN profile", "--target: field 'profile' is not a list at column 8 (write profile IN ('a', 'b'))"),
    ("groups IN tags", "--target: IN compares two fields at column 1 "
                       "(write 'value' IN FIELD or FIELD IN ('a', 'b'))"),
    ("profile IN", "--target: missing list or field after 'IN', found the end at column 11 "
                   "(write IN ('a', 'b') or 'a' IN groups)"),
    ("profile IN ()", "--target: missing value after '(', found ')' at column 13"),
    ("profile IN ('a',)", "--target: missing value after ',', found ')' at column 17"),
    ("profile IN ('a' 'b')", "--target: missing ',' or ')' in the list before 'b' at column 17 "
                             "(opened at column 12)"),
    ("tags.a IN (profile)", "--target: missing value after '(', found 'profile' at column 12 "
                            "(a list holds values, not fields)"),
    ("tags.a = 12abc", "--target: bad number '12abc' at column 10"),
    ("tags.a = 1_000", "--target: bad number '1_000' at column 10"),
    ("tags.a = 1e999", "--target: number '1e999' is out of range at column 10"),
    ("tags.a = @", "--target: unexpected character '@' at column 10"),
])
def test_bad_conditions_are_one_line_errors_naming_the_problem_and_its_column(text: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_condition(text)
    assert str(caught.value) == message


def test_the_option_name_is_the_callers() -> None:
    with pytest.raises(UsageError, match=r"^target: unknown field 'x' at column 1"):
        parse_condition("x = 1", option="target")
    with pytest.raises(UsageError, match=r"^--target: the condition must be a string, not int$"):
        parse_condition(5)  # type: ignore[arg-type]


def test_conditions_are_bounded_in_size_and_depth() -> None:
    deep = "(" * MAX_DEPTH + "online" + ")" * MAX_DEPTH
    assert parse_condition(deep).matches(KITCHEN)
    with pytest.raises(UsageError, match=r"^--target: the condition is nested deeper than 32 levels at column 33$"):
        parse_condition("(" + deep + ")")
    with pytest.raises(UsageError, match=r"nested deeper than 32 levels at column 129$"):
        parse_condition("NOT " * (MAX_DEPTH + 1) + "online")
    long = " OR ".join(["tags.site = 'milan'"] * 180)
    assert len(long) == 4136
    with pytest.raises(UsageError, match=r"^--target: the condition is 4136 bytes; at most 4096 are allowed$"):
        parse_condition(long)
    assert parse_condition(" OR ".join(["tags.site = 'milan'"] * 170)).matches(KITCHEN)
    with pytest.raises(UsageError, match="4096 are allowed"):
        parse_condition("tags.site = '" + "é" * 2100 + "'")  # bytes, not characters


def test_one_compiled_condition_over_a_hundred_thousand_devices() -> None:
    devices = [{"device_id": f"dev-{i:06d}", "profile": "cpu-arm64" if i % 2 else "cpu-x86_64",
                "groups": ["canary"] if i % 100 == 0 else [], "tags": {"site": ("milan", "rome", "oslo")[i % 3]},
                "online": i % 7 != 0, "reported": {"temp_c": i % 50}} for i in range(100_000)]
    condition = parse_condition("(tags.site = 'milan' AND profile = 'cpu-arm64' AND online AND reported.temp_c < 25)"
                                " OR 'canary' IN groups")
    expected = {d["device_id"] for i, d in enumerate(devices)
                if (i % 3 == 0 and i % 2 and i % 7 and i % 50 < 25) or i % 100 == 0}
    assert {d["device_id"] for d in devices if condition.matches(d)} == expected


# -- generated conditions against an independent reference evaluator -----------------------------

def kind(value: Any) -> str:
    return {bool: "bool", int: "num", float: "num", str: "str"}.get(type(value), "other")


ORDER = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
FLIP = {"=": "=", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


def lookup(device: dict[str, Any], path: str) -> Any:
    head, _, rest = path.partition(".")
    if head == "tags" and rest:
        return (device.get("tags") or {}).get(rest)
    value: Any = device.get(head)
    for key in rest.split(".") if rest else []:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def reference(node: tuple[Any, ...], device: dict[str, Any]) -> bool:
    """What each node means, written from the documented semantics (not from the parser)."""
    tag = node[0]
    if tag == "all":
        return True
    if tag == "not":
        return not reference(node[1], device)
    if tag in ("and", "or"):
        results = [reference(child, device) for child in node[1]]
        return all(results) if tag == "and" else any(results)
    value = lookup(device, node[1])
    if value is None:
        return False
    if tag == "cmp":
        op, literal = node[2], node[3]
        same = kind(value) == kind(literal) and value == literal
        if op == "=":
            return same
        if op == "!=":
            return not same
        return kind(value) == kind(literal) and kind(value) in ("num", "str") and ORDER[op](value, literal)
    if tag == "in":
        values, negate = node[2], node[3]
        items = value if isinstance(value, list) else [value]
        hit = any(kind(v) == kind(x) and v == x for v in items for x in values)
        return hit != negate
    literal, negate = node[2], node[3]  # "has": literal IN field
    if isinstance(value, list):
        hit = any(kind(v) == kind(literal) and v == literal for v in value)
    else:
        hit = isinstance(value, dict) and literal in value
    return hit != negate


def quote(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


def render(node: tuple[Any, ...], draw: Any) -> str:
    tag = node[0]
    word = draw(st.sampled_from([str.upper, str.lower, str.title]))
    if tag == "all":
        return "*"
    if tag == "not":
        return f"{word('not')} ({render(node[1], draw)})"
    if tag in ("and", "or"):
        return f" {word(tag)} ".join(f"({render(child, draw)})" for child in node[1])
    name = node[1] if node[1] != "device_id" else draw(st.sampled_from(["device_id", "deviceId"]))
    if tag == "cmp":
        if draw(st.booleans()):
            return f"{quote(node[3])} {FLIP[node[2]]} {name}"
        return f"{name} {node[2]} {quote(node[3])}"
    negated = f"{word('not')} {word('in')}" if node[3] else word("in")
    if tag == "in":
        return f"{name} {negated} ({', '.join(quote(v) for v in node[2])})"
    return f"{quote(node[2])} {negated} {name}"


TEXT = st.text(alphabet="ab' x", min_size=0, max_size=4)
LITERAL = st.one_of(TEXT, st.integers(-5, 5), st.floats(-5, 5, allow_nan=False), st.booleans())
ANY_FIELDS = ["tags.site", "tags.floor", "tags.flag", "reported.temp", "reported.net.up", "reported.list"]


@st.composite
def leaves(draw: Any) -> tuple[Any, ...]:
    shape = draw(st.sampled_from(["str", "bool", "any", "in", "has", "all"]))
    if shape == "all":
        return ("all",)
    if shape == "str":
        return ("cmp", draw(st.sampled_from(["device_id", "profile"])),
                draw(st.sampled_from(list(FLIP))), draw(TEXT))
    if shape == "bool":
        return ("cmp", "online", draw(st.sampled_from(["=", "!="])), draw(st.booleans()))
    if shape == "in":
        name = draw(st.sampled_from(["profile", "groups", *ANY_FIELDS]))
        values = st.lists(TEXT if name == "profile" else LITERAL, min_size=1, max_size=3)
        return ("in", name, draw(values), draw(st.booleans()))
    if shape == "has":
        return ("has", draw(st.sampled_from(["groups", "tags", "reported", "reported.list"])),
                draw(st.one_of(st.sampled_from(["site", "temp", "net"]), TEXT)), draw(st.booleans()))
    literal = draw(LITERAL)
    ops = ["=", "!="] if isinstance(literal, bool) else list(FLIP)
    return ("cmp", draw(st.sampled_from(ANY_FIELDS)), draw(st.sampled_from(ops)), literal)


TREES = st.recursive(leaves(), lambda inner: st.one_of(
    st.tuples(st.just("not"), inner),
    st.tuples(st.sampled_from(["and", "or"]), st.lists(inner, min_size=2, max_size=3))), max_leaves=8)

MAYBE_TEXT = st.one_of(st.none(), TEXT)
DEVICES = st.fixed_dictionaries({
    "device_id": TEXT,
    "online": st.one_of(st.none(), st.booleans()),
    "profile": MAYBE_TEXT,
    "groups": st.lists(TEXT, max_size=3),
    "tags": st.dictionaries(st.sampled_from(["site", "floor", "flag"]), LITERAL, max_size=3),
    "reported": st.fixed_dictionaries({}, optional={
        "temp": LITERAL, "list": st.lists(LITERAL, max_size=3),
        "net": st.fixed_dictionaries({}, optional={"up": LITERAL})}),
})


@settings(max_examples=300, deadline=None)
@given(data=st.data(), tree=TREES, devices=st.lists(DEVICES, min_size=1, max_size=8))
def test_generated_conditions_mean_what_the_documentation_says(data: Any, tree: tuple[Any, ...],
                                                               devices: list[dict[str, Any]]) -> None:
    text = render(tree, data.draw)
    condition = parse_condition(text)
    complement = parse_condition(f"NOT ({text})")
    for device in devices:
        assert condition.matches(device) == reference(tree, device), (text, device)
        assert complement.matches(device) != condition.matches(device), (text, device)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(list("abt.s'()=!<>, -1.5eNOTANDORIN*\"&") + ["tags.site", " IN ", " not "]),
               max_size=30).map("".join))
def test_any_text_parses_or_is_one_usage_error_line(text: str) -> None:
    try:
        condition = parse_condition(text)
    except UsageError as exc:
        assert str(exc).startswith("--target: ") and "\n" not in str(exc)
    else:
        assert isinstance(condition.matches(KITCHEN), bool) and isinstance(condition.matches({}), bool)
