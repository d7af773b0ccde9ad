import random

import pytest
import torch

from serval.config import EngineConfig
from serval.engine.engine import LLMEngine
from serval.engine.kv_cache import KVCacheManager
from serval.engine.request import Request, RequestStatus
from serval.engine.scheduler import Scheduler
from serval.sampling_params import SamplingParams


def make_scheduler(num_blocks=64, block_size=4, **config):
    config.setdefault("max_num_batched_tokens", 32)
    kv = KVCacheManager(num_blocks, block_size, config.pop("enable_prefix_caching", True))
    return Scheduler(EngineConfig(**config), kv)


def make_request(request_id, num_prompt_tokens, max_tokens=4, priority=0, first_token=0):
    tokens = [(first_token + i) % 1000 for i in range(num_prompt_tokens)]
    return Request(request_id=request_id, prompt_token_ids=tokens, sampling_params=SamplingParams(max_tokens=max_tokens),
                   eos_token_id=None, max_model_len=10_000, priority=priority)


def run_step(scheduler, token=7):
    """Schedule and advance as the engine does, with a fixed token standing in for the sampler."""
    out = scheduler.schedule()
    for request in scheduler.update(out):
        request.append_output_token(token)
        if request.num_output_tokens >= request.max_tokens:
            scheduler.finish_request(request, RequestStatus.FINISHED_LENGTH)
    return out


def test_token_budget_chunks_a_long_prompt():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    request = make_request("a", 40)
    scheduler.add_request(request)
    assert run_step(scheduler).num_scheduled_tokens == [16]
    assert run_step(scheduler).num_scheduled_tokens == [16]
    assert request.num_output_tokens == 0
    assert run_step(scheduler).num_scheduled_tokens == [8]
    assert request.num_output_tokens == 1


def test_decodes_and_a_chunked_prefill_share_a_step():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    short = make_request("short", 4, max_tokens=10)
    scheduler.add_request(short)
    run_step(scheduler)
    scheduler.add_request(make_request("long", 40, first_token=500))
    out = run_step(scheduler)
    assert [r.request_id for r in out.requests] == ["short", "long"]
    assert out.num_scheduled_tokens == [1, 15]


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_step():
    scheduler = make_scheduler(max_num_batched_tokens=32, enable_chunked_prefill=False)
    scheduler.add_request(make_request("a", 20))
    scheduler.add_request(make_request("b", 20, first_token=300))
    out = run_step(scheduler)
    assert out.num_scheduled_tokens == [20]
    out = run_step(scheduler)
    assert out.num_scheduled_tokens == [1, 20]


def test_max_num_seqs_caps_the_running_set():
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(3):
        scheduler.add_request(make_request(str(i), 3, first_token=100 * i))
    out = run_step(scheduler)
    assert len(out.requests) == 2 and scheduler.num_waiting == 1


def test_preemption_takes_the_newest_and_it_resumes():
    scheduler = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    old = make_request("old", 8, max_tokens=12)
    new = make_request("new", 8, max_tokens=12, first_token=500)
    scheduler.add_request(old)
    scheduler.add_request(new)
    preempted = []
    while scheduler.has_unfinished():
        preempted += [r.request_id for r in run_step(scheduler).preempted]
        scheduler.kv_cache.check_invariants(scheduler.running + [r for _, r in scheduler.waiting])
    assert preempted and set(preempted) == {"new"}
    assert old.num_output_tokens == 12 and new.num_output_tokens == 12 and new.num_preemptions >= 1
    assert scheduler.kv_cache.num_free_blocks == 6


def test_priority_policy_admits_the_most_urgent_first():
    scheduler = make_scheduler(max_num_seqs=1, scheduling_policy="priority")
    scheduler.add_request(make_request("late", 3, priority=5))
    scheduler.add_request(make_request("urgent", 3, priority=-1, first_token=200))
    assert [r.request_id for r in run_step(scheduler).requests] == ["urgent"]


def test_fcfs_ignores_priority():
    scheduler = make_scheduler(max_num_seqs=1)
    scheduler.add_request(make_request("first", 3, priority=5))
    scheduler.add_request(make_request("second", 3, priority=-1, first_token=200))
    assert [r.request_id for r in run_step(scheduler).requests] == ["first"]


def test_finish_request_works_waiting_and_running():
    scheduler = make_scheduler(max_num_seqs=1)
    running, waiting = make_request("r", 5), make_request("w", 5, first_token=50)
    scheduler.add_request(running)
    scheduler.add_request(waiting)
    run_step(scheduler)
    scheduler.finish_request(waiting, RequestStatus.FINISHED_ABORTED)
    scheduler.finish_request(running, RequestStatus.FINISHED_ABORTED)
    assert not scheduler.has_unfinished() and scheduler.kv_cache.num_free_blocks == 64
    assert running.finish_reason == "abort"


@pytest.mark.parametrize("seed", range(4))
def test_randomized_run_returns_every_block(seed):
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks=24, block_size=4, max_num_batched_tokens=rng.choice([8, 16, 48]),
                               max_num_seqs=rng.choice([2, 4, 8]))
    requests = []
    for step in range(400):
        if len(requests) < 200 and rng.random() < 0.5:
            shared = rng.random() < 0.5  # half share a prefix, to exercise the cache
            request = make_request(f"r{len(requests)}", rng.randint(1, 40), max_tokens=rng.randint(1, 20),
                                   first_token=0 if shared else rng.randint(1, 900))
            requests.append(request)
            scheduler.add_request(request)
        live = list(scheduler.requests.values())
        if live and rng.random() < 0.1:
            scheduler.finish_request(rng.choice(live), RequestStatus.FINISHED_ABORTED)
        run_step(scheduler)
        scheduler.kv_cache.check_invariants(list(scheduler.requests.values()))
    while scheduler.has_unfinished():
        run_step(scheduler)
    kv = scheduler.kv_cache
    assert kv.num_free_blocks == kv.num_blocks
    assert all(block.ref_count == 0 for block in kv.blocks)
    kv.check_invariants([])
    assert scheduler.num_preemptions > 0 and kv.prefix_cache_hits > 0
    for request in requests:
        assert request.is_finished
        if request.status == RequestStatus.FINISHED_LENGTH:
            assert request.num_output_tokens == request.max_tokens


# ---- long prefills (issue 13, defect 8): one long prompt must not hold back everyone's first token ----
def test_a_waiting_request_is_admitted_while_a_long_prompt_prefills():
    scheduler = make_scheduler(max_num_batched_tokens=16, long_prefill_token_threshold=4)
    long = make_request("long", 40, max_tokens=2)
    scheduler.add_request(long)
    assert run_step(scheduler).num_scheduled_tokens == [16]  # alone, it fills the step
    short = make_request("short", 3, max_tokens=2, first_token=500)
    scheduler.add_request(short)
    out = run_step(scheduler)
    # The long prefill takes its cap, the short prompt all it needs, and the rest goes back to the long one.
    assert [r.request_id for r in out.requests] == ["long", "short"]
    assert out.num_scheduled_tokens == [13, 3]
    assert short.num_output_tokens == 1 and long.num_output_tokens == 0
    assert run_step(scheduler).num_scheduled_tokens == [11, 1]
    assert long.num_output_tokens == 1
    scheduler.kv_cache.check_invariants(scheduler.running)


def test_without_the_cap_a_long_prompt_starves_the_waiting_request():
    scheduler = make_scheduler(max_num_batched_tokens=16, long_prefill_token_threshold=0)
    long = make_request("long", 40, max_tokens=2)
    scheduler.add_request(long)
    run_step(scheduler)
    short = make_request("short", 3, max_tokens=2, first_token=500)
    scheduler.add_request(short)
    assert [r.request_id for r in run_step(scheduler).requests] == ["long"]
    assert [r.request_id for r in run_step(scheduler).requests] == ["long", "short"]  # the prefill's last chunk
    assert long.num_output_tokens == 1 and short.num_output_tokens == 1


def test_decodes_admitted_after_a_long_prompt_run_every_step():
    scheduler = make_scheduler(max_num_batched_tokens=16, long_prefill_token_threshold=4)
    long = make_request("long", 200, max_tokens=1)
    scheduler.add_request(long)
    run_step(scheduler)
    decoders = [make_request(f"d{i}", 2, max_tokens=6, first_token=300 + 10 * i) for i in range(3)]
    for request in decoders:
        scheduler.add_request(request)
    for _ in range(5):
        out = run_step(scheduler)
        assert out.requests[0] is long and out.num_scheduled_tokens[0] >= 4
        assert out.total_num_scheduled_tokens == 16
    assert all(request.num_output_tokens == 5 for request in decoders)
    assert long.num_output_tokens == 0


def test_two_long_prompts_both_progress_and_the_oldest_gets_the_rest():
    scheduler = make_scheduler(max_num_batched_tokens=16, long_prefill_token_threshold=4)
    first, second = make_request("first", 40), make_request("second", 40, first_token=500)
    scheduler.add_request(first)
    scheduler.add_request(second)
    assert run_step(scheduler).num_scheduled_tokens == [12, 4]


@pytest.mark.parametrize("threshold", [None, 0, 16, 1000])
def test_a_lone_prompt_fills_every_step_whatever_the_cap(threshold):
    scheduler = make_scheduler(max_num_batched_tokens=16, long_prefill_token_threshold=threshold)
    scheduler.add_request(make_request("a", 40))
    assert [run_step(scheduler).num_scheduled_tokens for _ in range(3)] == [[16], [16], [8]]


def test_the_cap_does_not_apply_without_chunked_prefill():
    scheduler = make_scheduler(max_num_batched_tokens=32, enable_chunked_prefill=False, long_prefill_token_threshold=4)
    scheduler.add_request(make_request("a", 20))
    scheduler.add_request(make_request("b", 20, first_token=300))
    assert run_step(scheduler).num_scheduled_tokens == [20]
    assert run_step(scheduler).num_scheduled_tokens == [1, 20]


def test_the_left_over_budget_takes_only_the_free_blocks():
    # 8 blocks of 4: the long prompt's capped chunk (2 blocks) and the short prompt (1) leave 5 blocks, 20 tokens,
    # for a top-up of 24 budget tokens; the top-up takes those 20 and preempts nobody.
    scheduler = make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=36, long_prefill_token_threshold=8)
    long = make_request("long", 60, max_tokens=1)
    short = make_request("short", 4, max_tokens=3, first_token=500)
    scheduler.add_request(long)
    scheduler.add_request(short)
    out = run_step(scheduler)
    assert out.num_scheduled_tokens == [28, 4] and not out.preempted
    assert scheduler.kv_cache.num_free_blocks == 0 and short.num_output_tokens == 1
    scheduler.kv_cache.check_invariants(scheduler.running)


@pytest.mark.parametrize("threshold", [0, 3])
@pytest.mark.parametrize("seed", range(2))
def test_randomized_run_with_a_prefill_cap_returns_every_block(seed, threshold):
    rng = random.Random(100 + seed)
    scheduler = make_scheduler(num_blocks=24, block_size=4, max_num_batched_tokens=16, max_num_seqs=4,
                               long_prefill_token_threshold=threshold)
    requests = []
    for step in range(300):
        if len(requests) < 150 and rng.random() < 0.5:
            request = make_request(f"r{len(requests)}", rng.randint(1, 40), max_tokens=rng.randint(1, 20),
                                   first_token=0 if rng.random() < 0.5 else rng.randint(1, 900))
            requests.append(request)
            scheduler.add_request(request)
        out = run_step(scheduler)
        assert out.total_num_scheduled_tokens <= 16
        scheduler.kv_cache.check_invariants(list(scheduler.requests.values()))
    while scheduler.has_unfinished():
        run_step(scheduler)
    assert scheduler.kv_cache.num_free_blocks == scheduler.kv_cache.num_blocks
    assert all(request.is_finished for request in requests)


def hf_greedy(model, prompt: list[int], num_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=num_new, min_new_tokens=num_new,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("threshold", [None, 0], ids=["default-cap", "no-cap"])
def test_a_short_requests_first_token_comes_while_a_max_length_prompt_prefills(tiny_models, threshold):
    """Through the real engine: a one-token-prompt request sent while a prompt of max_model_len - 1 tokens
    prefills gets its first token in the next step (with the default cap), and both generate transformers'
    greedy tokens. Without the cap it waits for the whole long prefill, which is what the test would catch."""
    path, hf_model = tiny_models("llama")
    engine = LLMEngine(EngineConfig(model=path, skip_tokenizer_init=True, max_model_len=256, block_size=4,
                                    max_num_batched_tokens=32, long_prefill_token_threshold=threshold))
    rng = random.Random(7)
    long_prompt = [rng.randrange(3, 320) for _ in range(255)]
    short_prompt = [rng.randrange(3, 320)]
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1)
    engine.add_request("long", {"prompt_token_ids": long_prompt}, params)
    tokens = {"long": [], "short": []}
    first_token_step = {}

    def step(number: int) -> None:
        for output in engine.step():
            tokens[output.request_id] = output.outputs[0].token_ids
            first_token_step.setdefault(output.request_id, number)

    step(0)
    engine.add_request("short", {"prompt_token_ids": short_prompt}, params.clone(max_tokens=8))
    number = 1
    while engine.has_unfinished_requests():
        step(number)
        number += 1
    long_prefill_steps = -(-len(long_prompt) // 32)  # 8: the steps the long prompt needs alone
    if threshold is None:
        assert first_token_step["short"] == 1
        assert first_token_step["long"] <= long_prefill_steps  # the short request slowed it by under a step
    else:
        assert first_token_step["short"] >= long_prefill_steps - 1 == first_token_step["long"]
    assert tokens["long"] == hf_greedy(hf_model, long_prompt, 1)
    assert tokens["short"] == hf_greedy(hf_model, short_prompt, 8)
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_pending_requests_compute_their_unread_token_beside_new_prompts():
    """schedule(pending), as asynchronous scheduling calls it before step N's tokens are read: a request that sampled
    in step N computes that token (one new token, though the host has no token left to compute for it), one whose
    pending token is its last (max_tokens) is left out, and the budget left admits a waiting prompt."""
    scheduler = make_scheduler(max_num_batched_tokens=16)
    going, ending = make_request("going", 4, max_tokens=10), make_request("ending", 4, max_tokens=2)
    for request in (going, ending):
        scheduler.add_request(request)
    run_step(scheduler)  # both prompts, a first token each: `ending` has one token left
    out = scheduler.schedule()
    scheduler.update(out)  # step N queued, its tokens not yet on the host
    assert [r.num_computed_tokens == r.num_tokens for r in (going, ending)] == [True, True]
    scheduler.add_request(make_request("new", 40, first_token=500))
    ahead = scheduler.schedule(pending=frozenset({id(going), id(ending)}))
    assert [r.request_id for r in ahead.requests] == ["going", "new"]
    assert ahead.num_scheduled_tokens == [1, 15]
    without = scheduler.schedule()  # `new` again (its chunk not yet advanced), but no row for the other two
    assert [r.request_id for r in without.requests] == ["new"]
