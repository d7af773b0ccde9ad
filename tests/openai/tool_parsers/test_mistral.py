"""mistral on the cases of vLLM's tests/tool_parsers/test_mistral_tool_parser.py, both the pre-v11 JSON array and
the v11+ `name{json}` / `name[ARGS]{json}` forms, whole and streamed token by token with a BPE vocabulary that
holds `[TOOL_CALLS]` and `[ARGS]` as special tokens."""
import json

import pytest

from serval.openai.tool_parsers import get_tool_parser
from tests.openai.tool_parsers.streaming import assert_stream_equals_whole, mistral_tokenizer, token_deltas

Parser = get_tool_parser("mistral")
WEATHER = {"city": "San Francisco", "state": "CA", "unit": "celsius"}

CASES = [  # model output, content, [(name, arguments)]
    ("This is a test", "This is a test", []),
    # pre-v11
    ('[TOOL_CALLS][{"name": "add", "arguments":{"a": 3.5, "b": 4}}]', None, [("add", {"a": 3.5, "b": 4})]),
    ('[TOOL_CALLS] [{"name": "get_current_weather", "arguments":{"city": "San Francisco", "state": "CA", '
     '"unit": "celsius"}}]', None, [("get_current_weather", WEATHER)]),
    ('[TOOL_CALLS] [{"arguments":{"city": "San Francisco", "state": "CA", "unit": "celsius"}, '
     '"name": "get_current_weather"}]', None, [("get_current_weather", WEATHER)]),
    ('[TOOL_CALLS] [{"arguments":{"name": "John Doe"}, "name": "get_age"}]', None, [("get_age", {"name": "John Doe"})]),
    ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 3.5, "b": 4}}, {"name": "get_current_weather", '
     '"arguments":{"city": "San Francisco", "state": "CA", "unit": "celsius"}}]', None,
     [("add", {"a": 3.5, "b": 4}), ("get_current_weather", WEATHER)]),
    ('Hello[TOOL_CALLS] [{"name": "add", "arguments":{"a": 1, "b": 2}}]', "Hello", [("add", {"a": 1, "b": 2})]),
    ('[TOOL_CALLS] [{"name": "get_current_weather", "arguments":{"city": "Dallas", "state": "TX", '
     '"unit": "fahrenheit"}}]\nextra trailing data', "\nextra trailing data",
     [("get_current_weather", {"city": "Dallas", "state": "TX", "unit": "fahrenheit"})]),
    ("[TOOL_CALLS] not json at all", "not json at all", []),
    # v11+
    ('[TOOL_CALLS]add_this_and_that{"a": 3.5, "b": 4}', None, [("add_this_and_that", {"a": 3.5, "b": 4})]),
    ('[TOOL_CALLS]get_current_weather{"city": "San Francisco", "state": "CA", "unit": "celsius"}', None,
     [("get_current_weather", WEATHER)]),
    ('[TOOL_CALLS]add{"a": 3.5, "b": 4}[TOOL_CALLS]multiply{"a": 3, "b": 6}', None,
     [("add", {"a": 3.5, "b": 4}), ("multiply", {"a": 3, "b": 6})]),
    ('[TOOL_CALLS]bash{"command": "print(\\"hello world!\\")\\nre.compile(r\'{}\')"}', None,
     [("bash", {"command": "print(\"hello world!\")\nre.compile(r'{}')"})]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', None, [("get_weather", {"city": "Paris"})]),
    ('Hello, this is a test.[TOOL_CALLS]add[ARGS]{"a": 1}[TOOL_CALLS]multiply[ARGS]{}', "Hello, this is a test.",
     [("add", {"a": 1}), ("multiply", {})]),
]


@pytest.mark.parametrize("text, content, calls", CASES)
def test_whole_text(text, content, calls):
    result = Parser().extract(text)
    assert result.content == content
    assert [(call.name, json.loads(call.arguments)) for call in result.tool_calls] == calls


@pytest.mark.parametrize("text, content, calls", CASES)
def test_streamed_token_by_token_equals_whole_text(text, content, calls):
    assert_stream_equals_whole(Parser, mistral_tokenizer(), text)


def test_control_tokens_are_single_tokens():
    deltas = token_deltas(mistral_tokenizer(), '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}')
    assert deltas[0] == "[TOOL_CALLS]" and "[ARGS]" in deltas
