"""KVCacheManager: the block pool, each request's block table, and the prefix cache.

A block is free when no request references it (ref_count == 0). Free blocks wait in an LRU queue; a
free block that still holds a full, hashed block of tokens stays findable by its hash until it is
handed out again (that is the eviction). So "free" counts cached-but-unreferenced blocks too, and an
idle engine always has every block free.

Prefix hashes are chained: a block's key is (parent block's hash, its tokens), so equal hashes mean
equal whole prefixes. A request's first block chains from its LoRA adapter's id (0: the base model), so requests
of different adapters, whose K/V differ for the same tokens, never share a block; and from its cache_salt when it
has one (vLLM's), so requests share blocks only within a salt. The key itself is kept and compared on a hit, so a hash collision can never
serve wrong K/V.

Sliding windows. When every attention layer of the model sees only the last `sliding_window` positions (Mistral,
Phi-3 or Qwen2 with a window on all layers), a block whose every position is older than the window of the next
query is never read again. allocate frees such blocks and leaves NULL_BLOCK_ID in their place, so block indices stay
positional (block i holds positions [i * block_size, (i + 1) * block_size)). The null block is reserved: never
handed out, never written, and read only where the attention mask hides it (the Triton kernel starts its key loop
at the window; the torch reference masks it, and its zeros are finite, so nothing leaks in). A decoding sequence
then holds at most ceil(sliding_window / block_size) + 1 blocks:

    positions:  0 ........................ p - window | p - window + 1 ...... p (next query)
    block_ids:  [null][null][null][null]     [ held (the window's blocks)             ][ held ]

A freed block keeps its hash in the free queue, as any freed block does, so other requests can still hit it. A
prefix hit on a sliding model needs only the blocks inside the window of its first computed position (vLLM's
rule): blocks before that come back as null, cached or not. Models that mix full and windowed layers (Gemma 3,
gpt-oss) get a block table per layer group instead (serval.engine.kv_groups.HybridKVCacheManager); with
--disable-hybrid-kv-cache-manager they keep every block here, their full layers reading them all through one table.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from serval.engine.request import Request
from serval.layers.attention import Attention

_ROOT_HASH = 0
# With a sliding window, the block that stands in a block table for positions the window left behind.
NULL_BLOCK_ID = 0


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    block_key: tuple | None = None  # (parent hash, tokens): what block_hash stands for


def model_sliding_window(model) -> int | None:
    """The window behind which the cache may free blocks: the widest of the attention layers' windows when every
    layer has one; None when any layer attends to all positions, or the model's layers aren't all
    serval.layers.attention.Attention (DeepSeek-V3's latent attention), since those read every block."""
    windows = [module.sliding_window for module in model.modules() if isinstance(module, Attention)]
    if len(windows) != getattr(model, "num_layers", -1) or not windows or None in windows:
        return None
    return max(windows)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None) -> None:
        """num_blocks: the pool's size; with sliding_window, one of them is the null block and the rest
        (self.num_blocks) are what requests can hold."""
        self.sliding_window = sliding_window
        num_reserved = 0 if sliding_window is None else 1  # the null block
        self.num_blocks = num_blocks - num_reserved
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # front = evict first
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_reserved, num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Block ids holding the longest cached prefix of the request's tokens (full blocks only).

        At least one token is always left to compute, since the step that computes it yields the logits
        the next token is sampled from. Requests that want prompt logprobs compute every position.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return []
        self._update_block_hashes(request)
        max_hits = min(len(request.block_hashes), (request.num_tokens - 1) // self.block_size)
        if self.sliding_window is None:
            hits = []
            for index in range(max_hits):
                block_id = self._cached_block_id(request, index)
                if block_id is None:
                    break
                hits.append(block_id)
        else:
            hits = self._find_cached_window(request, max_hits)
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += len(hits) * self.block_size
        return hits

    def _find_cached_window(self, request: Request, max_hits: int) -> list[int]:
        """find_cached_prefix with a sliding window: the most blocks n <= max_hits whose blocks inside the window of
        position n * block_size are all cached, those before it given as the null block."""
        found: list[int | None] = []
        num_hits = 0
        run_start = 0  # where the run of cached blocks that ends at `index` starts
        for index in range(max_hits):
            block_id = self._cached_block_id(request, index)
            found.append(block_id)
            if block_id is None:
                run_start = index + 1
            elif run_start <= self.num_blocks_behind_window((index + 1) * self.block_size):
                num_hits = index + 1
        num_behind = self.num_blocks_behind_window(num_hits * self.block_size)
        return [NULL_BLOCK_ID] * num_behind + found[num_behind:num_hits]

    def num_blocks_behind_window(self, first_query_position: int) -> int:
        """Leading blocks whose every position is outside the window of a query at first_query_position (a query
        at p sees keys p - sliding_window < k <= p); 0 without a window."""
        if self.sliding_window is None:
            return 0
        return max(first_query_position - self.sliding_window + 1, 0) // self.block_size

    def _cached_block_id(self, request: Request, index: int) -> int | None:
        """The cached block holding the request's block `index`, if any (the key compared: no hash collision)."""
        block_id = self.cached.get(request.block_hashes[index])
        if block_id is None or self.blocks[block_id].block_key != self._block_key(request, index):
            return None
        return block_id

    def allocate(self, request: Request, num_new_tokens: int, cached_block_ids: list[int] = ()) -> bool:
        """Give the request blocks for its cached prefix plus num_new_tokens more; False (and no change) if
        the pool can't. Blocks that will be full after this step are registered in the prefix cache now,
        which is safe because each layer writes the whole batch's K/V before any attention reads it.

        Blocks layout. A cached prefix comes only on admission, when nothing is computed yet, so at most one of
        the first two spans is non-empty. New tokens first fill the free slots of the last held block:

            tokens: |<-- computed -->|<---- cached prefix ---->|<------------- new (num_new_tokens) ----------->|
            blocks: [ held ][ held  ][ cached    ][ cached     ][ fresh         ][ fresh         ][ fresh        ]
                     request.block_ids  taken from the cache:     taken from the free queue's front (LRU), old hash
                     as they are        ref_count + 1, hash kept  evicted; those full after this step hashed now
            free(): every block's ref_count - 1; unreferenced ones rejoin the free queue tail first, hash kept

        With a sliding window, the held blocks the window of this step's first query has left behind are freed
        first (even when the allocation then fails: nothing reads them again), and a cached prefix may start with
        null blocks (find_cached_prefix).
        """
        self._free_behind_window(request)
        num_tokens_after = request.num_computed_tokens + len(cached_block_ids) * self.block_size + num_new_tokens
        num_needed = -(-num_tokens_after // self.block_size) - len(request.block_ids) - len(cached_block_ids)
        num_cached_free = sum(1 for block_id in cached_block_ids
                              if not self._is_null(block_id) and self.blocks[block_id].ref_count == 0)
        if num_needed > self.num_free_blocks - num_cached_free:
            return False
        for block_id in cached_block_ids:
            if not self._is_null(block_id):
                self._take(block_id)
        request.block_ids.extend(cached_block_ids)
        for _ in range(max(num_needed, 0)):
            block_id = next(iter(self.free_queue))
            self._take(block_id)
            self._evict(block_id)
            request.block_ids.append(block_id)
        if self.enable_prefix_caching:
            self._cache_full_blocks(request, num_tokens_after // self.block_size)
        return True

    def _free_behind_window(self, request: Request) -> None:
        """Release the held blocks that no query from request.num_computed_tokens on can see; null in their place.
        Nulls are always a prefix of the table, so the scan stops at the first one it meets, walking back."""
        end = min(self.num_blocks_behind_window(request.num_computed_tokens), len(request.block_ids))
        first = end
        while first > 0 and not self._is_null(request.block_ids[first - 1]):
            first -= 1
        for index in range(first, end):
            self._release(request.block_ids[index])
            request.block_ids[index] = NULL_BLOCK_ID

    def num_held_blocks(self, request: Request) -> int:
        """Blocks of the pool the request holds (its null entries are none)."""
        return sum(1 for block_id in request.block_ids if not self._is_null(block_id))

    def num_allocatable_tokens(self, request: Request) -> int:
        """Tokens past the request's computed ones that its blocks and the free blocks can hold together."""
        return (len(request.block_ids) + self.num_free_blocks) * self.block_size - request.num_computed_tokens

    def free(self, request: Request) -> None:
        """Release the request's blocks; the tail goes to the free queue first, so it is evicted before
        the prefix blocks other requests are more likely to share."""
        for block_id in reversed(request.block_ids):
            if not self._is_null(block_id):
                self._release(block_id)
        request.block_ids = []

    def free_tail(self, request: Request, num_tokens: int) -> None:
        """Release the blocks past the first num_tokens tokens (speculative drafts the verify step rejected). They
        hold no full block of the request's known tokens, so none is in the prefix cache."""
        num_kept = -(-num_tokens // self.block_size)
        for block_id in reversed(request.block_ids[num_kept:]):
            if not self._is_null(block_id):
                self._release(block_id)
        del request.block_ids[num_kept:]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; only possible while no block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            self._evict(block.block_id)
        return True

    def check_invariants(self, requests: list[Request]) -> None:
        """Assert the pool's bookkeeping against the live requests (for tests)."""
        expected = [0] * len(self.blocks)
        for request in requests:
            num_null = sum(1 for block_id in request.block_ids if self._is_null(block_id))
            assert all(map(self._is_null, request.block_ids[:num_null])), request.block_ids  # nulls lead
            assert num_null <= self.num_blocks_behind_window(request.num_computed_tokens), (request, num_null)
            for block_id in request.block_ids[num_null:]:
                expected[block_id] += 1
        if self.sliding_window is not None:
            null = self.blocks[NULL_BLOCK_ID]
            assert null.ref_count == 0 and null.block_hash is None and NULL_BLOCK_ID not in self.free_queue, null
        for block in self.blocks:
            if self._is_null(block.block_id):
                continue
            assert block.ref_count == expected[block.block_id], (block, expected[block.block_id])
            assert (block.ref_count == 0) == (block.block_id in self.free_queue), block
            if block.block_hash is not None:
                assert self.cached.get(block.block_hash) == block.block_id, block
        assert len(self.cached) == sum(1 for b in self.blocks if b.block_hash is not None)

    def _is_null(self, block_id: int) -> bool:
        return self.sliding_window is not None and block_id == NULL_BLOCK_ID

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue[block_id] = None

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def uncache(self, request: Request) -> None:
        """Forget the request's blocks in the prefix cache (a failed step may have written bad K/V into them);
        they stay allocated to it until freed."""
        for block_id in request.block_ids:
            if not self._is_null(block_id):
                self._evict(block_id)

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None:
            del self.cached[block.block_hash]
            block.block_hash = block.block_key = None

    def _cache_full_blocks(self, request: Request, num_full_blocks: int) -> None:
        self._update_block_hashes(request)
        # With asynchronous scheduling a block can fill with a token the host hasn't read yet: it has no hash
        # until then, and the next allocation registers it (the scan below walks back to it).
        num_full_blocks = min(num_full_blocks, len(request.block_hashes))
        # Blocks are registered in order as they fill, so only those after the last registered one can be new:
        # scanning from the end keeps a decode step O(1) per request rather than O(blocks).
        # A null entry ends the scan too: what it stood for was registered before the window freed it, or never is.
        first = num_full_blocks
        while (first > 0 and not self._is_null(request.block_ids[first - 1])
               and self.blocks[request.block_ids[first - 1]].block_hash is None):
            first -= 1
        for index in range(first, num_full_blocks):
            if self._is_null(request.block_ids[index]):
                continue
            block = self.blocks[request.block_ids[index]]
            block_hash = request.block_hashes[index]
            if block.block_hash is not None or block_hash in self.cached:
                continue  # already cached, here or (same tokens computed twice) in another block
            block.block_hash, block.block_key = block_hash, self._block_key(request, index)
            self.cached[block_hash] = block.block_id

    def _block_key(self, request: Request, index: int) -> tuple:
        parent = request.block_hashes[index - 1] if index else _root_hash(request)
        start = index * self.block_size
        return parent, tuple(request.all_token_ids[start:start + self.block_size])

    def _update_block_hashes(self, request: Request) -> None:
        for index in range(len(request.block_hashes), request.num_tokens // self.block_size):
            request.block_hashes.append(hash(self._block_key(request, index)))


def _root_hash(request: Request) -> int | tuple:
    root = _ROOT_HASH if request.lora_adapter is None else ("lora", request.lora_int_id)
    return root if request.cache_salt is None else ("salt", request.cache_salt, root)
