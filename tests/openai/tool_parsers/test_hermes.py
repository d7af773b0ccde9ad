"""hermes on the cases of vLLM's tests/tool_parsers/test_hermes_tool_parser.py (and SGLang's Qwen2.5 detector
cases), whole and streamed token by token with Qwen3's tokenizer."""
import json

import pytest

from serval.openai.tool_parsers import get_tool_parser
from tests.openai.tool_parsers.streaming import assert_stream_equals_whole, qwen3_tokenizer

Parser = get_tool_parser("hermes")
WEATHER = {"location": "San Francisco, California, United States", "unit": "celsius"}

CASES = [  # model output, content, [(name, arguments)]
    ("This is some prior text that has nothing to do with tool calling.",
     "This is some prior text that has nothing to do with tool calling.", []),
    ('<tool_call>\n{"name": "final_answer", "arguments": {"trigger": true}}\n</tool_call>', None,
     [("final_answer", {"trigger": True})]),
    ('<tool_call>{"name": "get_current_temperature",\n"arguments": {"location":\n'
     '"San Francisco, California, United States", "unit": "celsius"}}</tool_call>', None,
     [("get_current_temperature", WEATHER)]),
    ('Sure, let me check the weather.<tool_call>{"name": "get_weather", "arguments": {"city": "NYC"}}</tool_call>',
     "Sure, let me check the weather.", [("get_weather", {"city": "NYC"})]),
    ('<tool_call>{"name": "search", "arguments": {"q": "cats"}}</tool_call>'
     '<tool_call>{"name": "search", "arguments": {"q": "dogs"}}</tool_call>', None,
     [("search", {"q": "cats"}), ("search", {"q": "dogs"})]),
    # Qwen3's own layout: a newline between parallel calls, and text after
    ('I will look both up.\n\n<tool_call>\n{"name": "search", "arguments": {"q": "日本 é \\"quoted\\" {x}"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\nDone.',
     "I will look both up.\nDone.", [("search", {"q": '日本 é "quoted" {x}'}), ("now", {})]),
    # the model stopped before </tool_call>: still a call (vLLM's until_eos case)
    ('<tool_call>\n{"name": "final_answer", "arguments": {"trigger": true}}', None,
     [("final_answer", {"trigger": True})]),
    # arguments before the name, nested values
    ('<tool_call>{"arguments": {"a": [1, -2.5e3, null, {"b": false}]}, "name": "x"}</tool_call>', None,
     [("x", {"a": [1, -2500.0, None, {"b": False}]})]),
    # a parameterless call without an arguments key gives "{}"
    ('<tool_call>{"name": "get_time"}</tool_call>', None, [("get_time", {})]),
    # not JSON inside the tags: plain text, nothing of it sent as a call
    ("<tool_call>garbage</tool_call>", "<tool_call>garbage</tool_call>", []),
    ('<tool_call>{"name": "f", "arguments": {invalid}}</tool_call>',
     '<tool_call>{"name": "f", "arguments": {invalid}}</tool_call>', []),
    ("a < b and <tool is not a tag", "a < b and <tool is not a tag", []),
    # arguments the model serialized itself (Granite) are decoded once, not encoded twice
    ('<tool_call>\n{"name": "get_db_config", "arguments": "{\\"param\\": \\"max_connections\\"}"}\n</tool_call>',
     None, [("get_db_config", {"param": "max_connections"})]),
]


@pytest.mark.parametrize("text, content, calls", CASES)
def test_whole_text(text, content, calls):
    result = Parser().extract(text)
    assert result.content == content
    assert [(call.name, json.loads(call.arguments)) for call in result.tool_calls] == calls
    assert all(call.id.startswith("call_") for call in result.tool_calls)


@pytest.mark.parametrize("text, content, calls", CASES)
def test_streamed_token_by_token_equals_whole_text(text, content, calls):
    assert_stream_equals_whole(Parser, qwen3_tokenizer(), text)


def test_arguments_are_the_models_own_json():
    result = Parser().extract('<tool_call>\n{"name": "final_answer", "arguments": {"trigger": true}}\n</tool_call>')
    assert result.tool_calls[0].arguments == '{"trigger": true}'


@pytest.mark.parametrize("chunk", [2, 3, 5, 8])
def test_any_chunking_equals_whole_text(chunk):
    text = CASES[5][0]
    whole = Parser().extract(text)
    parser = Parser()
    deltas = [parser.feed(text[i:i + chunk]) for i in range(0, len(text), chunk)] + [parser.finish()]
    assert "".join(delta.content for delta in deltas) == whole.content
    for index, call in enumerate(whole.tool_calls):
        fragments = [c.function.arguments or "" for d in deltas for c in d.tool_calls if c.index == index]
        assert "".join(fragments) == call.arguments


def test_first_delta_carries_the_name_then_fragments():
    parser = Parser()
    deltas = [parser.feed(piece) for piece in ['<tool_call>{"name": "get_w', 'eather", "argu', 'ments": {"ci',
                                               'ty": "Paris"}}</tool_call>']]
    calls = [call for delta in deltas for call in delta.tool_calls]
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    assert calls[0].function.arguments == "" and all(c.id is None and c.function.name is None for c in calls[1:])
    assert "".join(c.function.arguments for c in calls) == '{"city": "Paris"}'
    assert not any(delta.content for delta in deltas)
