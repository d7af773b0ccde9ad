"""deepseek_v3 as vLLM's tests/reasoning/test_deepseekv3_reasoning_parser.py has it: R1's reading when
`thinking` (or `enable_thinking`) is true in chat_template_kwargs, all content otherwise, the default (V3.1's
template thinks only when asked). Then a thought followed by a V3.1 calls block, through the chat output parser."""
import pytest

from serval.openai.reasoning import get_reasoning_parser
from serval.openai.tool_parsers.chat_output import chat_output_parser
from serval.openai.tool_parsers.deepseek import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP
from tests.openai.reasoning.test_reasoning_parsers import COMMON
from tests.openai.tool_parsers.streaming import deepseek_tokenizer, qwen3_tokenizer, token_deltas

Parser = get_reasoning_parser("deepseek_v3")
ON = [{"thinking": True}, {"enable_thinking": True}]
OFF = [None, {}, {"thinking": False}, {"enable_thinking": False}]


@pytest.mark.parametrize("kwargs", ON)
@pytest.mark.parametrize("output, reasoning, content", COMMON)
def test_thinking_on_reads_as_r1(kwargs, output, reasoning, content):
    result = Parser(kwargs).extract(output)
    assert (result.reasoning, result.content) == (reasoning, content)
    r1 = get_reasoning_parser("deepseek_r1")().extract(output)
    assert (result.reasoning, result.content) == (r1.reasoning, r1.content)
    parser = Parser(kwargs)
    deltas = [parser.feed(text) for text in token_deltas(qwen3_tokenizer(), output)] + [parser.finish()]
    assert "".join(delta.reasoning for delta in deltas) == (reasoning or "")
    assert "".join(delta.content for delta in deltas) == (content or "")


@pytest.mark.parametrize("kwargs", OFF)
@pytest.mark.parametrize("output", [case[0] for case in COMMON])
def test_thinking_off_is_all_content(kwargs, output):
    result = Parser(kwargs).extract(output)
    assert (result.reasoning, result.content) == (None, output)


def test_the_switch_is_the_parsers_own():
    """The server asks the parser whether a think section comes (for the grammar's think prefix)."""
    assert [Parser.thinking_enabled(kwargs) for kwargs in ON + OFF] == [True, True, False, False, False, False]
    assert get_reasoning_parser("deepseek_r1").thinking_enabled(None)
    assert not get_reasoning_parser("qwen3").thinking_enabled({"enable_thinking": False})


def test_thought_then_v31_calls():
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]
    output = f"Time to call.</think>Checking.{CALLS_BEGIN}{CALL_BEGIN}now{SEP}{{}}{CALL_END}{CALLS_END}"
    parser = chat_output_parser("deepseek_v31", "deepseek_v3", tools, "auto", True, {"thinking": True})
    deltas = [parser.feed(text) for text in token_deltas(deepseek_tokenizer(), output)] + [parser.finish()]
    assert "".join(delta.reasoning for delta in deltas) == "Time to call."
    assert "".join(delta.content for delta in deltas) == "Checking."
    result = parser.result()
    assert (result.reasoning, result.content) == ("Time to call.", "Checking.")
    assert [(call.name, call.arguments) for call in result.tool_calls] == [("now", "{}")]
    assert result.finish_reason("stop") == "tool_calls"
