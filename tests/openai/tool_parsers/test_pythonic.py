"""pythonic on the cases of vLLM's tests/tool_parsers/test_pythonic_tool_parser.py, whole and streamed token by
token with Llama 3's tokenizer."""
import json

import pytest

from serval.openai.tool_parsers import get_tool_parser
from tests.openai.tool_parsers.streaming import assert_stream_equals_whole, llama3_tokenizer

Parser = get_tool_parser("pythonic")
SIMPLE = ("get_weather(city='San Francisco', metric='celsius')",
          ("get_weather", '{"city": "San Francisco", "metric": "celsius"}'))
MORE_TYPES = ("register_user(name='John Doe', age=37, address={'city': 'San Francisco', 'state': 'CA'}, role=None, "
              "passed_test=True, aliases=['John', 'Johnny'])",
              ("register_user", '{"name": "John Doe", "age": 37, "address": {"city": "San Francisco", "state": "CA"}, '
                                '"role": null, "passed_test": true, "aliases": ["John", "Johnny"]}'))
PARAMETERLESS = ("get_weather()", ("get_weather", "{}"))
EMPTY_DICT = ("do_something_cool(additional_data={})", ("do_something_cool", '{"additional_data": {}}'))
EMPTY_LIST = ("do_something_cool(steps=[])", ("do_something_cool", '{"steps": []}'))
ESCAPED = (r"""get_weather(city='Martha\'s Vineyard', metric='\"cool units\"')""",
           ("get_weather", '{"city": "Martha\'s Vineyard", "metric": "\\"cool units\\""}'))

CASES = [  # model output, content, [(name, exact arguments)]
    ("How can I help you today?", "How can I help you today?", []),
    *[(f"[{source}]", None, [call]) for source, call in (SIMPLE, MORE_TYPES, PARAMETERLESS, EMPTY_DICT, EMPTY_LIST,
                                                         ESCAPED)],
    (f"[{SIMPLE[0]}, {MORE_TYPES[0]}]", None, [SIMPLE[1], MORE_TYPES[1]]),
    # one call that cannot be JSON (bytes, inf) is dropped, its siblings kept
    (f"[bad(x=b'z'), {SIMPLE[0]}]", None, [SIMPLE[1]]),
    (f"[calc(x=1e999), {SIMPLE[0]}]", None, [SIMPLE[1]]),
    ("[f(a='x 'y' 'z), g(b='p 'q' 'r)]", "[f(a='x 'y' 'z), g(b='p 'q' 'r)]", []),
    ("[1, 2, 3] are numbers", "[1, 2, 3] are numbers", []),
    ("<|python_start|>[get_weather(city=\"Paris\")]<|python_end|>", None, [("get_weather", '{"city": "Paris"}')]),
    (f"[{SIMPLE[0]}]\nIt is sunny.", "\nIt is sunny.", [SIMPLE[1]]),
    # SGLang's test_pythonic_detector cases
    ('[get_weather(city="Tokyo"), search(query="restaurants")]', None,
     [("get_weather", '{"city": "Tokyo"}'), ("search", '{"query": "restaurants"}')]),
    ('[get_weather(city="London", unit="celsius")]', None, [("get_weather", '{"city": "London", "unit": "celsius"}')]),
]


@pytest.mark.parametrize("text, content, calls", CASES)
def test_whole_text(text, content, calls):
    result = Parser().extract(text)
    assert result.content == content
    assert [(call.name, call.arguments) for call in result.tool_calls] == calls


@pytest.mark.parametrize("text, content, calls", CASES)
def test_streamed_token_by_token_equals_whole_text(text, content, calls):
    assert_stream_equals_whole(Parser, llama3_tokenizer(), text)


def test_large_steps():
    parser = Parser()
    deltas = [parser.feed(text) for text in ["[get_weather(city='San", " Francisco', metric='celsius'), "
                                             "get_weather(), do_something_cool(steps=[])]"]] + [parser.finish()]
    names = [call.function.name for delta in deltas for call in delta.tool_calls if call.id]
    assert names == ["get_weather", "get_weather", "do_something_cool"]
    assert not "".join(delta.content for delta in deltas)


def test_never_evaluates():
    result = Parser().extract("[f(a=__import__('os').system('echo pwned'))]")
    assert result.tool_calls == []
    assert json.loads(Parser().extract("[f(a=(1, 2))]").tool_calls[0].arguments) == {"a": [1, 2]}
