"""qwen3 and deepseek_r1 on the cases of vLLM's tests/reasoning/test_qwen3_reasoning_parser.py and
test_deepseekr1_reasoning_parser.py, whole and streamed token by token with Qwen3's tokenizer."""
import pytest

from serval.openai.errors import InvalidArgument
from serval.openai.reasoning import REASONING_PARSERS, get_reasoning_parser
from serval.openai.tool_parsers import get_tool_parser
from tests.openai.tool_parsers.streaming import qwen3_tokenizer, token_deltas

TOOL_CALL_BODY = ("<tool_call>\n<function=bash>\n<parameter=command>\ncat /etc/hosts\n</parameter>\n</function>\n"
                  "</tool_call>")

COMMON = [  # output, reasoning, content: the same for both parsers
    ("This is a reasoning section</think>This is the rest", "This is a reasoning section", "This is the rest"),
    ("This is a reasoning section</think>", "This is a reasoning section", None),
    ("<think>This is a reasoning section</think>This is the rest", "This is a reasoning section", "This is the rest"),
    ("This is the rest", "This is the rest", None),  # thinking on, no end: stopped mid-thought
    ("<think>This is a reasoning section</think>", "This is a reasoning section", None),
    ("<think>This is a reasoning\nsection</think>This is the rest\nThat", "This is a reasoning\nsection",
     "This is the rest\nThat"),
    ("<think>This is a reasoning section", "This is a reasoning section", None),
    ("<think>\nOkay, JSON it is.\n</think>\n\n{\"answer\": 42}", "\nOkay, JSON it is.\n", "\n\n{\"answer\": 42}"),
    ("<think></think>Just the answer", None, "Just the answer"),
]
QWEN3_ONLY = [  # a tool call also ends Qwen3's thought
    ("I need to read the file.\n\n" + TOOL_CALL_BODY, "I need to read the file.\n\n", TOOL_CALL_BODY),
    ("<think>I need to read the file.\n\n" + TOOL_CALL_BODY, "I need to read the file.\n\n", TOOL_CALL_BODY),
]
CASES = [("qwen3", *case) for case in COMMON + QWEN3_ONLY] + [("deepseek_r1", *case) for case in COMMON]


@pytest.mark.parametrize("name, output, reasoning, content", CASES)
def test_whole_text(name, output, reasoning, content):
    result = get_reasoning_parser(name)().extract(output)
    assert (result.reasoning, result.content) == (reasoning, content)


@pytest.mark.parametrize("name, output, reasoning, content", CASES)
def test_streamed_token_by_token(name, output, reasoning, content):
    parser = get_reasoning_parser(name)()
    deltas = [parser.feed(text) for text in token_deltas(qwen3_tokenizer(), output)] + [parser.finish()]
    assert "".join(delta.reasoning for delta in deltas) == (reasoning or "")
    assert "".join(delta.content for delta in deltas) == (content or "")


@pytest.mark.parametrize("deltas, reasoning, content", [
    (["<think>This is a reasoning section", "</think>", "This is the rest"], "This is a reasoning section",
     "This is the rest"),
    (["reasoning section", "</think>This is the rest"], "reasoning section", "This is the rest"),
    (["<think>reasoning</think>"], "reasoning", None),
    (["<thi", "nk>reason", "ing</th", "ink>con", "tent"], "reasoning", "content"),
])
def test_multi_token_deltas(deltas, reasoning, content):
    parser = get_reasoning_parser("qwen3")()
    out = [parser.feed(text) for text in deltas] + [parser.finish()]
    assert ("".join(d.reasoning for d in out) or None, "".join(d.content for d in out) or None) == (reasoning, content)


@pytest.mark.parametrize("output", ["This is plain content", "I need to read the file.\n\n" + TOOL_CALL_BODY,
                                    "x </think> y"])
def test_thinking_disabled_is_all_content(output):
    result = get_reasoning_parser("qwen3")({"enable_thinking": False}).extract(output)
    assert (result.reasoning, result.content) == (None, output)


def test_json_answer_lands_in_content_not_reasoning():
    """The regression peers shipped: JSON after the thought must be the answer, never part of the reasoning."""
    result = get_reasoning_parser("deepseek_r1")().extract('Let me think: {"draft": 1}</think>{"answer": 42}')
    assert result.reasoning == 'Let me think: {"draft": 1}' and result.content == '{"answer": 42}'


def test_reasoning_then_tool_calls_chain():
    """The server feeds the reasoning parser's content into the tool parser."""
    output = '<think>\nCall it.\n</think>\n\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    reasoning, tools = get_reasoning_parser("qwen3")(), get_tool_parser("hermes")()
    thought, parsed = "", []
    for text in token_deltas(qwen3_tokenizer(), output):
        delta = reasoning.feed(text)
        thought += delta.reasoning
        parsed.append(tools.feed(delta.content))
    final = reasoning.finish()
    thought += final.reasoning
    parsed += [tools.feed(final.content), tools.finish()]
    content = "".join(delta.content for delta in parsed)
    calls = [call for delta in parsed for call in delta.tool_calls]
    assert thought == "\nCall it.\n" and content == ""
    assert [call.function.name for call in calls if call.id] == ["now"]


def test_unknown_name_is_refused():
    with pytest.raises(InvalidArgument) as error:
        get_reasoning_parser("r1")
    assert error.value.param == "reasoning_parser" and all(name in str(error.value) for name in REASONING_PARSERS)
