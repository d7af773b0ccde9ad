"""DraftModel: a smaller model sharing the target's tokenizer proposes greedily; its paged KV cache uses the
target's block tables, so one block id holds a position's K/V in both caches and the pool's accounting (allocation,
prefix hits, preemption, rejected drafts freed) covers both. The engine sizes the pool so both caches fit the one
KV memory budget.

Per step, inside the runner: propose() runs k one-token draft steps for the requests with drafts scheduled
(positions T-1 .. T+k-2, slots the scheduler allocated for the verify step), then forward() runs the draft over the
rest of the target's flat batch, so every position the target computes the draft computes too: prefill chunks whole,
a decoding request's one row, a verifying request's last row (its last draft, T+k-1). After verification the
draft's K/V below the computed end is that of the accepted tokens. A step of one row a request (every draft step,
and forward() when nobody prefills) replays the draft's own decode graphs (serval.engine.cuda_graphs) on CUDA.
"""
from __future__ import annotations

import torch

from serval.engine import sampler
from serval.engine.cuda_graphs import DecodeGraphs
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
        self.graphs: DecodeGraphs | None = None

    def capture_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Capture decode graphs of the draft over its own cache (the runner calls this on CUDA only)."""
        if getattr(self.model, "supports_cuda_graphs", True):
            self.graphs = DecodeGraphs(self.model, self.kv_caches, self.block_size, max_num_seqs, max_model_len,
                                       self.device)
            self.graphs.capture()

    @torch.inference_mode()
    def propose(self, requests: list[Request]) -> None:
        """Replace each request's spec_token_ids (placeholders, as many as the scheduler kept) by the draft's
        greedy tokens."""
        num_steps = max((len(request.spec_token_ids) for request in requests), default=0)
        previous = {id(request): request.all_token_ids[-1] for request in requests}
        for j in range(num_steps):
            active = [request for request in requests if len(request.spec_token_ids) > j]
            positions = [request.num_computed_tokens + j for request in active]
            logits = self._decode_logits([previous[id(request)] for request in active], positions, active)
            tokens = logits.argmax(dim=-1).tolist()
            for request, token in zip(active, tokens):
                request.spec_token_ids[j] = token
                previous[id(request)] = token

    @torch.inference_mode()
    def forward(self, input_ids: list[int], positions: list[int], query_start_loc: list[int], seq_lens: list[int],
                requests: list[Request]) -> None:
        """The draft's K/V for a flat batch the target runs (the runner's plan), less the rows propose() computed:
        a request verifying d drafts has rows T-1 .. T+d-1, of which propose wrote the first d."""
        rest_ids, rest_positions, rest_starts = [], [], [0]
        for request, start, end, seq_len in zip(requests, query_start_loc, query_start_loc[1:], seq_lens):
            first = start + max(seq_len - request.num_tokens, 0)
            rest_ids += input_ids[first:end]
            rest_positions += positions[first:end]
            rest_starts.append(rest_starts[-1] + end - first)
        if len(rest_ids) == len(requests):
            self._decode_logits(rest_ids, rest_positions, requests, compute_logits=False)
        else:
            self._forward(rest_ids, rest_positions, rest_starts, seq_lens, requests)

    def _decode_logits(self, input_ids: list[int], positions: list[int], requests: list[Request],
                       compute_logits: bool = True) -> torch.Tensor | None:
        """One token a request at its position: logits [n, vocab] (a graph replay where one is captured)."""
        seq_lens = [p + 1 for p in positions]
        if self.graphs is not None and self.graphs.can_run(len(requests)):
            slots = [slot_of(request, p, self.block_size) for request, p in zip(requests, positions)]
            return self.graphs.run(input_ids, positions, slots, seq_lens, [request.block_ids for request in requests])
        hidden = self._forward(input_ids, positions, list(range(len(requests) + 1)), seq_lens, requests)
        return self.model.compute_logits(hidden) if compute_logits else None

    def _forward(self, input_ids: list[int], positions: list[int], query_start_loc: list[int],
                 seq_lens: list[int], requests: list[Request]) -> torch.Tensor:
        metadata = flat_batch_metadata(requests, positions, query_start_loc, seq_lens, self.block_size, self.device)
        return self.model(sampler.to_device(input_ids, torch.int64, self.device),
                          sampler.to_device(positions, torch.int64, self.device), self.kv_caches, metadata)


def slot_of(request: Request, position: int, block_size: int) -> int:
    return request.block_ids[position // block_size] * block_size + position % block_size


def flat_batch_metadata(requests: list[Request], positions: list[int], query_start_loc: list[int],
                        seq_lens: list[int], block_size: int, device: torch.device) -> AttentionMetadata:
    """Attention metadata of a drafter's flat batch over the target's block ids (a draft model's or an EAGLE-3
    head's own cache): each row's slot from its request's blocks, the block tables padded to the widest."""
    slots = [slot_of(request, p, block_size) for request, start, end in zip(requests, query_start_loc,
                                                                            query_start_loc[1:])
             for p in positions[start:end]]
    width = max(len(request.block_ids) for request in requests)
    block_tables = [request.block_ids + [0] * (width - len(request.block_ids)) for request in requests]
    return AttentionMetadata(slot_mapping=sampler.to_device(slots, torch.int64, device),
                             query_start_loc=query_start_loc, seq_lens=seq_lens,
                             block_tables=sampler.to_device(block_tables, torch.int32, device), block_size=block_size)
