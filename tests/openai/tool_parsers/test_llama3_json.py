"""llama3_json on the cases of vLLM's tests/tool_parsers/test_llama3_json_tool_parser.py, whole and streamed token
by token with Llama 3's tokenizer (`<|python_tag|>` a special token)."""
import json

import pytest

from serval.openai.tool_parsers import get_tool_parser
from tests.openai.tool_parsers.streaming import assert_stream_equals_whole, llama3_tokenizer

Parser = get_tool_parser("llama3_json")

CASES = [  # model output, content, [(name, arguments)]
    ('{"name": "getOpenIncidentsTool", "parameters": {}}', None, [("getOpenIncidentsTool", {})]),
    ('{"name": "searchTool", "parameters": {"query": "test query", "limit": 10}}', None,
     [("searchTool", {"query": "test query", "limit": 10})]),
    ('<|python_tag|>{"name": "searchTool", "arguments": {"query": "test"}}', None, [("searchTool", {"query": "test"})]),
    ("This is just some text without any tool calls", "This is just some text without any tool calls", []),
    ('{"name": "invalidTool", "parameters": {invalid json}', '{"name": "invalidTool", "parameters": {invalid json}',
     []),
    ('{"name": "searchTool", "parameters": {"query": "test1"}}; {"name": "getOpenIncidentsTool", "parameters": {}}; '
     '{"name": "searchTool", "parameters": {"query": "test2"}}', None,
     [("searchTool", {"query": "test1"}), ("getOpenIncidentsTool", {}), ("searchTool", {"query": "test2"})]),
    ('{"name": "searchTool", "parameters": {"query": "test1"}} ; {"name": "getOpenIncidentsTool", "parameters": {}}',
     None, [("searchTool", {"query": "test1"}), ("getOpenIncidentsTool", {})]),
    ('{"name": "a", "parameters": {"q": 1}}\n{"name": "b", "parameters": {}}', None, [("a", {"q": 1}), ("b", {})]),
    ('{"name": "complexTool", "parameters": {"level1": {"level2": {"level3": {"level4": {"value": "deep"}}}}}}', None,
     [("complexTool", {"level1": {"level2": {"level3": {"level4": {"value": "deep"}}}}})]),
    ('{"name": "searchTool", "parameters": {"query": "test {value} [complex]","nested": {"inner": "more {brackets}"}}}',
     None, [("searchTool", {"query": "test {value} [complex]", "nested": {"inner": "more {brackets}"}})]),
    ('{"name": "parserTool", "parameters": {"text": "He said \\"Hello {world}\\""}}', None,
     [("parserTool", {"text": 'He said "Hello {world}"'})]),
    ('{"parameters": {}}', '{"parameters": {}}', []),
    ('{"name": "toolWithoutParams"}', '{"name": "toolWithoutParams"}', []),
    ('{"name": "searchTool", "parameters": {"query": "test"}} I used {searchTool} for this.',
     " I used {searchTool} for this.", [("searchTool", {"query": "test"})]),
]


@pytest.mark.parametrize("text, content, calls", CASES)
def test_whole_text(text, content, calls):
    result = Parser().extract(text)
    assert result.content == content
    assert [(call.name, json.loads(call.arguments)) for call in result.tool_calls] == calls


@pytest.mark.parametrize("text, content, calls", CASES)
def test_streamed_token_by_token_equals_whole_text(text, content, calls):
    assert_stream_equals_whole(Parser, llama3_tokenizer(), text)


def test_parameterless_call_gives_empty_object():
    assert Parser().extract('{"name": "getOpenIncidentsTool", "parameters": {}}').tool_calls[0].arguments == "{}"


def test_text_before_json_is_not_a_call():
    """A call is the whole answer in Llama 3's format: JSON in the middle of prose stays prose, so a stream never
    has to take back text it sent."""
    text = 'Here is the result: {"name": "getOpenIncidentsTool", "parameters": {}}'
    assert Parser().extract(text).content == text
