"""Speculative decoding with repetition/frequency/presence penalties, min_tokens, bad words and allowed_token_ids:
verify row j is processed as the plain sampler would process the request had its drafts before j been generated.
Against the plain sampler fed those tokens (a direct computation), and greedy outputs against the engine without
speculation."""
import random

import pytest
import torch

from serval import SamplingParams
from serval.engine import sampler
from serval.engine.request import Request
from serval.engine.spec_decode.rejection_sampler import verify
from tests.engine.spec_decode.test_spec_engine import NGRAM, repetitive_prompts
from tests.engine.test_engine import pressured_llm

VOCAB = 12
EOS = 2
PENALTIES = [dict(repetition_penalty=1.8), dict(frequency_penalty=1.5), dict(presence_penalty=2.0),
             dict(repetition_penalty=1.3, frequency_penalty=0.7, presence_penalty=0.5), dict(min_tokens=4),
             dict(min_tokens=3, stop_token_ids=[7], frequency_penalty=0.4),
             # Drafts repeat the favourite token: [7, 7] and [2, 2] are rejected at their second token.
             dict(bad_words_token_ids=[[4], [7, 7], [2, 2], [9, 7, 7]]),
             dict(allowed_token_ids=[2, 3, 5, 7, 8, 9], bad_words_token_ids=[[5, 5]])]
# Mild enough that a random model still repeats its prompt now and then, so prompt lookup's drafts are accepted.
MILD_PENALTIES = [dict(repetition_penalty=1.1), dict(frequency_penalty=0.2), dict(presence_penalty=0.3),
                  dict(repetition_penalty=1.05, frequency_penalty=0.1, presence_penalty=0.1), dict(min_tokens=6),
                  dict(min_tokens=5, stop_token_ids=[7], frequency_penalty=0.1)]


def decoding(output: list[int], **params) -> Request:
    request = Request("r", [1, 3, 4, 3], SamplingParams(temperature=0.0, max_tokens=50, **params), EOS, 128)
    for token in output:
        request.append_output_token(token)
    return request


def plain_greedy(row_logits: torch.Tensor, output: list[int], params: dict) -> int:
    """The plain sampler's token for one row, the request's output being `output`."""
    return sampler.sample(row_logits.unsqueeze(0).clone(), [decoding(output, **params)]).sampled_token_ids[0]


@pytest.mark.parametrize("params", PENALTIES, ids=[",".join(p) for p in PENALTIES])
def test_each_row_is_processed_with_the_drafts_before_it_as_output(params):
    """Drafts that repeat the likeliest tokens, EOS and the stop token among them: each verify step emits what the
    plain sampler emits one token at a time, fed the accepted drafts."""
    rng = random.Random(0)
    generator = torch.Generator().manual_seed(1)
    num_accepted = 0
    for _ in range(60):
        output = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(0, 4))]
        num_drafts = rng.randrange(1, 5)
        logits = torch.randn(num_drafts + 1, VOCAB, generator=generator) * 2
        # Rows that like EOS, the stop token or a token already out: the processing decides.
        favourite = rng.choice([EOS, 7, *(output or [5])])
        logits[:, favourite] += 3.0
        drafts = [favourite if rng.random() < 0.5 else int(logits[j].argmax()) for j in range(num_drafts)]
        (result,) = verify(logits.clone(), [decoding(output, **params)], [drafts])
        expected = []
        for j in range(num_drafts + 1):
            expected.append(plain_greedy(logits[j], output + expected, params))
            if j == num_drafts or expected[-1] != drafts[j]:
                break
        assert result.token_ids == expected, (output, drafts)
        num_accepted += result.num_accepted
    assert num_accepted > 20  # the drafts were often what the processed rows pick


def test_greedy_with_bad_words_equals_the_engine_without_speculation(tiny_models):
    """Bad words from each prompt's free greedy run (a two-token word, a one-token word): with prompt lookup's drafts
    the tokens are the plain engine's, and neither word appears."""
    path, hf_model = tiny_models("llama")
    requests = [{"prompt_token_ids": p} for p in repetitive_prompts(hf_model.config.vocab_size)]
    plain = pressured_llm(path, True)
    free = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    unconstrained = [o.outputs[0].token_ids for o in plain.generate(requests, free, use_tqdm=False)]
    params = [free.clone(bad_words_token_ids=[tokens[5:7], tokens[10:11]]) for tokens in unconstrained]
    expected = plain.generate(requests, params, use_tqdm=False)
    spec = pressured_llm(path, True, speculative_config=NGRAM)
    got = spec.generate(requests, params, use_tqdm=False)
    speculated = 0
    for want, have, tokens in zip(expected, got, unconstrained, strict=True):
        assert have.outputs[0].token_ids == want.outputs[0].token_ids
        output = have.outputs[0].token_ids
        assert tokens[10] not in output
        assert all(output[i:i + 2] != tokens[5:7] for i in range(len(output) - 1))
        length = have.metrics.spec_decode_acceptance_length
        speculated += length is not None and length > 1.0
    assert speculated >= 3, "requests with bad words were meant to accept drafts"
    spec.engine.kv_cache.check_invariants([])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_with_penalties_equals_the_engine_without_speculation(tiny_models, arch):
    path, hf_model = tiny_models(arch)
    prompts = repetitive_prompts(hf_model.config.vocab_size)
    params = [SamplingParams(temperature=0.0, max_tokens=16 - i % 3, ignore_eos=i % 2 == 0,
                             logit_bias={EOS: 4.0} if i % 2 else None, **MILD_PENALTIES[i % len(MILD_PENALTIES)])
              for i in range(len(prompts))]
    requests = [{"prompt_token_ids": p} for p in prompts]
    plain = pressured_llm(path, True)
    expected = plain.generate(requests, params, use_tqdm=False)
    spec = pressured_llm(path, True, speculative_config=NGRAM)
    got = spec.generate(requests, params, use_tqdm=False)
    speculated = 0
    for want, have in zip(expected, got, strict=True):
        assert have.outputs[0].token_ids == want.outputs[0].token_ids
        assert have.outputs[0].finish_reason == want.outputs[0].finish_reason
        length = have.metrics.spec_decode_acceptance_length
        speculated += length is not None and length > 1.0
    assert speculated >= 3, "penalized requests were meant to accept drafts"
    spec.engine.kv_cache.check_invariants([])
