"""A property of every parser: however the text is cut into deltas, the stream is the whole-text parse (content,
names, argument strings), so a client sees the same answer streamed or not."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serval.openai.tool_parsers import get_tool_parser
from tests.openai.tool_parsers import (test_deepseek, test_harmony, test_hermes, test_llama3_json, test_mistral,
                                      test_phi4_mini, test_pythonic, test_qwen3_xml)
from tests.openai.tool_parsers.streaming import stream

TEXTS = {
    "hermes": [case[0] for case in test_hermes.CASES],
    "llama3_json": [case[0] for case in test_llama3_json.CASES],
    "mistral": [case[0] for case in test_mistral.CASES],
    "phi4_mini_json": [case[0] for case in test_phi4_mini.CASES],
    "pythonic": [case[0] for case in test_pythonic.CASES],
    "qwen3_xml": [case[0] for case in test_qwen3_xml.CASES],
    **test_deepseek.TEXTS,
    "openai": [case[0] for case in test_harmony.CASES],
}


def cut(text: str, points: list[int]) -> list[str]:
    bounds = [0, *sorted({point % (len(text) + 1) for point in points}), len(text)]
    return [text[start:end] for start, end in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("name", sorted(TEXTS))
@settings(max_examples=150, derandomize=True, deadline=None)
@given(data=st.data())
def test_any_chunking_equals_whole_text(name, data):
    text = data.draw(st.sampled_from(TEXTS[name]))
    deltas = cut(text, data.draw(st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)))
    tools = test_qwen3_xml.TOOLS if name == "qwen3_xml" else None
    whole = get_tool_parser(name)(tools).extract(text)
    streamed = stream(get_tool_parser(name)(tools), deltas)
    assert streamed.content == (whole.content or "")
    assert streamed.names == [call.name for call in whole.tool_calls]
    assert streamed.arguments == [call.arguments for call in whole.tool_calls]
