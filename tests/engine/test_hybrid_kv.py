"""The hybrid KV cache (serval.engine.kv_groups): models mixing sliding-window and full layers keep a block table
per layer group over shared cache tensors, and the sliding groups free the blocks behind their window.

Checked against transformers' greedy tokens on tiny Gemma 3 (4 windowed + 2 global layers: three groups of two)
and gpt-oss (alternating: two groups of two) with an 8-token window and 4-token blocks, prompts up to 70 tokens,
under batching, chunked prefill, preemption, prefix caching, speculation, asynchronous scheduling and the decode
graphs' input buffers; against the blocks a long decode holds per group; against keep-everything in the same
memory; and against the pool's accounting under random load and aborts."""
from __future__ import annotations

import random

import pytest
from torch import nn

from serval import LLM, SamplingParams
from serval.config import EngineConfig
from serval.engine.cuda_graphs import DecodeGraphs
from serval.engine.kv_cache import NULL_BLOCK_ID, KVCacheManager
from serval.engine.kv_groups import (HybridKVCacheManager, KVCacheGroup, hybrid_kv_layout,
                                     max_blocks_per_sequence)
from serval.engine.memory import memory_usage
from serval.engine.request import RequestStatus
from serval.engine.scheduler import Scheduler
from serval.layers.attention import Attention
from tests.engine.attention_reference import eager_steps_on_reference
from tests.engine.test_engine import hf_greedy_references, make_prompts
from tests.engine.test_kv_cache import admit, make_request
from tests.engine.test_scheduler import make_request as make_scheduled_request
from tests.engine.test_scheduler import run_step
from tests.model.engine_checks import check_pressured_greedy
from tests.model.tiny_models import build_tiny

WINDOW, BLOCK = 8, 4
MAX_DECODE_BLOCKS = -(-WINDOW // BLOCK) + 1  # the window's blocks, plus the one its edge straddles
S, F = "sliding_attention", "full_attention"
# A pool the pressured engine (4 sequences, 32-token steps, 128-token context) overflows, so it preempts, but that
# fits one max_model_len sequence in every group, so the hybrid manager is on.
POOLS = {"gemma3": 60, "gpt_oss": 48}


@pytest.fixture(scope="module")
def tiny_hybrid(tmp_path_factory):
    """family -> (directory, transformers model), built once per module."""
    built = {}

    def get(family: str):
        if family not in built:
            path = tmp_path_factory.mktemp(family)
            overrides = (dict(num_hidden_layers=6, layer_types=[S, S, F, S, S, F]) if family == "gemma3"
                         else dict(num_hidden_layers=4))
            built[family] = str(path), build_tiny(path, family, **overrides)
        return built[family]
    return get


def hybrid_llm(path: str, prefix_caching: bool, num_blocks: int, **engine_args) -> LLM:
    engine_args = {"max_num_seqs": 4, "max_num_batched_tokens": 32, **engine_args}
    return LLM(model=path, skip_tokenizer_init=True, block_size=BLOCK, max_model_len=128,
               num_gpu_blocks_override=num_blocks, enable_prefix_caching=prefix_caching, **engine_args)


class _Layers(nn.Module):
    """A model's attention layers only, as hybrid_kv_layout sees them."""

    def __init__(self, windows: list[int | None]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Attention(1, 1, 4, 1.0, sliding_window=window) for window in windows)
        self.num_layers = len(windows)


# ---- the layout ----
def test_layouts_of_the_released_models():
    # Gemma 3 270M: every sixth layer global (5, 11, 17), window 512.
    gemma = hybrid_kv_layout(_Layers([None if i % 6 == 5 else 512 for i in range(18)]))
    assert gemma.group_size == 3 and gemma.num_groups == 6
    assert gemma.groups[0] == KVCacheGroup(None, (5, 11, 17))
    assert gemma.groups[1] == KVCacheGroup(512, (0, 1, 2)) and gemma.groups[5] == KVCacheGroup(512, (14, 15, 16))
    assert [gemma.layer_slot[i] for i in (5, 0, 3, 14)] == [0, 0, 0, 0] and gemma.layer_slot[17] == 2
    # gpt-oss-20b: 24 layers alternating, window 128.
    gpt_oss = hybrid_kv_layout(_Layers([128 if i % 2 == 0 else None for i in range(24)]))
    assert gpt_oss.group_size == 12 and [g.sliding_window for g in gpt_oss.groups] == [None, 128]
    assert gpt_oss.groups[0].layer_indices == tuple(range(1, 24, 2))
    # One attention type: today's single table.
    assert hybrid_kv_layout(_Layers([None] * 4)) is None and hybrid_kv_layout(_Layers([16] * 4)) is None


def test_layers_of_different_groups_share_a_tensor(tiny_hybrid):
    path, _ = tiny_hybrid("gemma3")
    llm = hybrid_llm(path, True, POOLS["gemma3"])
    runner, kv = llm.engine.runner, llm.engine.kv_cache
    assert isinstance(kv, HybridKVCacheManager) and kv.num_groups == 3
    caches = runner.kv_caches
    assert len(caches) == 6 and len({id(c) for c in caches}) == 2  # two layers a group: two tensors
    assert caches[2] is caches[0] and caches[5] is caches[1]  # full group (2, 5) with sliding (0, 1)
    assert caches[0].shape[1] == POOLS["gemma3"]
    assert memory_usage(runner.model, caches).kv_cache_bytes == 2 * caches[0].nbytes


# ---- the engine against transformers ----
@pytest.mark.parametrize("family, prefix_caching", [("gemma3", True), ("gemma3", False), ("gpt_oss", True)],
                         ids=["gemma3-prefix-cache", "gemma3-no-prefix-cache", "gpt_oss-prefix-cache"])
def test_greedy_matches_transformers_under_pressure(tiny_hybrid, family, prefix_caching):
    """A dozen prompts up to 70 tokens (the window is 8): batching, chunked prefill, preemption, prefix hits."""
    path, hf_model = tiny_hybrid(family)
    llm = hybrid_llm(path, prefix_caching, POOLS[family])
    assert isinstance(llm.engine.kv_cache, HybridKVCacheManager)
    freed = record_freeing(llm.engine.kv_cache)
    check_pressured_greedy(llm, hf_model, prefix_caching)
    assert freed, "the sliding groups were meant to free blocks"


def record_freeing(kv: HybridKVCacheManager) -> list[int]:
    """Count the allocations after which a sliding group's table held null blocks (and no full group's did)."""
    freed = []
    allocate = kv.allocate

    def recording(request, *args, **kwargs):
        done = allocate(request, *args, **kwargs)
        for window, table in zip(kv.windows, request.kv_group_block_ids):
            if NULL_BLOCK_ID in table:
                assert window is not None, table
                freed.append(1)
        return done

    kv.allocate = recording
    return freed


def test_prefix_hit_behind_the_window_matches_transformers(tiny_hybrid):
    """The second prompt repeats the first's 60 tokens: its hit takes every full-group block and only the window's
    blocks in the sliding groups (null before them)."""
    path, hf_model = tiny_hybrid("gemma3")
    first = make_prompts(hf_model.config.vocab_size)[-1][:60]
    second = first + [5, 6, 7]
    llm = hybrid_llm(path, True, 200)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm.generate([{"prompt_token_ids": first}], params, use_tqdm=False)
    hit = llm.engine.kv_cache.find_cached_prefix(make_request(second))
    num_behind = (60 - WINDOW + 1) // BLOCK
    assert len(hit) == 15 and NULL_BLOCK_ID not in hit.block_ids[0]
    assert all(ids[:num_behind] == [NULL_BLOCK_ID] * num_behind for ids in hit.block_ids[1:])
    [output] = llm.generate([{"prompt_token_ids": second}], params, use_tqdm=False)
    assert output.outputs[0].token_ids == hf_greedy_references(hf_model, [second], 8)[0]
    assert output.num_cached_tokens == 60


@pytest.mark.parametrize("engine_args", [
    {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}},
    {"async_scheduling": True}], ids=["ngram-speculation", "async-scheduling"])
def test_speculation_and_async_scheduling_match_transformers(tiny_hybrid, engine_args):
    """Verify steps (rejected drafts' blocks go back per group through free_tail) and decode steps queued a step
    ahead, on the hybrid cache."""
    path, hf_model = tiny_hybrid("gemma3")
    prompts = [prompt + prompt[:6] for prompt in make_prompts(hf_model.config.vocab_size)[5::2]]
    llm = hybrid_llm(path, True, POOLS["gemma3"], **engine_args)
    freed = record_freeing(llm.engine.kv_cache)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, output, reference in zip(prompts, outputs, hf_greedy_references(hf_model, prompts, 12)):
        assert output.outputs[0].token_ids == reference, f"prompt of {len(prompt)}"
    stats = llm.engine.get_stats()
    if "speculative_config" in engine_args:
        assert stats.spec_decode.num_accepted_tokens > 0
    assert freed and stats.num_free_blocks == stats.num_blocks
    llm.engine.kv_cache.check_invariants([])


def test_decode_graph_inputs_carry_each_groups_tables(tiny_hybrid, monkeypatch):
    """DecodeGraphs' per-group slots and block tables (the buffers a CUDA graph replays from, each group's table a
    strided view of one region), run eagerly on the CPU through the Triton kernels in the interpreter (they take
    every length from those buffers, as graphs need) for every decode step: transformers' tokens. The prefills
    attend with the torch reference."""
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "triton")
    path, hf_model = tiny_hybrid("gpt_oss")
    prompts = [make_prompts(hf_model.config.vocab_size)[i] for i in (3, 4)]  # 9 and 16 tokens: past the window
    llm = hybrid_llm(path, True, POOLS["gpt_oss"])
    runner = llm.engine.runner
    runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.block_size, 4, 128, runner.device,
                                 num_kv_groups=runner.kv_layout.num_groups)
    replays = []
    run = runner.graphs.run

    def counted(*args, **kwargs):
        replays.append(1)
        return run(*args, **kwargs)

    runner.graphs.run = counted
    eager_steps_on_reference(runner)  # the prefills: only the decode steps take the graphs' inputs
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    for prompt, output, reference in zip(prompts, outputs, hf_greedy_references(hf_model, prompts, 5)):
        assert output.outputs[0].token_ids == reference, f"prompt of {len(prompt)}"
    assert len(replays) >= 4


# ---- memory ----
def test_sliding_groups_hold_only_the_window_while_the_full_group_grows(tiny_hybrid):
    path, hf_model = tiny_hybrid("gemma3")
    llm = hybrid_llm(path, True, 200)
    kv = llm.engine.kv_cache
    prompt = make_prompts(hf_model.config.vocab_size)[-1]
    llm.engine.add_request("long", {"prompt_token_ids": prompt},
                           SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    [request] = llm.engine.scheduler.running or [r for _, r in llm.engine.scheduler.waiting]
    held = []
    tokens = []
    while llm.engine.has_unfinished_requests():
        for output in llm.engine.step():
            tokens = output.outputs[0].token_ids
        if request.status == RequestStatus.RUNNING and request.num_computed_tokens > len(prompt):
            per_group = kv.held_blocks_per_group(request)
            held.append(per_group)
            assert per_group[0] == -(-request.num_computed_tokens // BLOCK)  # the full group: every block
            assert max(per_group[1:]) <= MAX_DECODE_BLOCKS
            assert kv.num_free_blocks == kv.num_blocks - sum(per_group)
    assert len(held) >= 30 and held[-1][0] == 27  # 108 tokens
    assert max(count for per_group in held for count in per_group[1:]) == MAX_DECODE_BLOCKS
    assert tokens == hf_greedy_references(hf_model, [prompt], 40)[0]


def test_the_same_memory_holds_a_block_per_group_and_layer_share(tiny_hybrid):
    """kv_cache_memory_bytes sizes both caches alike: keeping every block, 64 blocks of six layers; hybrid, 192
    blocks of two layers (three groups) in the same bytes."""
    path, _ = tiny_hybrid("gemma3")
    bytes_per_block = 6 * 2 * BLOCK * 2 * 16 * 4  # six layers' K and V, 2 heads of 16, float32

    def engine(disable_hybrid: bool):
        return LLM(model=path, skip_tokenizer_init=True, block_size=BLOCK, max_model_len=112, max_num_seqs=8,
                   kv_cache_memory_bytes=64 * bytes_per_block, disable_hybrid_kv_cache_manager=disable_hybrid).engine

    for disable_hybrid, manager, num_blocks in [(True, KVCacheManager, 64), (False, HybridKVCacheManager, 191)]:
        kv_engine = engine(disable_hybrid)
        assert type(kv_engine.kv_cache) is manager and kv_engine.kv_cache.num_blocks == num_blocks
        kv_bytes = memory_usage(kv_engine.model, kv_engine.runner.kv_caches).kv_cache_bytes
        assert kv_bytes == 64 * bytes_per_block


def test_more_sequences_run_at_once_in_the_same_memory():
    """Eight 60-token prompts decoding 40 tokens each, in the memory of 64 blocks of three layer groups: past 90
    tokens, keeping every block lets at most two run together (23 blocks or more each); the hybrid cache (192 blocks,
    a sequence holding 23 or more in the full group and at most 3 in each sliding one) runs six, and the whole
    batch takes fewer steps."""
    def most_running_late(kv) -> tuple[int, int]:
        scheduler = Scheduler(EngineConfig(max_num_seqs=8, max_num_batched_tokens=64), kv)
        for i in range(8):
            scheduler.add_request(make_scheduled_request(f"r{i}", 60, max_tokens=40, first_token=100 * i))
        most = num_steps = 0
        while scheduler.has_unfinished():
            run_step(scheduler)
            num_steps += 1
            most = max(most, sum(1 for r in scheduler.running if r.num_computed_tokens >= 90))
            kv.check_invariants(list(scheduler.requests.values()))
        return most, num_steps

    groups = (KVCacheGroup(None, (2,)), KVCacheGroup(WINDOW, (0,)), KVCacheGroup(WINDOW, (1,)))
    keep_all, keep_all_steps = most_running_late(KVCacheManager(64, BLOCK))
    hybrid, hybrid_steps = most_running_late(HybridKVCacheManager(64 * len(groups), BLOCK, groups))
    assert keep_all <= 2 and hybrid >= 6 and hybrid_steps < keep_all_steps


# ---- the block manager ----
def test_a_hit_must_hit_in_every_group():
    groups = (KVCacheGroup(None, (1,)), KVCacheGroup(WINDOW, (0,)))
    kv = HybridKVCacheManager(64, BLOCK, groups)
    first = make_request(range(40), "first")
    admit(kv, first)
    full_ids, sliding_ids = (list(table) for table in first.kv_group_block_ids)
    assert kv.allocate(first, 0)  # the query at 40 sees 33..40: the sliding group frees blocks 0..7
    assert first.kv_group_block_ids == [full_ids, [NULL_BLOCK_ID] * 8 + sliding_ids[8:]]
    kv.check_invariants([first])
    kv.free(first)
    second = make_request(list(range(40)) + [7], "second")
    hit = kv.find_cached_prefix(second)
    # At most 10 blocks (one token is left to compute); the query at 40 needs only sliding blocks 8 and 9.
    assert hit.block_ids == [full_ids[:10], [NULL_BLOCK_ID] * 8 + sliding_ids[8:10]]
    # A full group's miss limits every group: without full block 5 the hit is 5 blocks, whose window (the query at
    # 20 sees 13..20: blocks 3 and 4) the sliding group still has cached, freed but not handed out again.
    kv._evict(kv.cached[(0, second.block_hashes[5])])
    hit = kv.find_cached_prefix(second)
    assert hit.block_ids == [full_ids[:5], [NULL_BLOCK_ID] * 3 + sliding_ids[3:5]]
    # A sliding miss inside that window (block 4) drops the hit to 4 blocks, whose window is blocks 2 and 3.
    kv._evict(kv.cached[(1, second.block_hashes[4])])
    hit = kv.find_cached_prefix(second)
    assert hit.block_ids == [full_ids[:4], [NULL_BLOCK_ID] * 2 + sliding_ids[2:4]]
    assert kv.allocate(second, second.num_tokens - 4 * BLOCK, hit)
    second.num_computed_tokens = second.num_tokens
    kv.check_invariants([second])
    kv.free(second)
    kv.check_invariants([])
    assert kv.num_free_blocks == kv.num_blocks == 63


def test_max_blocks_per_sequence_bounds_a_long_prefill():
    layout = hybrid_kv_layout(_Layers([WINDOW, None, WINDOW, WINDOW]))
    need = max_blocks_per_sequence(layout, 128, BLOCK, 32)
    assert need == 32 + 3 * (-(-(WINDOW - 1 + 32) // BLOCK) + 1)
    kv = HybridKVCacheManager(need + 1, BLOCK, layout.groups, enable_prefix_caching=False)
    scheduler = Scheduler(EngineConfig(max_num_seqs=1, max_num_batched_tokens=32), kv)
    scheduler.add_request(make_scheduled_request("long", 127, max_tokens=1))
    while scheduler.has_unfinished():
        run_step(scheduler)
        kv.check_invariants(list(scheduler.requests.values()))
    assert scheduler.num_preemptions == 0 and kv.num_free_blocks == kv.num_blocks


@pytest.mark.parametrize("windows", [(None, 7), (None, WINDOW, WINDOW), (None, None, 16)])
@pytest.mark.parametrize("seed", range(3))
def test_randomized_run_with_aborts_returns_every_block(seed, windows):
    """Random arrivals, aborts, shared prefixes, chunked prefills and preemptions over groups of full and sliding
    layers: the accounting holds after every step, no sliding group holds more than its window and the step's chunk,
    and every block comes back."""
    rng = random.Random(seed)
    budget = rng.choice([8, 16, 48])
    groups = tuple(KVCacheGroup(window, (i,)) for i, window in enumerate(windows))
    kv = HybridKVCacheManager(16 * len(groups) + 1, BLOCK, groups)
    scheduler = Scheduler(EngineConfig(max_num_batched_tokens=budget, max_num_seqs=8), kv)
    requests = []
    for step in range(300):
        if len(requests) < 150 and rng.random() < 0.5:
            shared = rng.random() < 0.5
            request = make_scheduled_request(f"r{len(requests)}", rng.randint(1, 40), max_tokens=rng.randint(1, 20),
                                             first_token=0 if shared else rng.randint(1, 900))
            requests.append(request)
            scheduler.add_request(request)
        live = list(scheduler.requests.values())
        if live and rng.random() < 0.15:
            scheduler.finish_request(rng.choice(live), RequestStatus.FINISHED_ABORTED)
        run_step(scheduler)
        for request in scheduler.running:
            for window, held in zip(kv.windows, kv.held_blocks_per_group(request)):
                if window is not None:
                    assert held <= -(-(window - 1 + budget) // BLOCK) + 1
        kv.check_invariants(list(scheduler.requests.values()))
    while scheduler.has_unfinished():
        run_step(scheduler)
    assert kv.num_free_blocks == kv.num_blocks
    assert all(block.ref_count == 0 for block in kv.blocks)
    kv.check_invariants([])
    assert scheduler.num_preemptions > 0 and kv.prefix_cache_hits > 0
    assert all(request.is_finished for request in requests)
