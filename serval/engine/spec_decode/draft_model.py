"""DraftModel: a smaller model sharing the target's tokenizer proposes greedily; its paged KV cache uses the
target's block tables, so one block id holds a position's K/V in both caches and the pool's accounting (allocation,
prefix hits, preemption, rejected drafts freed) covers both. The engine sizes the pool so both caches fit the one
KV memory budget.

Per step, inside the runner: propose() runs k one-token draft steps for the requests with drafts scheduled
(positions T-1 .. T+k-2, slots the scheduler allocated for the verify step), then forward() runs the draft over the
same flat batch as the target, so every position the target computes (prefill chunks, the verify rows) the draft
computes too. After verification the draft's K/V below the computed end is that of the accepted tokens.
"""
from __future__ import annotations

import torch

from serval.engine import sampler
from serval.engine.request import Request
from serval.layers.attention import AttentionMetadata


class DraftModel:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, kv_cache_dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        shape = (2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=kv_cache_dtype, device=device) for _ in range(model.num_layers)]

    @torch.inference_mode()
    def propose(self, requests: list[Request]) -> None:
        """Replace each request's spec_token_ids (placeholders, as many as the scheduler kept) by the draft's
        greedy tokens."""
        num_steps = max((len(request.spec_token_ids) for request in requests), default=0)
        previous = {id(request): request.all_token_ids[-1] for request in requests}
        for j in range(num_steps):
            active = [request for request in requests if len(request.spec_token_ids) > j]
            positions = [request.num_computed_tokens + j for request in active]
            hidden = self._forward([previous[id(request)] for request in active], positions,
                                   list(range(len(active) + 1)), [p + 1 for p in positions], active)
            tokens = self.model.compute_logits(hidden).argmax(dim=-1).tolist()
            for request, token in zip(active, tokens):
                request.spec_token_ids[j] = token
                previous[id(request)] = token

    @torch.inference_mode()
    def forward(self, input_ids: list[int], positions: list[int], query_start_loc: list[int], seq_lens: list[int],
                requests: list[Request]) -> None:
        """The draft's K/V for a flat batch the target runs (the runner's plan)."""
        self._forward(input_ids, positions, query_start_loc, seq_lens, requests)

    def _forward(self, input_ids: list[int], positions: list[int], query_start_loc: list[int],
                 seq_lens: list[int], requests: list[Request]) -> torch.Tensor:
        slots = [self._slot(request, p) for request, start, end in zip(requests, query_start_loc, query_start_loc[1:])
                 for p in positions[start:end]]
        width = max(len(request.block_ids) for request in requests)
        block_tables = [request.block_ids + [0] * (width - len(request.block_ids)) for request in requests]
        metadata = AttentionMetadata(slot_mapping=sampler.to_device(slots, torch.int64, self.device),
                                     query_start_loc=query_start_loc, seq_lens=seq_lens,
                                     block_tables=sampler.to_device(block_tables, torch.int32, self.device),
                                     block_size=self.block_size)
        return self.model(sampler.to_device(input_ids, torch.int64, self.device),
                          sampler.to_device(positions, torch.int64, self.device), self.kv_caches, metadata)

    def _slot(self, request: Request, position: int) -> int:
        return request.block_ids[position // self.block_size] * self.block_size + position % self.block_size
