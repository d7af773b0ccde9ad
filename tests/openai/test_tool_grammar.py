"""tool_choice "required" / named function grammars, checked with llguidance on Qwen3's real vocabulary: random
token walks through what the matcher allows always end in calls that our own parser reads back and whose arguments
validate against the tool's schema (jsonschema). The reasoning variant thinks freely, then is constrained."""
import json
import random

import jsonschema
import llguidance
import llguidance.hf
import numpy as np
import pytest

from serval.openai.errors import InvalidArgument
from serval.openai.tool_grammar import json_schema_grammar, tool_call_grammar, with_analysis, with_reasoning
from serval.openai.tool_parsers import get_tool_parser
from serval.openai.reasoning import get_reasoning_parser
from tests.openai.tool_parsers.streaming import harmony_tokenizer, magistral_tokenizer, qwen3_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"],
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"type": "string", "enum": ["c", "f"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
BOOK = {"type": "function", "function": {"name": "book", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["guests", "vip", "tags"],
    "properties": {"guests": {"type": "integer", "minimum": 1, "maximum": 9}, "vip": {"type": "boolean"},
                   "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 2},
                   "note": {"type": ["string", "null"], "maxLength": 6}}}}}
NOW = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, BOOK, NOW]
SCHEMAS = {tool["function"]["name"]: tool["function"].get("parameters") or {"type": "object"} for tool in TOOLS}
MAX_STEPS = 400


@pytest.fixture(scope="module")
def ll_tokenizer():
    return llguidance.hf.from_tokenizer(qwen3_tokenizer())


def allowed_tokens(matcher: llguidance.LLMatcher, vocab_size: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    return np.flatnonzero(bits[:vocab_size])


def random_walk(ll_tokenizer, grammar: str, rng: random.Random, forced: dict[int, int] | None = None,
                tokenizer=None) -> str | None:
    """Tokens chosen uniformly among those the matcher allows until it ends (EOS chosen, or stopped); the text
    (decoded by `tokenizer`, Qwen3's unless given), or None when the walk ran past MAX_STEPS. `forced` maps a step
    to the token taken there."""
    matcher = llguidance.LLMatcher(ll_tokenizer, llguidance.grammar_from("lark", grammar), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    tokens = []
    for step in range(MAX_STEPS):
        if matcher.is_stopped():
            break
        token = (forced or {}).get(step)
        if token is None:
            token = int(rng.choice(allowed_tokens(matcher, ll_tokenizer.vocab_size)))
        if token == ll_tokenizer.eos_token:
            assert matcher.is_accepting()
            break
        assert matcher.consume_token(token), matcher.get_error()
        tokens.append(token)
    else:
        return None
    return (tokenizer or qwen3_tokenizer()).decode(tokens)


def parsed_calls(parser_name: str, text: str):
    result = get_tool_parser(parser_name)(TOOLS).extract(text)
    assert result.content is None, f"text outside the calls: {result.content!r}"
    for call in result.tool_calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    return result.tool_calls


@pytest.mark.parametrize("parser_name, samples", [("hermes", 200), ("qwen3_xml", 60), ("llama3_json", 40),
                                                  ("mistral", 40), ("phi4_mini_json", 40)])
def test_required_gives_valid_calls(ll_tokenizer, parser_name, samples):
    grammar = tool_call_grammar(parser_name, TOOLS, "required", True, qwen3_tokenizer().get_added_vocab())
    assert_walks_give_every_tool(ll_tokenizer, grammar, parser_name, samples)


def assert_walks_give_every_tool(ll_tokenizer, grammar: str, parser_name: str, samples: int, tokenizer=None,
                                 min_finished: float = 0.9) -> None:
    """Random walks through a required-calls grammar: nearly all finish, each parses into valid calls, every tool
    is reachable and parallel calls happen."""
    rng = random.Random(1234)
    names, counts, finished = set(), set(), 0
    for _ in range(samples):
        text = random_walk(ll_tokenizer, grammar, rng, tokenizer=tokenizer)
        if text is None:
            continue
        finished += 1
        calls = parsed_calls(parser_name, text)
        assert calls, text
        names |= {call.name for call in calls}
        counts.add(len(calls))
    assert finished >= samples * min_finished
    assert names == {"get_weather", "book", "now"}  # every tool is reachable
    assert max(counts) > 1  # parallel calls happen


@pytest.mark.parametrize("parser_name", ["hermes", "qwen3_xml"])
def test_named_function_and_no_parallel_calls(ll_tokenizer, parser_name):
    rng = random.Random(7)
    grammar = tool_call_grammar(parser_name, TOOLS, {"type": "function", "function": {"name": "book"}}, False,
                                qwen3_tokenizer().get_added_vocab())
    for _ in range(40):
        text = random_walk(ll_tokenizer, grammar, rng)
        if text is not None:
            assert [call.name for call in parsed_calls(parser_name, text)] == ["book"]


def test_reasoning_then_calls(ll_tokenizer):
    """Free thought (even JSON-looking), then `</think>`, then the constraint; the reasoning parser splits it so
    the calls are in content, none in the reasoning."""
    tokenizer = qwen3_tokenizer()
    added = tokenizer.get_added_vocab()
    grammar = with_reasoning(tool_call_grammar("hermes", TOOLS, "required", True, added), added)
    thought = tokenizer.encode('<think>\nMaybe {"name": "now"}?\n', add_special_tokens=False)
    forced = dict(enumerate(thought + [added["</think>"]]))
    rng = random.Random(3)
    for _ in range(20):
        text = random_walk(ll_tokenizer, grammar, rng, forced)
        if text is None:
            continue
        split = get_reasoning_parser("qwen3")().extract(text)
        assert split.reasoning == '\nMaybe {"name": "now"}?\n'
        assert parsed_calls("hermes", split.content.lstrip("\n"))


def test_reasoning_then_json_schema(ll_tokenizer):
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["answer"], "additionalProperties": False}
    tokenizer = qwen3_tokenizer()
    added = tokenizer.get_added_vocab()
    grammar = with_reasoning(json_schema_grammar(schema), added)
    # a JSON-looking thought that breaks the schema, then </think> (a random walk would rarely pick it)
    thought = tokenizer.encode('<think>\n{"answer": "no"}', add_special_tokens=False) + [added["</think>"]]
    forced = dict(enumerate(thought))
    rng = random.Random(5)
    for _ in range(20):
        text = random_walk(ll_tokenizer, grammar, rng, forced)
        assert text is not None
        split = get_reasoning_parser("qwen3")().extract(text)
        assert split.reasoning == '\n{"answer": "no"}'
        jsonschema.validate(json.loads(split.content), schema)


def test_matcher_refuses_text_outside_the_format(ll_tokenizer):
    tokenizer = qwen3_tokenizer()
    grammar = tool_call_grammar("hermes", TOOLS, "required", True, tokenizer.get_added_vocab())
    matcher = llguidance.LLMatcher(ll_tokenizer, llguidance.grammar_from("lark", grammar), log_level=0)
    assert matcher.validate_tokens(tokenizer.encode("Sure! <tool_call>", add_special_tokens=False)) == 0
    good = tokenizer.encode('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
                            add_special_tokens=False)
    assert matcher.consume_tokens(good) and matcher.is_accepting()
    wrong_type = tokenizer.encode('<tool_call>\n{"name": "book", "arguments": {"guests": "two"',
                                  add_special_tokens=False)
    fresh = llguidance.LLMatcher(ll_tokenizer, llguidance.grammar_from("lark", grammar), log_level=0)
    assert fresh.validate_tokens(wrong_type) < len(wrong_type)


def test_unsupported_parser_and_unknown_function_are_refused():
    with pytest.raises(InvalidArgument) as error:
        tool_call_grammar("pythonic", TOOLS, "required")
    assert error.value.param == "tool_choice" and "hermes" in str(error.value)
    with pytest.raises(InvalidArgument):
        tool_call_grammar("hermes", TOOLS, {"type": "function", "function": {"name": "missing"}})


def test_grammar_goes_through_the_engines_grammar_path():
    """The engine compiles StructuredOutputsParams(grammar=...) with grammar_from("ebnf"): Lark passes through."""
    grammar = tool_call_grammar("hermes", TOOLS, "required", True, qwen3_tokenizer().get_added_vocab())
    assert llguidance.grammar_from("ebnf", grammar) == llguidance.grammar_from("lark", grammar)


def test_reasoning_with_a_spelled_end_marker(ll_tokenizer):
    """An end marker that is no single token is matched lazily: the thought ends at its first occurrence."""
    grammar = with_reasoning(json_schema_grammar({"type": "integer"}), {}, "<reasoning>", "</reasoning>")
    tokenizer = qwen3_tokenizer()
    for text, valid in [("<reasoning>a < b </div> c</reasoning>\n42", True), ("hi</reasoning>7", True),
                        ("hi</reasoning>x</reasoning>7", False)]:
        matcher = llguidance.LLMatcher(ll_tokenizer, llguidance.grammar_from("lark", grammar), log_level=0)
        tokens = tokenizer.encode(text, add_special_tokens=False)
        assert (matcher.validate_tokens(tokens) == len(tokens)) == valid, text


# ---- gpt-oss's harmony format (`openai` parser): generation starts after the template's `<|start|>assistant`
@pytest.fixture(scope="module")
def harmony_ll_tokenizer():
    return llguidance.hf.from_tokenizer(harmony_tokenizer())


HARMONY_THOUGHT = '<|channel|>analysis<|message|>Maybe {"name": "now"}?<|end|><|start|>assistant'


def harmony_forced(prefix: str) -> dict[int, int]:
    return dict(enumerate(harmony_tokenizer().encode(prefix, add_special_tokens=False)))


@pytest.mark.parametrize("prefix, parallel", [("<|channel|>commentary", True), (HARMONY_THOUGHT, True),
                                              (HARMONY_THOUGHT, False)])
def test_harmony_required_gives_valid_calls(harmony_ll_tokenizer, prefix, parallel):
    """Each walk starts with the analysis message or without it (forced: a uniform walk would think forever), then
    is free: calls the `openai` parser reads back, arguments valid against the schema, reasoning apart."""
    tokenizer, rng = harmony_tokenizer(), random.Random(11)
    grammar = tool_call_grammar("openai", TOOLS, "required", parallel, tokenizer.get_added_vocab())
    names, counts, finished = set(), set(), 0
    for _ in range(60):
        text = random_walk(harmony_ll_tokenizer, grammar, rng, harmony_forced(prefix), tokenizer)
        if text is None:
            continue
        finished += 1
        calls = parsed_calls("openai", text)
        assert calls, text
        names |= {call.name for call in calls}
        counts.add(len(calls))
        reasoning = get_reasoning_parser("openai_gptoss")().extract(text)
        assert reasoning.reasoning == ('Maybe {"name": "now"}?' if prefix == HARMONY_THOUGHT else None)
        assert reasoning.content is None
    assert finished >= 50 and names == {"get_weather", "book", "now"}
    assert counts == {1}  # `<|call|>` ends the turn, parallel_tool_calls or not


def test_harmony_named_function(harmony_ll_tokenizer):
    tokenizer, rng = harmony_tokenizer(), random.Random(5)
    grammar = tool_call_grammar("openai", TOOLS, {"type": "function", "function": {"name": "book"}}, False,
                                tokenizer.get_added_vocab())
    for _ in range(20):
        text = random_walk(harmony_ll_tokenizer, grammar, rng, harmony_forced("<|channel|>commentary"), tokenizer)
        if text is not None:
            assert [call.name for call in parsed_calls("openai", text)] == ["book"]


@pytest.mark.parametrize("text, valid", [
    ('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>', True),
    (HARMONY_THOUGHT + '<|channel|>commentary to=functions.now <|constrain|>json<|message|>{}<|call|>', True),
    ('<|channel|>final<|message|>Sure!<|return|>', False),  # the answer instead of a call
    ('<|channel|>commentary to=functions.missing <|constrain|>json<|message|>{}<|call|>', False),
    ('<|channel|>commentary to=functions.book <|constrain|>json<|message|>{"guests": "two"}<|call|>', False),
    ("Sure!", False),
])
def test_harmony_matcher_accepts_only_the_format(harmony_ll_tokenizer, text, valid):
    tokenizer = harmony_tokenizer()
    grammar = tool_call_grammar("openai", TOOLS, "required", True, tokenizer.get_added_vocab())
    matcher = llguidance.LLMatcher(harmony_ll_tokenizer, llguidance.grammar_from("lark", grammar), log_level=0)
    tokens = tokenizer.encode(text, add_special_tokens=False)
    accepted = matcher.validate_tokens(tokens) == len(tokens)
    assert (accepted and matcher.consume_tokens(tokens) and matcher.is_accepting()) == valid


def test_harmony_reasoning_then_json_schema(harmony_ll_tokenizer):
    """response_format with openai_gptoss: think freely, then the JSON is the final message's body."""
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["answer"], "additionalProperties": False}
    tokenizer, rng = harmony_tokenizer(), random.Random(2)
    reasoning = get_reasoning_parser("openai_gptoss")
    grammar = reasoning.constrain_after_reasoning(json_schema_grammar(schema), tokenizer.get_added_vocab())
    for _ in range(10):
        text = random_walk(harmony_ll_tokenizer, grammar, rng, harmony_forced(HARMONY_THOUGHT), tokenizer)
        split = reasoning().extract(text)
        assert split.reasoning == 'Maybe {"name": "now"}?'
        jsonschema.validate(json.loads(split.content), schema)


def test_harmony_analysis_with_spelled_markers(ll_tokenizer):
    """Markers that are no single token are text: the analysis ends lazily at the first `<|end|>`."""
    grammar = with_analysis(json_schema_grammar({"type": "integer"}), {})
    tokenizer = qwen3_tokenizer()
    for text, valid in [("<|channel|>analysis<|message|>a < b<|end|><|start|>assistant42", True), ("7", True),
                        ("<|channel|>analysis<|message|>a<|end|>x<|end|><|start|>assistant7", False)]:
        matcher = llguidance.LLMatcher(ll_tokenizer, llguidance.grammar_from("lark", grammar), log_level=0)
        tokens = tokenizer.encode(text, add_special_tokens=False)
        assert (matcher.validate_tokens(tokens) == len(tokens)) == valid, text


@pytest.mark.parametrize("think", [True, False])
def test_magistral_thinks_or_not_then_calls(think):
    """Magistral's thought is optional as a whole (no `[THINK]`, no thought): a forced thought ends in `[/THINK]`
    and the calls follow; a walk that starts with the call has nothing before it. `[THINK]`, `[/THINK]` and
    `[TOOL_CALLS]` are single tokens, matched by id."""
    tokenizer = magistral_tokenizer()
    added = tokenizer.get_added_vocab()
    reasoning = get_reasoning_parser("mistral")
    grammar = reasoning.constrain_after_reasoning(tool_call_grammar("mistral", TOOLS, "required", True, added), added)
    thought = [added["[THINK]"], *tokenizer.encode('Maybe {"name": "now"}?', add_special_tokens=False),
               added["[/THINK]"]]
    forced = dict(enumerate(thought if think else [added["[TOOL_CALLS]"]]))
    ll_tokenizer, rng, finished = llguidance.hf.from_tokenizer(tokenizer), random.Random(5), 0
    first = allowed_tokens(llguidance.LLMatcher(ll_tokenizer, llguidance.grammar_from("lark", grammar), log_level=0),
                           ll_tokenizer.vocab_size)
    assert {added["[THINK]"], added["[TOOL_CALLS]"]} <= set(first)
    assert tokenizer.encode("Hello", add_special_tokens=False)[0] not in first  # no thought without [THINK]
    for _ in range(15):
        text = random_walk(ll_tokenizer, grammar, rng, forced, tokenizer=tokenizer)
        if text is None:
            continue
        finished += 1
        split = reasoning().extract(text)
        assert split.reasoning == ('Maybe {"name": "now"}?' if think else None)
        assert parsed_calls("mistral", split.content.lstrip("\n"))
    assert finished
