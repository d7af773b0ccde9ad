"""deepseek_v3 and deepseek_v31 on the cases of vLLM's tests/tool_parsers/test_deepseekv3_tool_parser.py and
test_deepseekv31_tool_parser.py (and the V3 parser's docstring example, calls on separate lines) and SGLang's
malformed-call tests (test/registered/function_call), whole text, streamed character by character, and token by
token with a 128k BPE that holds DeepSeek's markers as special tokens."""
import json

import pytest

from serval.openai.tool_parsers import get_tool_parser
from serval.openai.tool_parsers.deepseek import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, MARKERS, SEP
from tests.openai.tool_parsers.streaming import (assert_stream_equals_whole, deepseek_tokenizer, stream,
                                                 token_deltas)


def v3_call(name: str, arguments: str) -> str:
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{arguments}\n```{CALL_END}"


def v31_call(name: str, arguments: str) -> str:
    return f"{CALL_BEGIN}{name}{SEP}{arguments}{CALL_END}"


def block(*calls: str, between: str = "") -> str:
    return CALLS_BEGIN + between.join(calls) + CALLS_END


TYPES = ('{"string_field": "hello", "int_field": 42, "float_field": 3.14, "bool_field": true, "null_field": null, '
         '"array_field": ["a", "b", "c"], "object_field": {"nested": "value"}, "empty_array": [], "empty_object": {}}')
ESCAPED = '{"text": "He said \\"hello\\"", "path": "C:\\\\Users\\\\file", "newline": "line1\\nline2"}'
TOKYO = '{"city": "Tokyo", "unit": "celsius"}'
HOTELS = '{"location": "Tokyo", "check_in": "2025-01-15"}'

V3_CASES = [  # model output, content, [(name, arguments)]
    ("How can I help you today? I can check weather for you.",
     "How can I help you today? I can check weather for you.", []),
    (block(v3_call("get_weather", TOKYO)), None, [("get_weather", TOKYO)]),
    (block(v3_call("get_weather", TOKYO), v3_call("search_hotels", HOTELS)), None,
     [("get_weather", TOKYO), ("search_hotels", HOTELS)]),
    (block(v3_call("get_current_weather", '{"location": "Beijing"}'),
           v3_call("get_current_weather", '{"location": "Beijing"}'), between="\n"), None,
     [("get_current_weather", '{"location": "Beijing"}')] * 2),
    (block(v3_call("test_function", TYPES)), None, [("test_function", TYPES)]),
    (block(v3_call("get_current_time", "{}")), None, [("get_current_time", "{}")]),
    ("Let me check the weather for you." + block(v3_call("get_weather", '{"city": "Paris"}')),
     "Let me check the weather for you.", [("get_weather", '{"city": "Paris"}')]),
    (block(v3_call("send_message", ESCAPED)), None, [("send_message", ESCAPED)]),
    # malformed: the call markers are missing, so the block is no call and stays content, whole
    (f'{CALLS_BEGIN}function{SEP}get_weather\n```json\n{{"city": "Tokyo"}}\n```{CALLS_END}',
     f'{CALLS_BEGIN}function{SEP}get_weather\n```json\n{{"city": "Tokyo"}}\n```{CALLS_END}', []),
    # SGLang's test_deepseek_malformed: a broken call after a good one keeps the good one, no markup in content
    ("Sure. " + block(v3_call("get_weather", '{"city": "Boston"}'), v3_call("search", "{bad json")), "Sure.",
     [("get_weather", '{"city": "Boston"}')]),
    # arguments that are not an object: no call
    (f"Sure.{CALLS_BEGIN}{CALL_BEGIN}function{SEP}f\n```json\nnope\n```{CALL_END}{CALLS_END}",
     f"Sure.{CALLS_BEGIN}{CALL_BEGIN}function{SEP}f\n```json\nnope\n```{CALL_END}{CALLS_END}", []),
]
V31_CASES = [
    ("normal text" + block(v31_call("foo", '{"x":1}')), "normal text", [("foo", '{"x":1}')]),
    ("some prefix text" + block(v31_call("foo", '{"x":1}'), v31_call("bar", '{"y":2}')) + " some suffix text",
     "some prefix text", [("foo", '{"x":1}'), ("bar", '{"y":2}')]),
    # cut off inside the block, and a block without call markers: no call, the text unchanged
    (f"Let me look that up.{CALLS_BEGIN}get_weather", f"Let me look that up.{CALLS_BEGIN}get_weather", []),
    (f'{CALLS_BEGIN}foo{SEP}{{"x":1}}{CALLS_END}', f'{CALLS_BEGIN}foo{SEP}{{"x":1}}{CALLS_END}', []),
    (block(v31_call("send_message", ESCAPED), v31_call("get_current_time", "{}")), None,
     [("send_message", ESCAPED), ("get_current_time", "{}")]),
    ("No tools here.", "No tools here.", []),
    ("Sure. " + block(v31_call("get_weather", '{"city": "Boston"}'), v31_call("search", "{bad json")), "Sure.",
     [("get_weather", '{"city": "Boston"}')]),
]
CASES = [("deepseek_v3", *case) for case in V3_CASES] + [("deepseek_v31", *case) for case in V31_CASES]
TEXTS = {"deepseek_v3": [case[0] for case in V3_CASES], "deepseek_v31": [case[0] for case in V31_CASES]}


@pytest.mark.parametrize("name, text, content, calls", CASES)
def test_whole_text(name, text, content, calls):
    result = get_tool_parser(name)().extract(text)
    assert result.content == content
    assert [(call.name, call.arguments) for call in result.tool_calls] == calls
    for call in result.tool_calls:
        json.loads(call.arguments)


@pytest.mark.parametrize("name, text, content, calls", CASES)
def test_streamed_token_by_token_equals_whole_text(name, text, content, calls):
    assert_stream_equals_whole(get_tool_parser(name), deepseek_tokenizer(), text)


@pytest.mark.parametrize("name, text, content, calls", CASES)
def test_streamed_char_by_char(name, text, content, calls):
    """A marker's characters arrive one at a time: none of them may leak into content."""
    streamed = stream(get_tool_parser(name)(), list(text))
    assert streamed.content == (content or "")
    assert list(zip(streamed.names, streamed.arguments)) == calls


def test_markers_are_single_tokens():
    text = block(v3_call("f", "{}"))
    deltas = token_deltas(deepseek_tokenizer(), text)
    assert all(marker in deltas for marker in (CALLS_BEGIN, CALL_BEGIN, SEP, CALL_END, CALLS_END))


def test_arguments_stream_before_the_call_ends():
    """The first delta of a call comes once its arguments have begun, not at the end of the block."""
    parser = get_tool_parser("deepseek_v3")()
    text = block(v3_call("get_weather", TOKYO))
    seen = [parser.feed(piece) for piece in token_deltas(deepseek_tokenizer(), text[:text.index("Tokyo")])]
    calls = [call for delta in seen for call in delta.tool_calls]
    assert calls and calls[0].function.name == "get_weather"
    assert "".join(call.function.arguments or "" for call in calls) == '{"city": "'
    assert not any(delta.content for delta in seen)


def test_a_call_cut_off_keeps_what_was_sent():
    """Generation stopped mid-arguments (max_tokens): the call stays, with the fragments already streamed."""
    text = CALLS_BEGIN + v3_call("get_weather", TOKYO)[:-20]
    whole = get_tool_parser("deepseek_v3")().extract(text)
    assert [call.name for call in whole.tool_calls] == ["get_weather"] and whole.content is None
    assert TOKYO.startswith(whole.tool_calls[0].arguments)


def test_markers_are_special_tokens_for_the_detokenizer():
    assert set(get_tool_parser("deepseek_v3").special_tokens) == set(MARKERS)
    assert set(get_tool_parser("deepseek_v31").special_tokens) == set(MARKERS)
