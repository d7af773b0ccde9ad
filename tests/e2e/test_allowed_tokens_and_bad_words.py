"""vLLM's allowed_token_ids and bad_words over HTTP, with the official `openai` client's extra_body, against a real
`serval serve` of the tiny model (SmolLM2's tokenizer), in-process and with the engine core in its own process
(the fields cross the process boundary on SamplingParams).

The constraints are derived from an unconstrained greedy run of the same prompt, so that each one changes what greedy
decoding would have produced; the generated ids come back with vLLM's return_token_ids. Bad values are 400s with
OpenAI's error body naming the field."""
from __future__ import annotations

import json

import openai
import pytest
import transformers

from serval.engine.input_processor import bad_words_token_ids
from tests.e2e.server import RemoteServer, tiny_model_dir

MODEL = "tiny"
PROMPT = "The serval is a wild cat native to Africa. It"
MAX_TOKENS = 16
GREEDY = {"temperature": 0.0, "max_tokens": MAX_TOKENS}
EXTRA = {"ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module", params=["in-process", "engine-process"])
def server(request):
    args = ["--model", tiny_model_dir(), "--max-model-len", "512", "--served-model-name", MODEL]
    remote = RemoteServer(args + (["--engine-process"] if request.param == "engine-process" else []))
    yield remote
    remote.close()


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(tiny_model_dir())


def vocab_size() -> int:
    with open(f"{tiny_model_dir()}/config.json") as f:
        return json.load(f)["vocab_size"]


def completion_ids(client, **extra) -> list[int]:
    choice = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY, extra_body={**EXTRA, **extra}).choices[0]
    assert choice.finish_reason == "length"
    return choice.model_extra["token_ids"]


def test_greedy_with_allowed_token_ids_yields_only_those(server):
    client = server.client()
    free = completion_ids(client)
    # Tokens greedy decoding did not pick, and one it picked later, so the constraint decides every step.
    allowed = [id for id in range(1000, 1040) if id not in free] + [free[-1]]
    constrained = completion_ids(client, allowed_token_ids=allowed)
    assert len(constrained) == MAX_TOKENS and set(constrained) <= set(allowed)
    assert constrained != free
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], **GREEDY,
                                          extra_body={**EXTRA, "allowed_token_ids": allowed})
    assert set(chat.choices[0].model_extra["token_ids"]) <= set(allowed)
    stream = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY, stream=True,
                                       extra_body={**EXTRA, "allowed_token_ids": allowed})
    assert [id for chunk in stream for id in chunk.choices[0].model_extra["token_ids"]] == constrained


def first_word(tokenizer, ids: list[int], length: int) -> tuple[str, list[int]]:
    """A word spelled by `length` consecutive generated tokens, as the engine tokenizes bad words (so banning it bans
    those tokens there): the word and its tokens. vLLM's rule keeps a word's spelling after a space only where it
    has as many tokens as the word alone, and SmolLM2's tokenizer often spells " Word" in one token but "Word" in
    several: such a word is banned at the start of the text only, and is not one to test with."""
    for start in range(len(ids) - length + 1):
        tokens = ids[start:start + length]
        word = tokenizer.decode(tokens)
        if word.strip() and tokens in bad_words_token_ids(tokenizer, [word]):
            return word, tokens
    raise AssertionError(f"no {length}-token word in {ids}")


def occurs(tokens: list[int], ids: list[int]) -> bool:
    return any(ids[i:i + len(tokens)] == tokens for i in range(len(ids) - len(tokens) + 1))


@pytest.mark.parametrize("length", [1, 2], ids=["one-token-word", "two-token-word"])
def test_a_bad_word_greedy_decoding_would_produce_never_appears(server, tokenizer, length):
    client = server.client()
    free = completion_ids(client)
    word, tokens = first_word(tokenizer, free, length)
    constrained = completion_ids(client, bad_words=[word])
    assert not occurs(tokens, constrained), (word, tokens, constrained)
    assert constrained != free
    # Its other spelling (after a space, or without one) is banned too, wherever vLLM's rule keeps it.
    assert not any(occurs(spelling, constrained) for spelling in bad_words_token_ids(tokenizer, [word]))
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], **GREEDY,
                                          extra_body={**EXTRA, "bad_words": [word, "unrelated"]})
    assert not occurs(tokens, chat.choices[0].model_extra["token_ids"])


@pytest.mark.parametrize("extra, param", [
    ({"allowed_token_ids": [5, "7"]}, "allowed_token_ids"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
    ({"bad_words": ["fine", 5]}, "bad_words"),
    ({"bad_words": "cat"}, "bad_words"),
    ({"bad_words": ["fine", "   "]}, "bad_words"),
], ids=["not-an-id", "empty", "negative", "not-a-string", "not-a-list", "blank"])
def test_bad_values_are_400_naming_the_field(server, extra, param):
    with pytest.raises(openai.BadRequestError) as error:
        server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body=extra)
    assert error.value.status_code == 400 and error.value.body["param"].split(".")[0] == param


def test_allowed_ids_past_the_vocabulary_are_400_and_the_server_goes_on(server):
    client = server.client()
    for body in ({"allowed_token_ids": [5, vocab_size()]}, {"allowed_token_ids": [10**9]}):
        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body=body)
        assert error.value.body["param"] == "allowed_token_ids"
        assert str(vocab_size()) in error.value.body["message"]
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           stream=True, extra_body=body)
        assert error.value.body["param"] == "allowed_token_ids"
    assert len(completion_ids(client)) == MAX_TOKENS
