"""Asynchronous scheduling with speculative decoding: steps whose next step drafts nothing whatever its tokens (the
batch at disable_by_batch_size, every request opted out) are queued on the device before the previous step's tokens
reach the host; the others propose from those tokens synchronously. Greedy outputs equal the synchronous engine's
(with and without speculation) and transformers' under batching, chunked prefill, preemption, prefix hits and
per-request sampling options; block accounting stays exact with aborts while a step is in flight."""
import random

import pytest

from serval import LLM, SamplingParams
from serval.engine.request import RequestStatus
from tests.engine.spec_decode.test_spec_engine import NGRAM, SUFFIX, generate_ids, repetitive_prompts
from tests.engine.spec_decode.test_verify_graphs import requires_cuda
from tests.engine.test_engine import hf_greedy, pressured_llm

NUM_NEW_TOKENS = 12


def count_queued_steps(llm) -> list[int]:
    """Spy on the runner: [n] counts the decode steps queued behind an unprocessed one (overlapped)."""
    runner = llm.engine.runner
    counts = [0]
    for name in ("launch_decode", "launch_forward"):
        launch = getattr(runner, name)

        def counting(requests, previous=None, launch=launch, **kwargs):
            counts[0] += previous is not None
            return launch(requests, previous=previous, **kwargs)

        setattr(runner, name, counting)
    return counts


@pytest.mark.parametrize("arch, method, prefix_caching", [("llama", NGRAM, True), ("qwen3", SUFFIX, False)],
                         ids=["llama-ngram", "qwen3-suffix-no-prefix-cache"])
def test_greedy_equals_the_synchronous_engine_and_transformers(tiny_models, arch, method, prefix_caching):
    """Batches of 4 overlap (disable_by_batch_size 3), smaller ones speculate; one request in three opts out."""
    path, hf_model = tiny_models(arch)
    prompts = repetitive_prompts(hf_model.config.vocab_size)
    config = {**method, "disable_by_batch_size": 3}
    params = [SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS - i % 4, ignore_eos=True,
                             disable_speculation=i % 3 == 2) for i in range(len(prompts))]
    requests = [{"prompt_token_ids": p} for p in prompts]
    synchronous = pressured_llm(path, prefix_caching, speculative_config=config, async_scheduling=False)
    expected = [output.outputs[0].token_ids for output in synchronous.generate(requests, params, use_tqdm=False)]
    llm = pressured_llm(path, prefix_caching, speculative_config=config, async_scheduling=True)
    assert llm.engine.async_scheduling
    queued = count_queued_steps(llm)
    got = [output.outputs[0].token_ids for output in llm.generate(requests, params, use_tqdm=False)]
    assert got == expected
    for prompt, tokens, param in zip(prompts, got, params):
        assert tokens == hf_greedy(hf_model, prompt, param.max_tokens), f"prompt of {len(prompt)}"
    stats = llm.engine.get_stats()
    assert queued[0] > 0, "steps were meant to overlap"
    assert stats.spec_decode.num_accepted_tokens > 0 and stats.spec_decode.num_disabled_steps > 0
    assert stats.num_preemptions > 0, "the block pool was meant to force preemption"
    assert (stats.prefix_cache_hits > 0) == prefix_caching
    assert stats.num_free_blocks == stats.num_blocks
    llm.engine.kv_cache.check_invariants([])


def test_sampling_options_give_the_synchronous_outputs(tiny_models):
    """Penalties, a stop token, logprobs, seeded sampling and n > 1 beside greedy requests, all speculation off by
    batch size or opt-out half the time: tokens, finish reasons and logprobs are the synchronous engine's."""
    path, hf_model = tiny_models("llama")
    prompts = repetitive_prompts(hf_model.config.vocab_size)[:8]
    reference = generate_ids(pressured_llm(path, True), prompts,
                             SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True))
    params = []
    for i, tokens in enumerate(reference):
        kind = i % 4
        params.append(SamplingParams(
            temperature=1.0 if kind == 0 else 0.0, seed=i, max_tokens=NUM_NEW_TOKENS - i % 3, ignore_eos=True,
            n=2 if kind == 3 else 1, disable_speculation=i % 2 == 1, repetition_penalty=1.3 if kind == 1 else 1.0,
            stop_token_ids=[tokens[6]] if kind == 2 else None, logprobs=2 if kind == 2 else None))
    requests = [{"prompt_token_ids": p} for p in prompts]
    config = {**NGRAM, "disable_by_batch_size": 3}
    outputs = []
    for overlap in (False, True):
        llm = pressured_llm(path, True, speculative_config=config, async_scheduling=overlap)
        queued = count_queued_steps(llm)
        outputs.append(llm.generate(requests, params, use_tqdm=False))
        llm.engine.kv_cache.check_invariants([])
    assert queued[0] > 0
    for want, have in zip(*outputs):
        assert len(have.outputs) == len(want.outputs)
        for a, b in zip(want.outputs, have.outputs):
            assert b.token_ids == a.token_ids
            assert (b.finish_reason, b.stop_reason) == (a.finish_reason, a.stop_reason)
            if a.logprobs is not None:
                for entry_a, entry_b in zip(a.logprobs, b.logprobs):
                    assert entry_a.keys() == entry_b.keys()
                    for token in entry_a:
                        assert entry_b[token].logprob == pytest.approx(entry_a[token].logprob, abs=1e-4)


def test_block_accounting_under_random_aborts_while_a_step_is_in_flight(tiny_models):
    """Random arrivals and aborts between steps, some while a queued decode step is on the device and some with
    drafts pending: after every step the pool's bookkeeping holds, and a running request with nothing in flight
    holds exactly the blocks of its computed tokens."""
    path, hf_model = tiny_models("qwen3")
    llm = pressured_llm(path, True, speculative_config={**NGRAM, "disable_by_batch_size": 4},
                        async_scheduling=True)
    engine = llm.engine
    rng = random.Random(1)
    prompts = repetitive_prompts(hf_model.config.vocab_size)
    block_size = engine.kv_cache.block_size
    num_added = num_verify_steps = num_aborts_in_flight = 0
    for step in range(300):
        if num_added < 40 and rng.random() < 0.3:
            engine.add_request(f"r{num_added}", {"prompt_token_ids": rng.choice(prompts)},
                               SamplingParams(temperature=rng.choice([0.0, 1.0]), max_tokens=rng.randrange(1, 30),
                                              ignore_eos=True, seed=num_added,
                                              disable_speculation=rng.random() < 0.3))
            num_added += 1
        live = list(engine.scheduler.requests.values())
        if live and rng.random() < 0.15:
            num_aborts_in_flight += engine.in_flight is not None
            engine.abort_request(rng.choice(live).parent_request_id)
        num_verify_steps += any(request.spec_token_ids for request in engine.scheduler.running)
        engine.step()
        live = list(engine.scheduler.requests.values())
        engine.kv_cache.check_invariants(live)
        if engine.in_flight is None:
            for request in live:
                if request.status == RequestStatus.RUNNING:
                    assert len(request.block_ids) == -(-request.num_computed_tokens // block_size), request.request_id
    while engine.has_unfinished_requests():
        engine.step()
    assert num_verify_steps > 10 and num_aborts_in_flight > 0
    engine.kv_cache.check_invariants([])
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_drafters_keep_the_synchronous_engine(tiny_models):
    """A draft model runs inside every synchronous target step: asynchronous scheduling stays off with one."""
    path, _ = tiny_models("llama")
    llm = pressured_llm(path, True, async_scheduling=True,
                        speculative_config={"method": "draft_model", "model": path, "num_speculative_tokens": 2})
    assert not llm.engine.async_scheduling


@requires_cuda
def test_gpu_overlapped_steps_give_the_synchronous_tokens(tiny_models):
    """On a GPU (decode graphs queued behind one another, verify graphs in between): the synchronous engine's tokens
    and transformers'."""
    path, hf_model = tiny_models("llama")
    prompts = repetitive_prompts(hf_model.config.vocab_size)
    # Lengths differ so that the batch shrinks below disable_by_batch_size at the end: steps both overlap (big
    # batches) and speculate (the tail).
    params = [SamplingParams(temperature=0.0, max_tokens=24 - 3 * (i % 5), ignore_eos=True)
              for i in range(len(prompts))]
    config = {**NGRAM, "disable_by_batch_size": 4}
    runs = []
    for overlap in (False, True):
        llm = LLM(model=path, skip_tokenizer_init=True, block_size=4, max_model_len=256, device="cuda",
                  dtype="float32", max_num_seqs=8, num_gpu_blocks_override=2048, speculative_config=config,
                  async_scheduling=overlap)
        queued = count_queued_steps(llm)
        runs.append(generate_ids(llm, prompts, params))
    stats = llm.engine.get_stats().spec_decode
    assert queued[0] > 0 and stats.num_accepted_tokens > 0 and stats.num_disabled_steps > 0
    assert runs[1] == runs[0]
    for prompt, tokens, param in zip(prompts[:4], runs[1], params):
        assert tokens == hf_greedy(hf_model, prompt, param.max_tokens)
