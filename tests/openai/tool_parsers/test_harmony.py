"""`openai` (tool calls) and `openai_gptoss` (reasoning) on gpt-oss's harmony output, on the cases of vLLM's
tests/tool_parsers/test_openai_tool_parser.py and the parse_chat_output cases of its harmony utils tests, written
as the model generates them (after the prompt's `<|start|>assistant`). Whole text, then streamed token by token
(harmony_tokenizer: the markers are special tokens) and character by character through the chain the chat handler
runs: the concatenated deltas are the whole-text parse, and no marker leaks."""
import json

import pytest

from serval.openai.reasoning import get_reasoning_parser
from serval.openai.tool_parsers import get_tool_parser
from serval.openai.tool_parsers.chat_output import chat_output_parser
from serval.openai.tool_parsers.harmony_reader import SPECIAL_TOKENS, parse_header
from tests.openai.tool_parsers.streaming import assert_stream_equals_whole, harmony_tokenizer, token_deltas

Parser = get_tool_parser("openai")
TOOLS = [{"type": "function", "function": {"name": "get_current_weather", "parameters": {
    "type": "object", "properties": {"location": {"type": "string"}}}}}]
ANALYSIS = '<|channel|>analysis<|message|>User asks: "What is the weather in Tokyo?" We need to use a tool.<|end|>'
THOUGHT = 'User asks: "What is the weather in Tokyo?" We need to use a tool.'


def call(name, arguments, content_type=" <|constrain|>json"):
    return (f"<|start|>assistant<|channel|>commentary to=functions.{name}{content_type}<|message|>{arguments}"
            "<|call|>")


CASES = [  # model output, reasoning, content, [(name, arguments)]
    # vLLM's openai tool parser cases
    ("<|channel|>final<|message|>This is a test<|return|>", None, "This is a test", []),
    (ANALYSIS + call("get_current_weather", '{"location": "Tokyo"}'), THOUGHT, None,
     [("get_current_weather", '{"location": "Tokyo"}')]),
    (ANALYSIS + call("get_current_weather", '{\n"location": "Tokyo"\n}'), THOUGHT, None,
     [("get_current_weather", '{\n"location": "Tokyo"\n}')]),
    (ANALYSIS + call("get_current_weather", '{"location": "Tokyo"}')
     + call("get_user_location", '{"location": "Tokyo"}') + call("no_content_type", '{"location": "Tokyo"}', "")
     + call("not_json_no_content_type", "foo", "")
     + call("empty_args", "{}") + call("no_args", ""), THOUGHT, None,
     [("get_current_weather", '{"location": "Tokyo"}'), ("get_user_location", '{"location": "Tokyo"}'),
      ("no_content_type", '{"location": "Tokyo"}'), ("not_json_no_content_type", "foo"), ("empty_args", "{}"),
      ("no_args", "")]),
    (ANALYSIS + call("get_current_weather", '{"location": "Tokyo"}')
     + "<|start|>assistant<|channel|>final<|message|>This tool call will get the weather.<|return|>", THOUGHT,
     "This tool call will get the weather.", [("get_current_weather", '{"location": "Tokyo"}')]),
    # vLLM's parse_chat_output cases
    ("<|channel|>final<|message|>I'm in the middle of answering", None, "I'm in the middle of answering", []),
    ("<|channel|>analysis<|message|>I'm in the middle of thinking", "I'm in the middle of thinking", None, []),
    ("<|channel|>analysis<|message|>I'm thinking.<|end|><|start|>assistant<|channel|>final<|message|>I'm in the "
     "middle of answering", "I'm thinking.", "I'm in the middle of answering", []),
    ("<|channel|>final<|message|>The answer is 4.<|end|>", None, "The answer is 4.", []),
    ("<|channel|>commentary<|message|>I need to call some tools.<|end|>", None, "I need to call some tools.", []),
    ("<|channel|>analysis<|message|>I've thought hard about this.<|end|>", "I've thought hard about this.", None, []),
    ("<|channel|>analysis<|message|>I've thought hard about this.<|end|><|start|>assistant<|channel|>final"
     "<|message|>The answer is 4.<|end|>", "I've thought hard about this.", "The answer is 4.", []),
    # several messages of a kind are joined by a newline; a preamble is content, as vLLM streams it
    ("<|channel|>analysis<|message|>one<|end|><|start|>assistant<|channel|>analysis<|message|>two<|end|>"
     "<|start|>assistant<|channel|>commentary<|message|>Checking.<|end|>" + call("f", "{}")
     + "<|start|>assistant<|channel|>final<|message|>Done.<|return|>", "one\ntwo", "Checking.\nDone.",
     [("f", "{}")]),
    # the recipient in the role part, a bare content type; a built-in tool's call is the model's own reasoning
    ("<|channel|>analysis<|message|>a<|end|><|start|>assistant to=functions.lookup<|channel|>commentary json"
     '<|message|>{"q": "x < y"}<|call|>', "a", None, [("lookup", '{"q": "x < y"}')]),
    ('<|channel|>analysis to=python code<|message|>print(1 < 2)<|call|>', "print(1 < 2)", None, []),
    # cut mid-call and mid-header; plain text with no header is content
    ("<|channel|>commentary to=functions.f <|constrain|>json<|message|>{\"a\": [1, ", None, None,
     [("f", '{"a": [1, ')]),
    ("<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>fin", "x", None, []),
    ("Plain <b>text</b> with <| and |> but no header.", None, "Plain <b>text</b> with <| and |> but no header.", []),
]


@pytest.mark.parametrize("output, reasoning, content, calls", CASES)
def test_whole_text(output, reasoning, content, calls):
    tools = Parser(TOOLS).extract(output)
    assert tools.content == content
    assert [(c.name, c.arguments) for c in tools.tool_calls] == calls
    split = get_reasoning_parser("openai_gptoss")().extract(output)
    assert (split.reasoning, split.content) == (reasoning, content)  # calls are the tool parser's


def chained(deltas):
    parser = chat_output_parser("openai", "openai_gptoss", TOOLS, "auto", enable_auto_tool_choice=True)
    out = [parser.feed(text) for text in deltas] + [parser.finish()]
    calls = {}
    for delta in out:
        for item in delta.tool_calls:
            if item.id is not None:
                assert item.index == len(calls)
                calls[item.index] = [item.id, item.function.name, item.function.arguments]
            else:
                calls[item.index][2] += item.function.arguments
    return ("".join(d.reasoning for d in out), "".join(d.content for d in out),
            [tuple(calls[index][1:]) for index in sorted(calls)], parser.result(), [c[0] for c in calls.values()])


@pytest.mark.parametrize("how", ["tokens", "chars"])
@pytest.mark.parametrize("output, reasoning, content, calls", CASES)
def test_streamed_chain_equals_whole_text(how, output, reasoning, content, calls):
    deltas = token_deltas(harmony_tokenizer(), output) if how == "tokens" else list(output)
    streamed_reasoning, streamed_content, streamed_calls, whole, ids = chained(deltas)
    assert (streamed_reasoning or None, streamed_content or None, streamed_calls) == (reasoning, content, calls)
    assert (whole.reasoning, whole.content) == (reasoning, content)
    assert ids == [c.id for c in whole.tool_calls] and len(set(ids)) == len(ids)  # ids stable, one per call
    for text in (streamed_reasoning, streamed_content, *(arguments for _, arguments in streamed_calls)):
        assert not any(marker in text for marker in SPECIAL_TOKENS)
    if calls:
        assert whole.finish_reason("stop") == "tool_calls"


@pytest.mark.parametrize("output", [case[0] for case in CASES])
def test_tool_parser_alone_streams_its_whole_text(output):
    assert_stream_equals_whole(Parser, harmony_tokenizer(), output, TOOLS)


def test_arguments_validate_as_json():
    arguments = Parser(TOOLS).extract(CASES[2][0]).tool_calls[0].arguments
    assert json.loads(arguments) == {"location": "Tokyo"}


def test_reasoning_parser_alone_gives_clean_content():
    """Without tools, the reasoning parser's content goes to the client: final and preambles, no call bodies."""
    parser = chat_output_parser(None, "openai_gptoss", [], "none")
    for text in token_deltas(harmony_tokenizer(), CASES[12][0]):
        parser.feed(text)
    parser.finish()
    assert (parser.result().reasoning, parser.result().content) == ("one\ntwo", "Checking.\nDone.")


def test_markers_are_special_tokens_kept_in_the_text():
    parser = chat_output_parser(None, "openai_gptoss", [], "none")
    assert parser.reads_special_tokens and chat_output_parser("openai", None, TOOLS, "required").reads_special_tokens
    assert not chat_output_parser("hermes", "qwen3", TOOLS, "required").reads_special_tokens


@pytest.mark.parametrize("header, expected", [
    ("<|channel|>analysis", (None, "analysis", None)),
    ("assistant<|channel|>commentary to=functions.get_weather <|constrain|>json",
     ("functions.get_weather", "commentary", "json")),
    ("assistant to=functions.f<|channel|>commentary json", ("functions.f", "commentary", "json")),
    ("assistant<|channel|>final", (None, "final", None)),
])
def test_header(header, expected):
    parsed = parse_header(header)
    assert (parsed.recipient, parsed.channel, parsed.content_type) == expected


def test_turn_ends_are_stop_tokens():
    added = harmony_tokenizer().get_added_vocab()
    parser = chat_output_parser("openai", "openai_gptoss", TOOLS, "auto", enable_auto_tool_choice=True)
    assert parser.stop_token_ids(added, [7]) == [7, added["<|return|>"], added["<|call|>"]]
    assert chat_output_parser("hermes", "qwen3", TOOLS, "required").stop_token_ids(added, None) == []
