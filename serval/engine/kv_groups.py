"""Hybrid KV cache: models that mix sliding-window and full-attention layers (Gemma 3, gpt-oss), as vLLM V1's
hybrid KV cache manager does it.

The attention layers are split into KV cache groups of equal size, each of one attention type (full, or sliding
with window W). Every group has its own block table per request, so a sliding group frees the blocks behind its
window (NULL_BLOCK_ID in their place, as serval.engine.kv_cache does for all-sliding models) while a full group
keeps them all. The storage is shared: there are only group_size cache tensors, and layer j of every group writes
tensor j, so a block id costs one group's layers, not the model's. Gemma 3 270M (15 sliding + 3 full layers):

    groups:   full [5, 11, 17]   sliding [0, 1, 2]   sliding [3, 4, 6]   ...   sliding [14, 15, 16]
    tensors:  tensor 0 <- layers 5, 0, 3, ..., 14;  tensor 1 <- 11, 1, 4, ..., 15;  tensor 2 <- 17, 2, 6, ..., 16

One pool of block ids serves every group: a block belongs to one group at a time, whose layers alone write it.
Each Attention layer knows its group (kv_cache_group) and reads that group's slot mapping and block table from
AttentionMetadata.kv_groups. A prefix hit must be a hit in every group: the longest n blocks that every full group
has cached and whose blocks inside the window of position n * block_size every sliding group has cached.
"""
from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from serval.engine.kv_cache import NULL_BLOCK_ID, Block, _root_hash
from serval.engine.request import Request
from serval.layers.attention import Attention, AttentionMetadata


@dataclass(frozen=True)
class KVCacheGroup:
    sliding_window: int | None  # None: full attention
    layer_indices: tuple[int, ...]  # the model's layers (attention layers in order) whose K/V this group holds


@dataclass(frozen=True)
class KVCacheLayout:
    """How the model's layers share the cache: groups of group_size layers, layer i in group layer_group[i], writing
    the shared tensor layer_slot[i]."""
    groups: tuple[KVCacheGroup, ...]
    group_size: int
    layer_group: tuple[int, ...]
    layer_slot: tuple[int, ...]

    @property
    def num_groups(self) -> int:
        return len(self.groups)


def hybrid_kv_layout(model) -> KVCacheLayout | None:
    """The groups of a model that mixes full and sliding-window attention layers; None for any other model (one
    attention type, or layers that aren't all serval.layers.attention.Attention), which keeps one block table."""
    windows = [module.sliding_window for module in model.modules() if isinstance(module, Attention)]
    if len(windows) != getattr(model, "num_layers", -1) or None not in windows or set(windows) == {None}:
        return None
    layers_of: dict[int | None, list[int]] = {None: []}  # full first: group 0 is a full group
    for index, window in enumerate(windows):
        layers_of.setdefault(window, []).append(index)
    # The gcd makes every type split into whole groups, so no tensor slot is left unused by any group.
    group_size = math.gcd(*(len(layers) for layers in layers_of.values()))
    groups = tuple(KVCacheGroup(window, tuple(layers[start:start + group_size]))
                   for window, layers in layers_of.items() for start in range(0, len(layers), group_size))
    layer_group, layer_slot = [0] * len(windows), [0] * len(windows)
    for group_index, group in enumerate(groups):
        for slot, layer in enumerate(group.layer_indices):
            layer_group[layer], layer_slot[layer] = group_index, slot
    return KVCacheLayout(groups, group_size, tuple(layer_group), tuple(layer_slot))


def shared_kv_caches(layout: KVCacheLayout, shape: tuple[int, ...], dtype: torch.dtype,
                     device: torch.device) -> list[torch.Tensor]:
    """One cache per layer, as the models take them, where layers of different groups share a tensor (the same
    object, so memory accounting that dedups tensors counts it once)."""
    tensors = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layout.group_size)]
    return [tensors[slot] for slot in layout.layer_slot]


def assign_kv_cache_groups(model, layout: KVCacheLayout) -> None:
    """Each Attention layer reads its group's slot mapping and block table (Attention.kv_cache_group)."""
    layers = [module for module in model.modules() if isinstance(module, Attention)]
    for layer, group_index in zip(layers, layout.layer_group, strict=True):
        layer.kv_cache_group = group_index


def with_group_metadata(metadata: AttentionMetadata, slot_mappings: list[torch.Tensor],
                        block_tables: list[torch.Tensor]) -> AttentionMetadata:
    """metadata with one AttentionMetadata per group in kv_groups: the group's slots and block table, the step's
    lengths shared (derived once, not per group)."""
    metadata.kv_groups = [dataclasses.replace(metadata, slot_mapping=slots, block_tables=table)
                          for slots, table in zip(slot_mappings, block_tables, strict=True)]
    return metadata


def num_blocks_behind_window(first_query_position: int, sliding_window: int | None, block_size: int) -> int:
    """Leading blocks whose every position is outside the window of a query at first_query_position (a query at p
    sees keys p - sliding_window < k <= p); 0 for full attention."""
    if sliding_window is None:
        return 0
    return max(first_query_position - sliding_window + 1, 0) // block_size


def max_blocks_per_sequence(layout: KVCacheLayout, max_model_len: int, block_size: int,
                            max_num_batched_tokens: int) -> int:
    """The most blocks one sequence can hold at once, all groups together: a full group every block of
    max_model_len; a sliding group the window's blocks plus one step's chunk (its queries see back a window from
    the chunk's first position), plus one for the block the window's edge straddles."""
    num_positional = -(-max_model_len // block_size)
    return sum(num_positional if group.sliding_window is None else
               min(num_positional, -(-(group.sliding_window - 1 + max_num_batched_tokens) // block_size) + 1)
               for group in layout.groups)


def group_slots(block_ids: list[int], block_size: int, start: int, end: int) -> list[int]:
    """The cache slots of positions [start, end) through one block table."""
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


@dataclass
class HybridPrefixHit:
    """find_cached_prefix's answer: the request's first len(self) blocks, cached in every group (sliding groups'
    lists start with null blocks for what their window has left behind)."""
    block_ids: list[list[int]]  # per group, the same length

    def __len__(self) -> int:
        return len(self.block_ids[0])


class HybridKVCacheManager:
    """KVCacheManager's interface (the scheduler's calls) over one block table per KV cache group.
    request.kv_group_block_ids holds the tables; request.block_ids stays empty."""

    def __init__(self, num_blocks: int, block_size: int, groups: tuple[KVCacheGroup, ...],
                 enable_prefix_caching: bool = True) -> None:
        """num_blocks: the pool's size, one of them the null block; self.num_blocks are what requests can hold."""
        self.windows = [group.sliding_window for group in groups]
        self.sliding_window = None  # no single window: KVCacheManager's attribute, for callers that read it
        self.num_blocks = num_blocks - 1
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))  # front: evict first
        self.cached: dict[tuple[int, int], int] = {}  # (group, block hash) -> block id
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def find_cached_prefix(self, request: Request) -> HybridPrefixHit | list:
        """The most blocks n, full blocks only and at least one token left to compute, that every full group has
        cached and whose blocks inside the window of position n * block_size every sliding group has cached."""
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return []
        self._update_block_hashes(request)
        limit = min(len(request.block_hashes), (request.num_tokens - 1) // self.block_size)
        found: list[list[int | None]] = []
        for group, window in enumerate(self.windows):
            ids = []
            for index in range(limit):
                ids.append(self._cached_block_id(request, group, index))
                if window is None and ids[-1] is None:
                    limit = index
                    break
            found.append(ids)
        # run_starts[g][n]: where the run of cached blocks that ends at block n - 1 starts, in sliding group g.
        run_starts = {}
        for group, window in enumerate(self.windows):
            if window is not None:
                starts = [0]
                for index, block_id in enumerate(found[group][:limit]):
                    starts.append(index + 1 if block_id is None else starts[-1])
                run_starts[group] = starts
        num_hits = limit
        while num_hits > 0 and not all(
                starts[num_hits] <= self._num_behind(num_hits * self.block_size, group)
                for group, starts in run_starts.items()):
            num_hits -= 1
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_hits * self.block_size
        if num_hits == 0:
            return []
        hits = []
        for group, ids in enumerate(found):
            num_behind = self._num_behind(num_hits * self.block_size, group)
            hits.append([NULL_BLOCK_ID] * num_behind + ids[num_behind:num_hits])
        return HybridPrefixHit(hits)

    def allocate(self, request: Request, num_new_tokens: int, cached: HybridPrefixHit | list | tuple = ()) -> bool:
        """KVCacheManager.allocate per group: each group's table covers the cached prefix plus num_new_tokens more,
        every group's new blocks from the one pool; False (and no change but the freeing) if the pool can't."""
        if not request.kv_group_block_ids:
            request.kv_group_block_ids = [[] for _ in self.windows]
        tables = request.kv_group_block_ids
        for group in range(self.num_groups):
            self._free_behind_window(request, group)
        num_hits = len(cached)
        hits = cached.block_ids if num_hits else [[] for _ in self.windows]
        num_tokens_after = request.num_computed_tokens + num_hits * self.block_size + num_new_tokens
        num_blocks_after = -(-num_tokens_after // self.block_size)
        num_needed = [max(num_blocks_after - len(table) - num_hits, 0) for table in tables]
        num_cached_free = sum(1 for ids in hits for block_id in ids
                              if block_id != NULL_BLOCK_ID and self.blocks[block_id].ref_count == 0)
        if sum(num_needed) > self.num_free_blocks - num_cached_free:
            return False
        for table, ids, count in zip(tables, hits, num_needed):
            for block_id in ids:
                if block_id != NULL_BLOCK_ID:
                    self._take(block_id)
            table.extend(ids)
            for _ in range(count):
                block_id = next(iter(self.free_queue))
                self._take(block_id)
                self._evict(block_id)
                table.append(block_id)
        if self.enable_prefix_caching:
            for group in range(self.num_groups):
                self._cache_full_blocks(request, group, num_tokens_after // self.block_size)
        return True

    def _num_behind(self, first_query_position: int, group: int) -> int:
        return num_blocks_behind_window(first_query_position, self.windows[group], self.block_size)

    def _free_behind_window(self, request: Request, group: int) -> None:
        """Release the group's held blocks no query from request.num_computed_tokens on can see; null in their
        place. Nulls are a prefix of the table, so the scan stops at the first one it meets, walking back."""
        table = request.kv_group_block_ids[group]
        end = min(self._num_behind(request.num_computed_tokens, group), len(table))
        first = end
        while first > 0 and table[first - 1] != NULL_BLOCK_ID:
            first -= 1
        for index in range(first, end):
            self._release(table[index])
            table[index] = NULL_BLOCK_ID

    def held_blocks_per_group(self, request: Request) -> list[int]:
        """Blocks of the pool the request holds in each group (null entries are none)."""
        return [sum(1 for block_id in table if block_id != NULL_BLOCK_ID) for table in request.kv_group_block_ids]

    def num_held_blocks(self, request: Request) -> int:
        return sum(self.held_blocks_per_group(request))

    def num_allocatable_tokens(self, request: Request) -> int:
        """A lower bound on the tokens past the computed ones the request's blocks and the free blocks can hold:
        each new block of positions may cost one block in every group."""
        num_positional = len(request.kv_group_block_ids[0]) if request.kv_group_block_ids else 0
        return (num_positional + self.num_free_blocks // self.num_groups) * self.block_size \
            - request.num_computed_tokens

    def free(self, request: Request) -> None:
        """Release every group's blocks, each table's tail first (evicted before the prefix others may share)."""
        for table in request.kv_group_block_ids:
            for block_id in reversed(table):
                if block_id != NULL_BLOCK_ID:
                    self._release(block_id)
        request.kv_group_block_ids = []

    def free_tail(self, request: Request, num_tokens: int) -> None:
        """Release the blocks past the first num_tokens tokens in every group (rejected speculative drafts)."""
        num_kept = -(-num_tokens // self.block_size)
        for table in request.kv_group_block_ids:
            for block_id in reversed(table[num_kept:]):
                if block_id != NULL_BLOCK_ID:
                    self._release(block_id)
            del table[num_kept:]

    def reset_prefix_cache(self) -> bool:
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            self._evict(block.block_id)
        return True

    def uncache(self, request: Request) -> None:
        for table in request.kv_group_block_ids:
            for block_id in table:
                if block_id != NULL_BLOCK_ID:
                    self._evict(block_id)

    def check_invariants(self, requests: list[Request]) -> None:
        """Assert the pool's bookkeeping against the live requests (for tests)."""
        expected = [0] * len(self.blocks)
        for request in requests:
            assert not request.block_ids, request.block_ids
            for group, table in enumerate(request.kv_group_block_ids):
                num_null = sum(1 for block_id in table if block_id == NULL_BLOCK_ID)
                assert all(block_id == NULL_BLOCK_ID for block_id in table[:num_null]), table  # nulls lead
                assert num_null <= self._num_behind(request.num_computed_tokens, group), (request, group, table)
                for block_id in table[num_null:]:
                    expected[block_id] += 1
        null = self.blocks[NULL_BLOCK_ID]
        assert null.ref_count == 0 and null.block_hash is None and NULL_BLOCK_ID not in self.free_queue, null
        for block in self.blocks[1:]:
            assert block.ref_count == expected[block.block_id], (block, expected[block.block_id])
            assert (block.ref_count == 0) == (block.block_id in self.free_queue), block
            if block.block_hash is not None:
                assert self.cached.get((block.block_key[0], block.block_hash)) == block.block_id, block
        assert len(self.cached) == sum(1 for block in self.blocks if block.block_hash is not None)

    def _cached_block_id(self, request: Request, group: int, index: int) -> int | None:
        block_id = self.cached.get((group, request.block_hashes[index]))
        if block_id is None or self.blocks[block_id].block_key != self._block_key(request, group, index):
            return None
        return block_id

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

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None:
            del self.cached[(block.block_key[0], block.block_hash)]
            block.block_hash = block.block_key = None

    def _cache_full_blocks(self, request: Request, group: int, num_full_blocks: int) -> None:
        """KVCacheManager._cache_full_blocks for one group's table (see there for the backward scan)."""
        self._update_block_hashes(request)
        table = request.kv_group_block_ids[group]
        num_full_blocks = min(num_full_blocks, len(request.block_hashes))
        first = num_full_blocks
        while (first > 0 and table[first - 1] != NULL_BLOCK_ID
               and self.blocks[table[first - 1]].block_hash is None):
            first -= 1
        for index in range(first, num_full_blocks):
            if table[index] == NULL_BLOCK_ID:
                continue
            block = self.blocks[table[index]]
            block_hash = request.block_hashes[index]
            if block.block_hash is not None or (group, block_hash) in self.cached:
                continue
            block.block_hash, block.block_key = block_hash, self._block_key(request, group, index)
            self.cached[(group, block_hash)] = block.block_id

    def _block_key(self, request: Request, group: int, index: int) -> tuple:
        parent = request.block_hashes[index - 1] if index else _root_hash(request)
        start = index * self.block_size
        return group, parent, tuple(request.all_token_ids[start:start + self.block_size])

    def _update_block_hashes(self, request: Request) -> None:
        """The same chained hashes as KVCacheManager's (the group is part of the cache's key, not the hash)."""
        for index in range(len(request.block_hashes), request.num_tokens // self.block_size):
            parent = request.block_hashes[index - 1] if index else _root_hash(request)
            start = index * self.block_size
            request.block_hashes.append(hash((parent, tuple(request.all_token_ids[start:start + self.block_size]))))
