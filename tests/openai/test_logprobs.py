"""Logprob formatting in the legacy completions shape and the chat shape."""
import math

from serval.openai.logprobs import add_completion_logprobs, chat_logprobs, token_text, top
from serval.openai.protocol import CompletionLogprobs
from serval.outputs import Logprob


class CharTokenizer:
    """Token id i is the character chr(i): enough to see which text a formatter used."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


POSITIONS = [
    {72: Logprob(-0.5, rank=2, decoded_token="H"), 74: Logprob(-0.25, rank=1, decoded_token="J")},
    {105: Logprob(-1.0, rank=1)},  # no decoded text: the tokenizer's is used
]


def test_token_text_prefers_the_engines_decoding_then_the_tokenizer_then_the_id():
    assert token_text(72, POSITIONS[0], CharTokenizer()) == "H"
    assert token_text(105, POSITIONS[1], CharTokenizer()) == "i"
    assert token_text(105, None, None) == "105"


def test_top_orders_by_rank():
    assert [token for token, _ in top(POSITIONS[0], 2)] == [74, 72]
    assert [token for token, _ in top(POSITIONS[0], 1)] == [74]


def test_completion_logprobs_continue_offsets_across_calls():
    target = CompletionLogprobs()
    add_completion_logprobs(target, [72], POSITIONS[:1], 2, CharTokenizer())
    add_completion_logprobs(target, [105, 33], POSITIONS[1:], 1, CharTokenizer())  # the last position unscored
    assert target.tokens == ["H", "i", "!"]
    assert target.text_offset == [0, 1, 2]
    assert target.token_logprobs == [-0.5, -1.0, None]
    assert target.top_logprobs == [{"J": -0.25, "H": -0.5}, {"i": -1.0}, None]
    without_top = CompletionLogprobs()
    add_completion_logprobs(without_top, [72], POSITIONS[:1], 0, CharTokenizer())
    assert without_top.top_logprobs == [None]


def test_chat_logprobs_carry_bytes_and_skip_unscored_positions():
    result = chat_logprobs([72, 105, 33], POSITIONS, 1, CharTokenizer())
    assert [entry.token for entry in result.content] == ["H", "i"]
    first = result.content[0]
    assert math.isclose(first.logprob, -0.5) and first.bytes == [72]
    assert [(alt.token, alt.logprob, alt.bytes) for alt in first.top_logprobs] == [("J", -0.25, [74])]
