"""qwen3_xml / qwen3_coder on the cases of vLLM's tests/tool_parsers/test_qwen3coder_tool_parser.py: parameter
values typed by the tool's schema, whole and streamed token by token with Qwen3's tokenizer."""
import json

import pytest

from serval.openai.tool_parsers import get_tool_parser
from serval.openai.tool_parsers.qwen3_xml import convert_parameter
from tests.openai.tool_parsers.streaming import assert_stream_equals_whole, qwen3_tokenizer

Parser = get_tool_parser("qwen3_xml")
TOOLS = [
    {"type": "function", "function": {"name": "get_current_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "state": {"type": "string"},
                                         "unit": {"type": "string", "enum": ["fahrenheit", "celsius"]}},
        "required": ["city", "state"]}}},
    {"type": "function", "function": {"name": "calculate_area", "parameters": {
        "type": "object", "properties": {"shape": {"type": "string"}, "dimensions": {"type": "object"},
                                         "precision": {"type": "integer"}}}}},
]


def xml_call(name, **parameters):
    body = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in parameters.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


DALLAS = xml_call("get_current_weather", city="Dallas", state="TX", unit="fahrenheit")
CASES = [  # model output, content, [(name, arguments)]
    ("This is a test response without any tool calls", "This is a test response without any tool calls", []),
    (DALLAS, None, [("get_current_weather", {"city": "Dallas", "state": "TX", "unit": "fahrenheit"})]),
    ("Sure! Let me check the weather for you." + DALLAS, "Sure! Let me check the weather for you.",
     [("get_current_weather", {"city": "Dallas", "state": "TX", "unit": "fahrenheit"})]),
    (xml_call("calculate_area", shape="rectangle", dimensions='{"width": 10, \n "height": 20}', precision="2"), None,
     [("calculate_area", {"shape": "rectangle", "dimensions": {"width": 10, "height": 20}, "precision": 2})]),
    (DALLAS + "\n" + xml_call("get_current_weather", city="Orlando", state="FL", unit="fahrenheit"), None,
     [("get_current_weather", {"city": "Dallas", "state": "TX", "unit": "fahrenheit"}),
      ("get_current_weather", {"city": "Orlando", "state": "FL", "unit": "fahrenheit"})]),
    # no <tool_call> wrapper (vLLM's fallback case), a string that looks like a number stays a string
    ("<function=get_current_weather>\n<parameter=city>\n1984\n</parameter>\n<parameter=state>\nTX\n</parameter>\n"
     "</function>", None, [("get_current_weather", {"city": "1984", "state": "TX"})]),
    ("<tool_call>\n<function=get_time>\n</function>\n</tool_call>", None, [("get_time", {})]),
    # a multi-line string, and the model stopping before </function>
    ("<tool_call>\n<function=calculate_area>\n<parameter=shape>\nline one\nline <two>\n</parameter>\n", None,
     [("calculate_area", {"shape": "line one\nline <two>"})]),
]


@pytest.mark.parametrize("text, content, calls", CASES)
def test_whole_text(text, content, calls):
    result = Parser(TOOLS).extract(text)
    assert result.content == content
    assert [(call.name, json.loads(call.arguments)) for call in result.tool_calls] == calls


@pytest.mark.parametrize("text, content, calls", CASES)
def test_streamed_token_by_token_equals_whole_text(text, content, calls):
    assert_stream_equals_whole(Parser, qwen3_tokenizer(), text, TOOLS)


def test_arguments_are_json_dumps_of_the_typed_values():
    arguments = Parser(TOOLS).extract(CASES[3][0]).tool_calls[0].arguments
    assert arguments == json.dumps({"shape": "rectangle", "dimensions": {"width": 10, "height": 20}, "precision": 2})


@pytest.mark.parametrize("value, schema, expected", [
    ("42", {"type": "integer"}, 42), ("3.14", {"type": "float"}, 3.14), ("3.14", {"type": "number"}, 3.14),
    ("true", {"type": "boolean"}, True), ("hello world", {"type": "string"}, "hello world"),
    ('{"key": "value"}', {"type": "object"}, {"key": "value"}), ("{'key': 'v'}", {"type": "object"}, {"key": "v"}),
    ("5", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, 5), ("null", {"anyOf": [{"type": "string"},
                                                                                        {"type": "null"}]}, None),
    ('["a"]', {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]}, ["a"]),
    ("7", {"type": ["integer", "null"]}, 7), ("not a number", {"type": "integer"}, "not a number"),
    ("12", None, 12), ("plain", None, "plain"),
])
def test_values_typed_by_schema(value, schema, expected):
    assert convert_parameter(value, schema) == expected


def test_qwen3_coder_is_the_same_parser():
    assert get_tool_parser("qwen3_coder") is Parser
