"""The engine with speculative decoding against the same engine without it and against transformers, under batching
pressure (chunked prefills, preemption, prefix hits), with mixed batches of requests that speculate and that don't,
randomized aborts (block accounting), and the target's distribution at temperature 1."""
import random
from collections import Counter

import pytest
import torch

from serval import LLM, SamplingParams
from serval.engine.request import Request, RequestStatus
from tests.conftest import build_tiny_model
from tests.engine.spec_decode.stats import SIGNIFICANCE, chi_square_p_value, reference_probs
from tests.engine.test_engine import hf_greedy, make_prompts, pressured_llm

NUM_NEW_TOKENS = 16
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
SUFFIX = {"method": "suffix", "num_speculative_tokens": 4}


def repetitive_prompts(vocab_size: int) -> list[list[int]]:
    """make_prompts' dozen, each with its opening repeated at the end, so prompt lookup has something to find."""
    return [prompt + prompt[:6] for prompt in make_prompts(vocab_size)]


def hf_prompt_lookup(model, prompt: list[int], num_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=num_new, min_new_tokens=num_new,
                             do_sample=False, pad_token_id=0, prompt_lookup_num_tokens=3)
    return out[0, len(prompt):].tolist()


def generate_ids(llm: LLM, prompts, params) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [output.outputs[0].token_ids for output in outputs]


@pytest.mark.parametrize("arch, speculative_config, prefix_caching", [
    ("llama", NGRAM, True), ("llama", NGRAM, False), ("qwen3", NGRAM, True), ("qwen3", SUFFIX, True),
    ("llama", SUFFIX, False)], ids=["llama-ngram", "llama-ngram-no-prefix-cache", "qwen3-ngram", "qwen3-suffix",
                                    "llama-suffix-no-prefix-cache"])
def test_greedy_equals_transformers_prompt_lookup(tiny_models, arch, speculative_config, prefix_caching):
    path, hf_model = tiny_models(arch)
    prompts = repetitive_prompts(hf_model.config.vocab_size)
    llm = pressured_llm(path, prefix_caching, speculative_config=speculative_config)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    # Twice: the second pass finds the first's outputs in the suffix index (and the prefix cache).
    for _ in range(2):
        got = generate_ids(llm, prompts, params)
    for prompt, tokens in zip(prompts, got):
        expected = hf_prompt_lookup(hf_model, prompt, NUM_NEW_TOKENS)
        assert expected == hf_greedy(hf_model, prompt, NUM_NEW_TOKENS)
        assert tokens == expected, f"prompt of {len(prompt)}"
    stats = llm.engine.get_stats()
    spec = stats.spec_decode
    assert spec.num_accepted_tokens > 0 and spec.num_draft_tokens > spec.num_accepted_tokens, spec
    assert sum(spec.num_accepted_tokens_per_pos) == spec.num_accepted_tokens
    assert stats.num_preemptions > 0, "the block pool was meant to force preemption"
    assert (stats.prefix_cache_hits > 0) == prefix_caching
    assert stats.num_free_blocks == stats.num_blocks
    llm.engine.kv_cache.check_invariants([])


def test_mixed_batch_equals_the_engine_without_speculation(tiny_models):
    """Requests that speculate next to ones that opt out, use penalties, stop on a token, ask for logprobs or
    n > 1: every output (tokens, finish reasons, logprobs) is the plain engine's."""
    path, hf_model = tiny_models("llama")
    prompts = repetitive_prompts(hf_model.config.vocab_size)
    plain = pressured_llm(path, True)
    reference = generate_ids(plain, prompts, SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS,
                                                            ignore_eos=True))
    params = []
    for i, tokens in enumerate(reference):
        kind = i % 5
        params.append(SamplingParams(
            temperature=0.0, max_tokens=NUM_NEW_TOKENS - (i % 3), ignore_eos=True, n=2 if kind == 4 else 1,
            disable_speculation=kind == 1, repetition_penalty=1.3 if kind == 2 else 1.0,
            stop_token_ids=[tokens[7]] if kind == 3 else None, logprobs=2 if kind in (0, 3) else None))
    requests = [{"prompt_token_ids": p} for p in prompts]
    expected = plain.generate(requests, params, use_tqdm=False)
    spec = pressured_llm(path, True, speculative_config=NGRAM)
    got = spec.generate(requests, params, use_tqdm=False)
    for want, have in zip(expected, got):
        assert len(have.outputs) == len(want.outputs)
        for a, b in zip(want.outputs, have.outputs):
            assert b.token_ids == a.token_ids
            assert (b.finish_reason, b.stop_reason) == (a.finish_reason, a.stop_reason)
            if a.logprobs is not None:
                assert len(b.logprobs) == len(a.logprobs)
                for entry_a, entry_b in zip(a.logprobs, b.logprobs):
                    assert entry_a.keys() == entry_b.keys()
                    for token in entry_a:
                        assert entry_b[token].logprob == pytest.approx(entry_a[token].logprob, abs=1e-4)
                        assert entry_b[token].rank == entry_a[token].rank
    assert spec.engine.get_stats().spec_decode.num_accepted_tokens > 0
    spec.engine.kv_cache.check_invariants([])


def test_block_accounting_under_random_aborts(tiny_models):
    """Random arrivals and aborts between steps, drafts pending: after every step the pool's bookkeeping holds and
    no request keeps a block past its computed tokens (rejected drafts' blocks are back in the pool)."""
    path, hf_model = tiny_models("qwen3")
    llm = pressured_llm(path, True, speculative_config=NGRAM)
    engine = llm.engine
    rng = random.Random(0)
    prompts = repetitive_prompts(hf_model.config.vocab_size)
    block_size = engine.kv_cache.block_size
    num_added = num_verify_steps = 0
    for step in range(300):
        if num_added < 40 and rng.random() < 0.3:
            engine.add_request(f"r{num_added}", {"prompt_token_ids": rng.choice(prompts)},
                               SamplingParams(temperature=rng.choice([0.0, 1.0]), max_tokens=rng.randrange(1, 30),
                                              ignore_eos=True, seed=num_added))
            num_added += 1
        live = list(engine.scheduler.requests.values())
        if live and rng.random() < 0.1:
            engine.abort_request(rng.choice(live).parent_request_id)
        num_verify_steps += any(request.spec_token_ids for request in engine.scheduler.running)
        engine.step()
        live = list(engine.scheduler.requests.values())
        engine.kv_cache.check_invariants(live)
        for request in live:
            if request.status == RequestStatus.RUNNING:
                assert len(request.block_ids) == -(-request.num_computed_tokens // block_size), request.request_id
    while engine.has_unfinished_requests():
        engine.step()
    assert num_verify_steps > 10
    engine.kv_cache.check_invariants([])
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_sampling_at_temperature_one_follows_the_target(tmp_path):
    """A tiny model with 16 tokens: 2000 seeded requests draw two tokens each, the second verified against a
    replayed draft. The (first, second) pairs must follow p(t1 | prompt) · p(t2 | prompt, t1), with and without
    top-p."""
    hf_model = build_tiny_model(tmp_path, "llama", vocab_size=16, initializer_range=0.6)
    prompt = [3, 7, 5, 9]
    with torch.no_grad():
        first_logits = hf_model(torch.tensor([prompt])).logits[0, -1]
        second_logits = hf_model(torch.tensor([prompt + [t] for t in range(16)])).logits[:, -1]
    num_samples = 2000
    for params in (dict(temperature=1.0), dict(temperature=1.0, top_p=0.8)):
        p1 = reference_probs(first_logits, **params)
        expected = {(a, b): float(p1[a] * reference_probs(second_logits[a], **params)[b])
                    for a in range(16) for b in range(16)}
        llm = LLM(model=str(tmp_path), skip_tokenizer_init=True, max_model_len=64, seed=0, speculative_config={
            "method": "replay", "num_speculative_tokens": 2, "acceptance_rate": 1.0})
        replay = llm.engine.spec_decoder.replay
        likely_second = int(second_logits[int(first_logits.argmax())].argmax())
        replay.add_continuation(prompt, [0, likely_second, 0])
        outputs = llm.generate([{"prompt_token_ids": prompt}] * num_samples,
                               [SamplingParams(max_tokens=3, ignore_eos=True, seed=i, **params)
                                for i in range(num_samples)], use_tqdm=False)
        observed = Counter(tuple(output.outputs[0].token_ids[:2]) for output in outputs)
        assert chi_square_p_value(observed, expected, num_samples) > SIGNIFICANCE, params
        spec = llm.engine.get_stats().spec_decode
        assert spec.num_drafts >= num_samples and spec.num_accepted_tokens > num_samples // 10
