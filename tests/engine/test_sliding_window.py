"""Sliding-window KV blocks (serval.engine.kv_cache): a model whose every layer attends to the last `sliding_window`
positions frees the blocks behind the window. Checked against transformers' greedy tokens on a tiny Mistral with a
16-token window and 4-token blocks (prompts and outputs far longer than the window, under batching, chunked prefill,
preemption and prefix caching), against the block bound a decode should hold, and against the pool's accounting
under random load. Models with a full-attention layer (Gemma 3, gpt-oss) keep every block."""
from __future__ import annotations

import random

import pytest
import torch

from serval import LLM, SamplingParams
from serval.config import EngineConfig
from serval.engine.kv_cache import NULL_BLOCK_ID, KVCacheManager, model_sliding_window
from serval.engine.request import RequestStatus
from serval.engine.scheduler import Scheduler
from serval.model.loader import load_model
from tests.conftest import build_tiny_model
from tests.engine.test_engine import counted_launches, hf_greedy_references
from tests.engine.test_kv_cache import admit, make_request
from tests.engine.test_scheduler import make_request as make_scheduled_request
from tests.engine.test_scheduler import run_step

WINDOW, BLOCK = 16, 4
MAX_DECODE_BLOCKS = -(-WINDOW // BLOCK) + 1  # the window's blocks, plus the one the window's edge straddles


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):
    path = tmp_path_factory.mktemp("mistral_window16")
    return str(path), build_tiny_model(path, "mistral", sliding_window=WINDOW)


def long_prompts(vocab_size: int, count: int = 8, seed: int = 0) -> list[list[int]]:
    """Prompts of up to 90 tokens (the window is 16); every other one shares a 40-token head, so the prefix cache
    has hits both inside and behind the window."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab_size) for _ in range(40)]
    lengths = [3, 19, 33, 44, 57, 61, 78, 90][:count]
    prompts = []
    for i, length in enumerate(lengths):
        head = shared[:min(length, 40)] if i % 2 else []
        prompts.append(head + [rng.randrange(3, vocab_size) for _ in range(length - len(head))])
    return prompts


def windowed_llm(path: str, prefix_caching: bool, num_blocks: int = 30, **engine_args) -> LLM:
    engine_args = {"max_num_seqs": 8, "max_num_batched_tokens": 24, **engine_args}
    return LLM(model=path, skip_tokenizer_init=True, block_size=BLOCK, num_gpu_blocks_override=num_blocks,
               max_model_len=112, enable_prefix_caching=prefix_caching, **engine_args)


# ---- the engine against transformers ----
@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_greedy_matches_transformers_far_past_the_window(tiny_mistral, prefix_caching):
    path, hf_model = tiny_mistral
    prompts = long_prompts(hf_model.config.vocab_size)
    llm = windowed_llm(path, prefix_caching)
    assert llm.engine.kv_cache.sliding_window == WINDOW
    num_new = 20
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=num_new, ignore_eos=True), use_tqdm=False)
    for prompt, output, reference in zip(prompts, outputs, hf_greedy_references(hf_model, prompts, num_new)):
        assert output.outputs[0].token_ids == reference, f"prompt of {len(prompt)}"
    stats = llm.engine.get_stats()
    assert stats.num_preemptions > 0, "the block pool was meant to force preemption"
    assert (stats.prefix_cache_hits > 0) == prefix_caching
    assert stats.num_free_blocks == stats.num_blocks == 29  # one of the 30 is the null block
    llm.engine.kv_cache.check_invariants([])


def test_prefix_hit_behind_the_window_matches_transformers(tiny_mistral):
    """The second prompt repeats the first's 80 tokens: its hit starts with null blocks (positions no query of its
    can see) and reuses only the window's blocks, which the first request had freed into the cache."""
    path, hf_model = tiny_mistral
    first = long_prompts(hf_model.config.vocab_size)[-1][:80]
    second = first + [5, 6, 7]
    llm = windowed_llm(path, prefix_caching=True)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    llm.generate([{"prompt_token_ids": first}], params, use_tqdm=False)
    kv = llm.engine.kv_cache
    request = make_request(second)
    cached = kv.find_cached_prefix(request)
    assert len(cached) == 20 and cached[:16] == [NULL_BLOCK_ID] * 16 and NULL_BLOCK_ID not in cached[16:]
    [output] = llm.generate([{"prompt_token_ids": second}], params, use_tqdm=False)
    assert output.outputs[0].token_ids == hf_greedy_references(hf_model, [second], 12)[0]
    assert output.num_cached_tokens == 80


def test_triton_kernels_match_transformers_with_freed_blocks(tiny_mistral, monkeypatch):
    """The Triton attention (the interpreter here) never reads the null blocks: its key loop starts
    at the window. Two prompts, chunked prefill, decode and a prefix hit behind the window."""
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "triton")
    path, hf_model = tiny_mistral
    head = long_prompts(hf_model.config.vocab_size)[5]
    prompts = [head, head[:44] + [9, 10, 11]]
    llm = windowed_llm(path, prefix_caching=True, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outputs = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0] for p in prompts]
    for prompt, output, reference in zip(prompts, outputs, hf_greedy_references(hf_model, prompts, 6)):
        assert output.outputs[0].token_ids == reference, f"prompt of {len(prompt)}"
    assert outputs[1].num_cached_tokens == 44


def record_freeing(kv: KVCacheManager) -> list[int]:
    """Wrap kv.allocate to count the allocations after which the request's table held null blocks."""
    freed = []
    allocate = kv.allocate

    def recording(request, *args, **kwargs):
        done = allocate(request, *args, **kwargs)
        if NULL_BLOCK_ID in request.block_ids:
            freed.append(1)
        return done

    kv.allocate = recording
    return freed


@pytest.mark.parametrize("engine_args", [
    {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}},
    {"async_scheduling": True}], ids=["ngram-speculation", "async-scheduling"])
def test_speculation_and_async_scheduling_match_transformers(tiny_mistral, engine_args):
    """Verify steps (their rejected drafts' blocks go back through free_tail) and decode steps queued before the
    previous one's tokens are read (their blocks allocated a step ahead) on a cache that frees behind the window."""
    path, hf_model = tiny_mistral
    # Each prompt ends with its opening repeated, so prompt lookup has drafts to offer.
    prompts = [prompt + prompt[:6] for prompt in long_prompts(hf_model.config.vocab_size)]
    llm = windowed_llm(path, prefix_caching=True, **engine_args)
    freed = record_freeing(llm.engine.kv_cache)
    launches = counted_launches(llm.engine)
    num_new = 14
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=num_new, ignore_eos=True), use_tqdm=False)
    for prompt, output, reference in zip(prompts, outputs, hf_greedy_references(hf_model, prompts, num_new)):
        assert output.outputs[0].token_ids == reference, f"prompt of {len(prompt)}"
    stats = llm.engine.get_stats()
    if "speculative_config" in engine_args:
        assert stats.spec_decode.num_accepted_tokens > 0
    else:
        assert sum(launches) > 10, "steps were meant to be queued behind unread ones"
    assert freed and stats.num_free_blocks == stats.num_blocks
    llm.engine.kv_cache.check_invariants([])


def test_tensor_parallel_workers_read_the_same_tables(tiny_mistral):
    """tensor_parallel_size=2 on CPU (gloo, one spawned worker): the block tables with their null blocks go to the
    worker as they are, and the tokens are transformers'."""
    path, hf_model = tiny_mistral
    prompts = long_prompts(hf_model.config.vocab_size)[3:7]
    llm = windowed_llm(path, prefix_caching=True, tensor_parallel_size=2)
    try:
        assert llm.engine.kv_cache.sliding_window == WINDOW
        freed = record_freeing(llm.engine.kv_cache)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
        for prompt, output, reference in zip(prompts, outputs, hf_greedy_references(hf_model, prompts, 12)):
            assert output.outputs[0].token_ids == reference, f"prompt of {len(prompt)}"
        assert freed
    finally:
        llm.shutdown()


# ---- memory: what a long sequence holds ----
def test_a_decoding_sequence_holds_only_the_window(tiny_mistral):
    path, hf_model = tiny_mistral
    llm = windowed_llm(path, prefix_caching=True, num_blocks=40)
    kv = llm.engine.kv_cache
    prompt = long_prompts(hf_model.config.vocab_size)[-1][:70]
    llm.engine.add_request("long", {"prompt_token_ids": prompt},
                           SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    [request] = llm.engine.scheduler.running or [r for _, r in llm.engine.scheduler.waiting]
    held_while_decoding = []
    tokens = []
    while llm.engine.has_unfinished_requests():
        decoding = request.num_computed_tokens >= len(prompt)
        for output in llm.engine.step():
            tokens = output.outputs[0].token_ids
        if decoding and request.status == RequestStatus.RUNNING:
            held_while_decoding.append(kv.num_held_blocks(request))
            assert kv.num_free_blocks == kv.num_blocks - kv.num_held_blocks(request)
    assert len(held_while_decoding) >= 30 and max(held_while_decoding) == MAX_DECODE_BLOCKS
    # 110 tokens would take 28 blocks without freeing.
    assert tokens == hf_greedy_references(hf_model, [prompt], 40)[0]


def test_more_sequences_fit_the_same_pool():
    """Eight 60-token prompts decoding 40 tokens each in a pool of 64 blocks: with the window they all run at once;
    holding every block (no window), at most four do."""
    def max_running(sliding_window: int | None) -> int:
        kv = KVCacheManager(64, BLOCK, sliding_window=sliding_window)
        scheduler = Scheduler(EngineConfig(max_num_seqs=8, max_num_batched_tokens=64), kv)
        for i in range(8):
            scheduler.add_request(make_scheduled_request(f"r{i}", 60, max_tokens=40, first_token=100 * i))
        most = 0
        while scheduler.has_unfinished():
            run_step(scheduler)
            most = max(most, sum(1 for r in scheduler.running if r.num_computed_tokens >= r.num_prompt_tokens))
            kv.check_invariants(list(scheduler.requests.values()))
        return most

    assert max_running(sliding_window=None) <= 4  # 25 blocks a sequence at the end
    assert max_running(sliding_window=WINDOW) == 8


# ---- the block manager ----
def test_decode_frees_the_blocks_behind_the_window():
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK, sliding_window=WINDOW)
    assert kv.num_blocks == kv.num_free_blocks == 15  # block 0 is the null block
    request = make_request(range(30))
    admit(kv, request)  # 30 computed: the next query at 30 sees 15..30, so block 3 (12..15) stays
    assert kv.num_held_blocks(request) == 8
    for token in range(40):
        request.append_output_token(token)
        assert kv.allocate(request, 1)
        request.num_computed_tokens += 1
        num_dead = (request.num_computed_tokens - 1 - WINDOW + 1) // BLOCK
        assert request.block_ids[:num_dead] == [NULL_BLOCK_ID] * num_dead
        assert NULL_BLOCK_ID not in request.block_ids[num_dead:]
        assert kv.num_held_blocks(request) <= MAX_DECODE_BLOCKS
        kv.check_invariants([request])
    kv.free(request)
    assert kv.num_free_blocks == 15
    kv.check_invariants([])


def test_a_window_hit_needs_only_the_blocks_inside_the_window():
    kv = KVCacheManager(num_blocks=24, block_size=BLOCK, sliding_window=WINDOW)
    first = make_request(range(40), "first")
    admit(kv, first)
    first_block_ids = list(first.block_ids)
    kv.free(first)
    # Blocks 0..9 are cached. The most a 41-token request can take is 10 blocks (one token is left to compute);
    # the query at 40 sees 25..40, so blocks 0..5 come back as null and 6..9 from the cache.
    second = make_request(list(range(40)) + [7], "second")
    cached = kv.find_cached_prefix(second)
    assert cached == [NULL_BLOCK_ID] * 6 + first_block_ids[6:10]
    # Evict block 1 (out of every window) and block 8 (inside it): the hit stops before block 8's window needs it.
    kv._evict(kv.cached[second.block_hashes[1]])
    kv._evict(kv.cached[second.block_hashes[8]])
    cached = kv.find_cached_prefix(second)
    # n = 8 would need blocks 4..7 (the query at 32 sees 17..32: block 4 holds 16..19): all cached.
    assert len(cached) == 8 and cached[:4] == [NULL_BLOCK_ID] * 4 and NULL_BLOCK_ID not in cached[4:]
    assert kv.allocate(second, second.num_tokens - 8 * BLOCK, cached)
    second.num_computed_tokens = second.num_tokens
    kv.check_invariants([second])
    kv.free(second)
    kv.check_invariants([])
    assert kv.num_free_blocks == kv.num_blocks


def test_without_a_window_a_hit_stops_at_the_first_missing_block():
    kv = KVCacheManager(num_blocks=24, block_size=BLOCK)
    first = make_request(range(40), "first")
    admit(kv, first)
    kv.free(first)
    second = make_request(list(range(40)) + [7], "second")
    assert len(kv.find_cached_prefix(second)) == 10
    kv._evict(kv.cached[second.block_hashes[1]])
    assert len(kv.find_cached_prefix(second)) == 1


def test_free_tail_and_preemption_keep_the_nulls_out_of_the_pool():
    """A verify step's rejected drafts (free_tail) and a preemption (free) release only real blocks."""
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK, sliding_window=WINDOW)
    request = make_request(range(50))
    admit(kv, request)
    request.append_output_token(1)
    assert kv.allocate(request, 1 + 6)  # the next token and six drafts: positions 50..56
    assert request.block_ids[:8] == [NULL_BLOCK_ID] * 8
    request.num_computed_tokens += 2  # one draft accepted
    kv.free_tail(request, request.num_computed_tokens)
    assert len(request.block_ids) == 13
    kv.check_invariants([request])
    kv.free(request)
    kv.check_invariants([])
    assert kv.num_free_blocks == 15 and NULL_BLOCK_ID not in kv.free_queue


@pytest.mark.parametrize("window", [7, 16, 32])
@pytest.mark.parametrize("seed", range(4))
def test_randomized_run_returns_every_block(seed, window):
    """Random arrivals, aborts, shared prefixes, chunked prefills and preemptions on a windowed pool (windows shorter
    than a block's edge, one block's worth, several): the accounting holds after every step, no running request
    holds more than its window and its step's chunk, and every block comes back."""
    rng = random.Random(seed)
    budget = rng.choice([8, 16, 48])
    kv = KVCacheManager(16, BLOCK, sliding_window=window)
    scheduler = Scheduler(EngineConfig(max_num_batched_tokens=budget, max_num_seqs=8), kv)
    requests = []
    for step in range(400):
        if len(requests) < 200 and rng.random() < 0.5:
            shared = rng.random() < 0.5
            # At most 60 tokens: 15 blocks, what the pool can hold (as max_model_len guarantees in the engine).
            request = make_scheduled_request(f"r{len(requests)}", rng.randint(1, 40), max_tokens=rng.randint(1, 20),
                                             first_token=0 if shared else rng.randint(1, 900))
            requests.append(request)
            scheduler.add_request(request)
        live = list(scheduler.requests.values())
        if live and rng.random() < 0.1:
            scheduler.finish_request(rng.choice(live), RequestStatus.FINISHED_ABORTED)
        out = run_step(scheduler)
        assert out.total_num_scheduled_tokens <= budget
        for request in scheduler.running:
            num_inside = -(-request.num_computed_tokens // BLOCK) - kv.num_blocks_behind_window(request.num_computed_tokens)
            assert kv.num_held_blocks(request) <= num_inside + 2 + -(-budget // BLOCK)
        kv.check_invariants(list(scheduler.requests.values()))
    while scheduler.has_unfinished():
        run_step(scheduler)
    assert kv.num_free_blocks == kv.num_blocks == 15
    assert all(block.ref_count == 0 for block in kv.blocks)
    kv.check_invariants([])
    assert scheduler.num_preemptions > 0 and kv.prefix_cache_hits > 0
    assert all(request.is_finished for request in requests)


# ---- which models free blocks ----
@pytest.mark.parametrize("family, expected", [
    ("mistral", WINDOW), ("qwen2-all-sliding", WINDOW), ("qwen2-some-sliding", None), ("llama", None),
    ("gemma3", None), ("gpt_oss", None)])
def test_only_models_whose_every_layer_slides_free_blocks(tmp_path, family, expected):
    """Gemma 3 (one global layer among windowed ones) and gpt-oss (alternating) keep every block: their full layers
    read all of them through the one block table."""
    if family in ("gemma3", "gpt_oss"):
        from tests.model.tiny_models import build_tiny
        build_tiny(tmp_path, family)
    elif family.startswith("qwen2"):
        layer_types = (["sliding_attention"] * 2 if family == "qwen2-all-sliding"
                       else ["sliding_attention", "full_attention"])
        build_tiny_model(tmp_path, "qwen2", use_sliding_window=True, sliding_window=WINDOW, layer_types=layer_types)
    else:
        build_tiny_model(tmp_path, family, **({"sliding_window": WINDOW} if family == "mistral" else {}))
    model, _ = load_model(str(tmp_path), load_format="safetensors")
    assert model_sliding_window(model) == expected


def test_gemma3_engine_keeps_every_block_and_matches_transformers(tmp_path):
    from tests.model.tiny_models import build_tiny
    hf_model = build_tiny(tmp_path, "gemma3")
    prompt = long_prompts(hf_model.config.vocab_size)[-1]
    llm = windowed_llm(str(tmp_path), prefix_caching=True, num_blocks=40)
    assert llm.engine.kv_cache.sliding_window is None
    [output] = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=10,
                                                                           ignore_eos=True), use_tqdm=False)
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                     pad_token_id=0)[0, len(prompt):].tolist()
    assert output.outputs[0].token_ids == expected
