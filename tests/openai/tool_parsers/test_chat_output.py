"""The per-choice chain the chat handler runs: reasoning, then tool calls, streamed token by token with Qwen3's
tokenizer and equal to the whole-text result."""
import pytest

from serval.openai.errors import InvalidArgument
from serval.openai.tool_parsers.chat_output import chat_output_parser
from tests.openai.tool_parsers.streaming import qwen3_tokenizer, token_deltas

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
OUTPUT = ('<think>\nThe user wants weather. {"not": "a call"}\n</think>\n\nLet me check.\n<tool_call>\n'
          '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')


def parse_streamed(parser, text):
    deltas = [parser.feed(piece) for piece in token_deltas(qwen3_tokenizer(), text)] + [parser.finish()]
    arguments = "".join(call.function.arguments or "" for delta in deltas for call in delta.tool_calls)
    names = [call.function.name for delta in deltas for call in delta.tool_calls if call.id]
    return ("".join(d.reasoning for d in deltas), "".join(d.content for d in deltas), names, arguments)


def test_reasoning_then_content_then_calls():
    parser = chat_output_parser("hermes", "qwen3", TOOLS, "auto", enable_auto_tool_choice=True)
    reasoning, content, names, arguments = parse_streamed(parser, OUTPUT)
    whole = parser.result()
    assert reasoning == whole.reasoning == '\nThe user wants weather. {"not": "a call"}\n'
    assert content == whole.content == "\n\nLet me check."
    assert names == ["get_weather"] and arguments == whole.tool_calls[0].arguments == '{"city": "Paris"}'
    assert whole.finish_reason("stop") == "tool_calls" and whole.finish_reason("length") == "length"


def test_tool_choice_none_parses_no_calls():
    parser = chat_output_parser("hermes", None, TOOLS, "none")
    _, content, names, _ = parse_streamed(parser, OUTPUT)
    assert names == [] and content == OUTPUT == parser.result().content
    assert parser.result().finish_reason("stop") == "stop"


def test_thinking_disabled():
    parser = chat_output_parser(None, "qwen3", [], "none", chat_template_kwargs={"enable_thinking": False})
    reasoning, content, _, _ = parse_streamed(parser, '{"answer": 1}')
    assert reasoning == "" and content == '{"answer": 1}' and parser.result().reasoning is None


@pytest.mark.parametrize("parser_name, choice, auto", [(None, "auto", True), ("hermes", "auto", False),
                                                       (None, "required", True)])
def test_tool_choice_needs_the_server_flags(parser_name, choice, auto):
    with pytest.raises(InvalidArgument) as error:
        chat_output_parser(parser_name, None, TOOLS, choice, enable_auto_tool_choice=auto)
    assert error.value.param == "tool_choice"
