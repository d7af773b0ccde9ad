"""phi4_mini_json on the cases of vLLM's tests/tool_parsers/test_phi4mini_tool_parser.py, whole and streamed token by
token. Phi-4-mini's 200k vocabulary does not install offline; `functools[` is plain text in it (no special token),
so any byte-level BPE splits it the same way a real one might: Qwen3's is used, with no markers added."""
import json

import pytest

from serval.openai.tool_parsers import get_tool_parser
from tests.openai.tool_parsers.streaming import assert_stream_equals_whole, qwen3_tokenizer, token_deltas, stream

Parser = get_tool_parser("phi4_mini_json")
TOKYO = ("get_weather", {"city": "Tokyo"})
VARIOUS = {"string_field": "hello", "int_field": 42, "float_field": 3.14, "bool_field": True, "null_field": None,
           "array_field": ["a", "b", "c"], "object_field": {"nested": "value"}, "empty_array": [], "empty_object": {}}
MALFORMED = [  # vLLM's malformed outputs: no call, the text is content
    'functools[{"name": "func", "arguments": {',
    'functools[{"name": "func", "arguments": "not a dict"}]',
    'functools{"name": "func"}',
    'functools[{"name": "func"}]',
    "functools[] This is just text",
    "functools[ This is just text ]",
]

CASES = [  # model output, content, [(name, arguments)]
    ("This is a regular response without any tool calls.", "This is a regular response without any tool calls.", []),
    ('functools[{"name": "get_weather", "arguments": {"city": "Tokyo"}}]', None, [TOKYO]),
    ('functools[\n  {"name": "get_weather", "arguments": {"city": "Tokyo"}},\n  {"name": "get_time", "arguments": '
     '{"timezone": "Asia/Tokyo"}}\n]', None, [TOKYO, ("get_time", {"timezone": "Asia/Tokyo"})]),
    ('functools[{\n  "name": "test_function",\n  "arguments": {\n    "string_field": "hello",\n    "int_field": 42,\n'
     '    "float_field": 3.14,\n    "bool_field": true,\n    "null_field": null,\n    "array_field": ["a", "b", "c"],\n'
     '    "object_field": {"nested": "value"},\n    "empty_array": [],\n    "empty_object": {}\n  }\n}]', None,
     [("test_function", VARIOUS)]),
    ('functools[{"name": "refresh", "arguments": {}}]', None, [("refresh", {})]),
    # vLLM drops the text around the calls; a stream has sent the text before before it sees the marker
    ('Let me check the weather for you.\nfunctools[{"name": "get_weather", "arguments": {"city": "Tokyo"}}]\n'
     'Would you like to know more?', "Let me check the weather for you.\nWould you like to know more?", [TOKYO]),
    ('functools[{\n  "name": "test_function",\n  "arguments": {\n    "quoted": "He said \\"hello\\"",\n'
     '    "path": "C:\\\\Users\\\\file.txt",\n    "newline": "line1\\nline2",\n    "unicode": "emoji: 🎉"\n  }\n}]',
     None, [("test_function", {"quoted": 'He said "hello"', "path": "C:\\Users\\file.txt", "newline": "line1\nline2",
                                "unicode": "emoji: 🎉"})]),
    *[(text, text, []) for text in MALFORMED],
    # "parameters" is read as "arguments", as vLLM reads it
    ('functools[{"name": "get_time", "parameters": {"timezone": "UTC"}}]', None, [("get_time", {"timezone": "UTC"})]),
    # nested arrays, which vLLM's non-greedy regex cuts at the first "]"
    ('functools[{"name": "plot", "arguments": {"xs": [[1, 2], [3]]}}]', None, [("plot", {"xs": [[1, 2], [3]]})]),
    ('functools[{"name": "a", "arguments": {}}]functools[{"name": "b", "arguments": {"k": "]"}}]', None,
     [("a", {}), ("b", {"k": "]"})]),
    ("I like functools. And functools[", "I like functools. And functools[", []),
]


@pytest.mark.parametrize("text, content, calls", CASES)
def test_whole_text_and_streamed_token_by_token_and_char_by_char(text, content, calls):
    whole = Parser().extract(text)
    assert (whole.content, [(call.name, json.loads(call.arguments)) for call in whole.tool_calls]) == (content, calls)
    assert_stream_equals_whole(Parser, qwen3_tokenizer(), text)
    by_char = stream(Parser(), list(text))
    assert (by_char.content, by_char.names, by_char.arguments) == (
        whole.content or "", [call.name for call in whole.tool_calls], [call.arguments for call in whole.tool_calls])


def test_arguments_are_the_models_own_characters():
    """Fragments concatenate to the arguments as written (spacing kept), not a re-serialization."""
    text = 'functools[{"name": "f", "arguments": {"a":1,  "b": [ 2 ]}}]'
    assert Parser().extract(text).tool_calls[0].arguments == '{"a":1,  "b": [ 2 ]}'


def test_partial_marker_is_held_back_then_released():
    parser = Parser()
    assert parser.feed("Use functo").content == "Use"
    assert parser.feed("ols").content == ""  # still the marker's start
    assert parser.feed(" instead").content == " functools instead"


def test_call_cut_short_is_sent_and_nothing_leaks_into_content():
    """A call is sent once its name is whole and its arguments have begun; output that stops inside it (max_tokens)
    keeps the call with the arguments sent so far, and the marker never reaches the content."""
    parser = Parser()
    deltas = [parser.feed(text) for text in token_deltas(qwen3_tokenizer(), 'functools[{"name": "f", "arguments": '
                                                         '{"q": "long text')]
    assert any(call.id for delta in deltas for call in delta.tool_calls)
    deltas.append(parser.finish())
    assert not "".join(delta.content for delta in deltas)
    assert [(call.name, call.arguments) for call in parser.result().tool_calls] == [("f", '{"q": "long text')]
