import random

import pytest

from serval.config import EngineConfig
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
