"""mistral (Magistral) on the cases of vLLM's tests/reasoning/test_mistral_reasoning_parser.py, read with the rule of
vLLM's current parser (vllm/reasoning/mistral_reasoning_parser.py): without `[THINK]` the output is content (vLLM's
first version, built on DeepSeek-R1's, made it reasoning). Whole text, char by char, and token by token with a
vocabulary that holds `[THINK]` and `[/THINK]` as special tokens, as Magistral's does."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serval.openai.errors import InvalidArgument
from serval.openai.reasoning import get_reasoning_parser
from serval.openai.tool_parsers import get_tool_parser
from tests.openai.tool_parsers.streaming import magistral_tokenizer, token_deltas
from tests.openai.tool_parsers.test_any_chunking import cut

Parser = get_reasoning_parser("mistral")

CASES = [  # output, reasoning, content
    ("[THINK]This is a reasoning section[/THINK]This is the rest", "This is a reasoning section", "This is the rest"),
    ("[THINK]This is a reasoning section[/THINK]", "This is a reasoning section", None),
    ("[THINK]This\nThat[/THINK]This is the rest\nThat", "This\nThat", "This is the rest\nThat"),
    ("[THINK]This is a reasoning section", "This is a reasoning section", None),  # stopped mid-thought
    ("This is content", None, "This is content"),  # no thought opened: all content
    ("", None, None),
    # text before [THINK] is content (a well-prompted model writes none)
    ("\n[THINK]This is a reasoning section[/THINK]\nThis is the rest", "This is a reasoning section",
     "\n\nThis is the rest"),
    # a [/THINK] with no [THINK] before it is dropped, the text around it content
    ("This is a reasoning section[/THINK]This is the rest", None, "This is a reasoning sectionThis is the rest"),
    ("[/THINK]This is the rest", None, "This is the rest"),
    ("[THINK][/THINK]Just the answer", None, "Just the answer"),
    ("[THINK]a[/THINK]b[THINK]c", "a", "b[THINK]c"),  # one thought: a later [THINK] is the answer's text
]


@pytest.mark.parametrize("output, reasoning, content", CASES)
def test_whole_text(output, reasoning, content):
    result = Parser().extract(output)
    assert (result.reasoning, result.content) == (reasoning, content)


@pytest.mark.parametrize("how", ["chars", "tokens"])
@pytest.mark.parametrize("output, reasoning, content", CASES)
def test_streamed(how, output, reasoning, content):
    parser = Parser()
    texts = list(output) if how == "chars" else token_deltas(magistral_tokenizer(), output)
    deltas = [parser.feed(text) for text in texts] + [parser.finish()]
    assert "".join(delta.reasoning for delta in deltas) == (reasoning or "")
    assert "".join(delta.content for delta in deltas) == (content or "")


@settings(max_examples=150, derandomize=True, deadline=None)
@given(data=st.data())
def test_any_chunking_equals_whole_text(data):
    output, reasoning, content = data.draw(st.sampled_from(CASES))
    parser = Parser()
    texts = cut(output, data.draw(st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)))
    deltas = [parser.feed(text) for text in texts] + [parser.finish()]
    assert "".join(delta.reasoning for delta in deltas) == (reasoning or "")
    assert "".join(delta.content for delta in deltas) == (content or "")


def test_unknown_name_lists_mistral():
    with pytest.raises(InvalidArgument) as error:
        get_reasoning_parser("magistral")
    assert "mistral" in str(error.value)


def test_markers_are_special_tokens_and_thinking_switch_does_not_apply():
    assert set(Parser.special_tokens) == {"[THINK]", "[/THINK]"}
    result = Parser({"enable_thinking": False}).extract("[THINK]hmm[/THINK]ok")
    assert (result.reasoning, result.content) == ("hmm", "ok")


def test_reasoning_then_mistral_tool_calls():
    """Magistral thinks, then calls in the v11 form: the tool parser reads the reasoning parser's content."""
    output = '[THINK]The user wants the weather.[/THINK][TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
    reasoning, tools = Parser(), get_tool_parser("mistral")()
    thought, calls = "", []
    for text in token_deltas(magistral_tokenizer(), output) + [None]:
        delta = reasoning.feed(text) if text is not None else reasoning.finish()
        thought += delta.reasoning
        calls += tools.feed(delta.content).tool_calls
    calls += tools.finish().tool_calls
    assert thought == "The user wants the weather."
    assert [call.function.name for call in calls if call.id] == ["get_weather"]
    assert "".join(call.function.arguments or "" for call in calls) == '{"city": "Paris"}'
