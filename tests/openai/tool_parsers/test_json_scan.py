"""The incremental JSON scanner against Python's json module: every prefix of valid JSON is accepted, the value
ends exactly where json.loads says, and text json.loads refuses is refused (or left incomplete)."""
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from serval.openai.tool_parsers.json_scan import DONE, DONE_BEFORE, INVALID, JsonCallScanner, JsonValueScanner

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12)


def scan(text: str) -> tuple[str, int]:
    """(outcome, characters that belong to the value)."""
    scanner = JsonValueScanner()
    for index, char in enumerate(text):
        outcome = scanner.push(char)
        if outcome == INVALID:
            return INVALID, index
        if outcome == DONE:
            return DONE, index + 1
        if outcome == DONE_BEFORE:
            return DONE, index
    return (DONE if scanner.finish() else "incomplete"), len(text)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(value=JSON_VALUES, indent=st.sampled_from([None, 2]), ascii_only=st.booleans())
def test_valid_json_is_accepted_whole(value, indent, ascii_only):
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    assert scan(text) == (DONE, len(text))
    assert scan(text + ", more")[0] == DONE and scan(text + ", more")[1] == len(text)
    for end in range(len(text)):
        assert scan(text[:end])[0] != INVALID


@settings(max_examples=200, derandomize=True, deadline=None)
@given(text=st.text(alphabet='{}[]",:0123456789.eE+-truefalsn \\u', max_size=16))
def test_what_json_refuses_is_never_a_whole_value(text):
    outcome, length = scan(text)
    if outcome == DONE:
        json.loads(text[:length])  # whatever the scanner calls a whole value, json agrees
    try:
        json.loads(text)
    except json.JSONDecodeError:
        assert not (outcome == DONE and length == len(text))


def test_call_object_reports_name_and_raw_arguments():
    scanner = JsonCallScanner(("parameters", "arguments"))
    scan_result = scanner.feed('{"parameters": {"a": [1, "}"]}, "name": "f"} trailing')
    assert scan_result.done and scanner.name == "f" and scan_result.arguments == '{"a": [1, "}"]}'
    assert scan_result.consumed == len('{"parameters": {"a": [1, "}"]}, "name": "f"}')
