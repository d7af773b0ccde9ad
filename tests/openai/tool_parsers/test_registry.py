"""The registry by vLLM's names, and what every parser shares."""
import pytest

from serval.openai.errors import InvalidArgument
from serval.openai.tool_parsers import TOOL_PARSERS, get_tool_parser


def test_vllm_names():
    assert {"hermes", "qwen3_xml", "qwen3_coder", "llama3_json", "mistral", "pythonic", "deepseek_v3",
            "deepseek_v31", "openai", "phi4_mini_json"} <= set(TOOL_PARSERS)


def test_unknown_name_is_refused_with_the_valid_ones():
    with pytest.raises(InvalidArgument) as error:
        get_tool_parser("hermes2")
    assert error.value.param == "tool_call_parser"
    assert all(name in str(error.value) for name in TOOL_PARSERS)


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_plain_text_is_content_whole_and_streamed(name):
    text = "Plain answer, with [brackets], {braces} and <tags>.\n\nSecond paragraph.\n"
    assert get_tool_parser(name)().extract(text).content == text
    parser = get_tool_parser(name)()
    streamed = "".join(parser.feed(char).content for char in text) + parser.finish().content
    assert streamed == text
    assert get_tool_parser(name)().extract("").content is None


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_parsers_are_independent(name):
    first, second = get_tool_parser(name)(), get_tool_parser(name)()
    said = first.feed("Hello").content
    assert second.finish().content == "" and said + first.finish().content == "Hello"
