"""tool_choice "required" / named function grammars in DeepSeek's formats, checked with llguidance on a 128k BPE
holding DeepSeek's markers as special tokens (so the grammar names them by token id, as on the real vocabulary):
random token walks end in calls that our deepseek parsers read back, with arguments valid against each tool's
schema (jsonschema), and the matcher refuses text outside the format."""
import json
import random

import llguidance
import llguidance.hf
import pytest

from serval.openai.tool_grammar import tool_call_grammar
from serval.openai.tool_parsers.deepseek import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, MARKERS, SEP
from tests.openai.test_tool_grammar import TOOLS, assert_walks_give_every_tool, parsed_calls, random_walk
from tests.openai.tool_parsers.streaming import deepseek_tokenizer

FORMATS = ["deepseek_v3", "deepseek_v31"]
GOOD = {  # one call to get_weather, as each format writes it
    "deepseek_v3": f'{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_weather\n```json\n{{"city": "Paris"}}\n```{CALL_END}'
                   f"{CALLS_END}",
    "deepseek_v31": f'{CALLS_BEGIN}{CALL_BEGIN}get_weather{SEP}{{"city": "Paris"}}{CALL_END}{CALLS_END}',
}


@pytest.fixture(scope="module")
def ll_tokenizer():
    return llguidance.hf.from_tokenizer(deepseek_tokenizer())


def grammar_for(parser_name: str, tool_choice="required", parallel: bool = True) -> str:
    return tool_call_grammar(parser_name, TOOLS, tool_choice, parallel, deepseek_tokenizer().get_added_vocab())


def matcher(ll_tokenizer, grammar: str) -> llguidance.LLMatcher:
    result = llguidance.LLMatcher(ll_tokenizer, llguidance.grammar_from("lark", grammar), log_level=0)
    assert not result.is_error(), result.get_error()
    return result


def encode(text: str) -> list[int]:
    return deepseek_tokenizer().encode(text, add_special_tokens=False)


@pytest.mark.parametrize("parser_name", FORMATS)
def test_required_gives_valid_calls(ll_tokenizer, parser_name):
    assert_walks_give_every_tool(ll_tokenizer, grammar_for(parser_name), parser_name, 60,
                                 tokenizer=deepseek_tokenizer(), min_finished=50 / 60)


@pytest.mark.parametrize("parser_name", FORMATS)
def test_named_function_and_no_parallel_calls(ll_tokenizer, parser_name):
    rng = random.Random(7)
    grammar = grammar_for(parser_name, {"type": "function", "function": {"name": "book"}}, parallel=False)
    finished = 0
    for _ in range(20):
        text = random_walk(ll_tokenizer, grammar, rng, tokenizer=deepseek_tokenizer())
        if text is not None:
            finished += 1
            assert [call.name for call in parsed_calls(parser_name, text)] == ["book"]
    assert finished >= 15


@pytest.mark.parametrize("parser_name", FORMATS)
def test_markers_are_token_references(parser_name):
    grammar = grammar_for(parser_name)
    added = deepseek_tokenizer().get_added_vocab()
    assert all(f"<[{added[marker]}]>" in grammar for marker in MARKERS)
    assert not any(json.dumps(marker) in grammar for marker in MARKERS)


@pytest.mark.parametrize("parser_name", FORMATS)
def test_matcher_accepts_the_format_and_refuses_the_rest(ll_tokenizer, parser_name):
    good = encode(GOOD[parser_name])
    assert matcher(ll_tokenizer, grammar_for(parser_name)).validate_tokens(good) == len(good)
    other = GOOD["deepseek_v31" if parser_name == "deepseek_v3" else "deepseek_v3"]
    bad = {
        "text first": "Sure! " + GOOD[parser_name],
        "other format": other,
        "wrong type": GOOD[parser_name].replace('"Paris"', "7"),
        "unknown name": GOOD[parser_name].replace("get_weather", "get_wether"),
        "no block": GOOD[parser_name][len(CALLS_BEGIN):],
    }
    for why, text in bad.items():
        tokens = encode(text)
        assert matcher(ll_tokenizer, grammar_for(parser_name)).validate_tokens(tokens) < len(tokens), why
