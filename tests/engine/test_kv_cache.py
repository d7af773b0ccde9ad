import pytest

from serval.engine.kv_cache import KVCacheManager
from serval.engine.request import Request
from serval.sampling_params import SamplingParams


def make_request(tokens, request_id="r", **params):
    return Request(request_id=request_id, prompt_token_ids=list(tokens), sampling_params=SamplingParams(**params),
                   eos_token_id=None, max_model_len=10_000)


def admit(kv, request):
    """What the scheduler does on admission: reuse the cached prefix, allocate the rest."""
    cached = kv.find_cached_prefix(request)
    assert kv.allocate(request, request.num_tokens - len(cached) * kv.block_size, cached)
    request.num_computed_tokens = request.num_tokens
    return len(cached) * kv.block_size


def test_allocate_and_free_return_every_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    request = make_request(range(10))
    assert kv.allocate(request, 10)
    assert len(request.block_ids) == 3 and kv.num_free_blocks == 5
    request.num_computed_tokens = 10
    request.append_output_token(99)
    request.append_output_token(98)
    assert kv.allocate(request, 2)  # 12 tokens: still 3 blocks
    assert len(request.block_ids) == 3
    request.num_computed_tokens = 12
    request.append_output_token(97)
    assert kv.allocate(request, 1)
    assert len(request.block_ids) == 4
    kv.check_invariants([request])
    kv.free(request)
    assert kv.num_free_blocks == 8 and request.block_ids == []
    kv.check_invariants([])


def test_allocation_refused_without_change_when_pool_is_short():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    request = make_request(range(9))
    assert not kv.allocate(request, 9)
    assert request.block_ids == [] and kv.num_free_blocks == 2
    kv.check_invariants([request])


def test_prefix_hit_shares_blocks_and_counts_tokens():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = make_request(list(range(12)) + [50, 51], "a")
    assert admit(kv, first) == 0
    second = make_request(list(range(12)) + [60], "b")
    assert admit(kv, second) == 12
    assert second.block_ids[:3] == first.block_ids[:3]
    assert kv.prefix_cache_hits == 12 and kv.prefix_cache_queries == 14 + 13
    kv.check_invariants([first, second])
    kv.free(first)
    kv.free(second)
    assert kv.num_free_blocks == 16
    kv.check_invariants([])


def test_a_cache_salt_shares_blocks_only_within_the_salt():
    """vLLM's cache_salt: the same tokens hit the cache only for a request with the same salt (the salt joins the
    first block's key, so every later block differs too)."""
    kv = KVCacheManager(num_blocks=32, block_size=4)
    tokens = list(range(12)) + [50]

    def salted(request_id: str, salt: str | None) -> Request:
        request = make_request(tokens, request_id)
        request.cache_salt = salt
        return request

    requests = [salted(name, salt) for name, salt in (("a", "tenant-1"), ("b", "tenant-1"), ("c", "tenant-2"),
                                                       ("d", None), ("e", None))]
    # the second of a salt hits the first's blocks; another salt, or none, does not
    assert [admit(kv, request) for request in requests] == [0, 12, 0, 0, 12]
    kv.check_invariants(requests)


def test_full_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    admit(kv, make_request(range(8), "a"))
    again = make_request(range(8), "b")
    assert admit(kv, again) == 4  # the last block is recomputed so the step has logits to sample from


def test_prefix_differs_in_an_early_block_means_no_hit():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    admit(kv, make_request(range(12), "a"))
    assert admit(kv, make_request([7] + list(range(1, 12)), "b")) == 0


def test_freed_blocks_stay_cached_until_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    old = make_request([1, 2, 3, 4], "old")
    admit(kv, old)
    kv.free(old)
    newer = make_request([5, 6, 7, 8], "newer")
    admit(kv, newer)
    kv.free(newer)
    assert kv.num_free_blocks == 4 and len(kv.cached) == 4
    filler = make_request([9, 10, 11], "filler")  # needs 2 blocks: evicts the least recently freed (old's)
    admit(kv, filler)
    kv.check_invariants([filler])
    kv.free(filler)
    assert len(kv.find_cached_prefix(make_request([5, 6, 7, 8, 0], "hit"))) == 2
    assert kv.find_cached_prefix(make_request([1, 2, 3, 4, 0], "miss")) == []


def test_cached_free_blocks_count_as_free_and_are_revived():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    first = make_request([1, 2, 3, 4, 5], "a")
    admit(kv, first)
    kv.free(first)
    second = make_request([1, 2, 3, 4, 9], "b")
    assert admit(kv, second) == 4
    assert kv.num_free_blocks == 1
    kv.check_invariants([second])


def test_prompt_logprobs_requests_skip_the_cache():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    admit(kv, make_request(range(12), "a"))
    assert admit(kv, make_request(range(12), "b", prompt_logprobs=1)) == 0


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    admit(kv, make_request(range(12), "a"))
    assert admit(kv, make_request(range(12), "b")) == 0
    assert kv.cached == {}


def test_reset_prefix_cache_only_when_idle():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    request = make_request(range(6))
    admit(kv, request)
    assert not kv.reset_prefix_cache()
    kv.free(request)
    assert kv.reset_prefix_cache() and kv.cached == {}


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_usage_tracks_blocks(block_size):
    kv = KVCacheManager(num_blocks=10, block_size=block_size)
    request = make_request(range(block_size * 5))
    admit(kv, request)
    assert kv.usage == pytest.approx(0.5)


def test_num_allocatable_tokens_is_what_allocate_can_give():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    other = make_request(range(100, 108), request_id="other")
    assert kv.allocate(other, 8)
    request = make_request(range(10))
    assert kv.allocate(request, 6)  # 2 blocks, 2 free slots in the second
    request.num_computed_tokens = 6
    assert kv.num_allocatable_tokens(request) == 2 + 2 * 4
    assert not kv.allocate(request, 11)
    assert kv.allocate(request, 10) and kv.num_free_blocks == 0
    kv.check_invariants([other, request])
