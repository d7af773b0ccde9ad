"""CUDA graphs of the speculative verify step: every request has exactly Q = k + 1 query rows.

A verify step run eagerly pays the host's launch cost of a few hundred kernels, as a decode step would, and on an
H200 that made speculation slower than plain decoding at batch 1. A verify step whose requests each schedule at
most Q tokens (the last accepted token and up to k drafts, one decoding token, or a short prefill chunk) replays the
graph of the smallest captured batch >= n instead, with every request padded to Q rows:

    rows b*Q .. b*Q+Q-1   request b's L tokens, then Q - L padding rows (token 0, slot -1, its last position)
    seq_lens[b]           first position + Q: the kernel puts row i at position first + i, so real rows keep
                          their own causal range and padding rows after them change nothing
    requests n .. B-1     padding: every row slot -1, seq_len 0 (attention reads no key)
    query_start_loc       arange(B + 1) * Q, fixed at capture, as is max_query_len = Q

A request with fewer drafts than k (a proposer found fewer) is padded, not sent to the eager path: one graph per
batch size serves every mix. The graph computes logits for every padded row into one buffer shared by all sizes;
the step's rows (sampled, prompt logprobs, verified) are gathered from it, so the caller sees forward_logits'
contract. The Triton kernels take every length from the buffers (serval.kernels.triton_attention), and skip slot
-1 on write, which the torch reference does not: these graphs need the Triton backend. On a CPU, tests run the same
buffers eagerly through the Triton interpreter (run() with nothing captured).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from serval.engine import sampler
from serval.engine.spec_decode.padded_graphs import PaddedRows
from serval.kernels import paged_attention as torch_attention
from serval.layers.attention import attention_backend

if TYPE_CHECKING:
    from serval.engine.model_runner import ForwardInputs
    from serval.engine.spec_decode.config import SpeculativeConfig


# Without disable_by_batch_size, verify graphs stop at this batch: each size holds (batch x Q) rows of float32
# logits in its pool, and past a few dozen requests speculation rarely pays (benchmarks/spec_bench.py).
MAX_VERIFY_GRAPH_BATCH = 64


def max_verify_batch(max_num_seqs: int, config: SpeculativeConfig) -> int:
    """The largest batch a verify step can have, bounded for graph memory: steps with disable_by_batch_size
    running requests or more don't speculate."""
    limit = MAX_VERIFY_GRAPH_BATCH if config.disable_by_batch_size is None else config.disable_by_batch_size - 1
    return max(1, min(max_num_seqs, limit))


class VerifyGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int, max_num_seqs: int,
                 max_model_len: int, num_query_tokens: int, device: torch.device) -> None:
        if attention_backend(device) is torch_attention:
            raise ValueError("verify graphs need the Triton attention backend: the torch reference writes the "
                             "padding rows' slot -1 into the cache's last slot")
        self.model = model
        self.kv_caches = kv_caches
        self.rows = PaddedRows(block_size, max_num_seqs, max_model_len, num_query_tokens, device)
        self.num_query_tokens = num_query_tokens
        self.max_batch = self.rows.max_batch
        self.graphs = self.rows.graphs
        self.logits: torch.Tensor | None = None  # [max_batch * Q, vocab] float32, written by every graph
        self.device = device

    def can_run(self, query_start_loc: list[int]) -> bool:
        num_requests = len(query_start_loc) - 1
        return (0 < num_requests <= self.max_batch
                and all(end - start <= self.num_query_tokens for start, end in zip(query_start_loc,
                                                                                   query_start_loc[1:])))

    @torch.inference_mode()
    def run(self, inputs: ForwardInputs) -> torch.Tensor:
        """float32 logits [len(inputs.logits_rows), vocab] of the step, by graph replay (or, with no graph
        captured, by the same padded forward run eagerly): ModelRunner.forward_logits' contract."""
        batch = self.rows.batch_for(len(inputs.seq_lens))
        padded_rows = self.rows.fill(inputs.query_start_loc, inputs.input_ids, inputs.positions, inputs.slot_mapping,
                                     inputs.seq_lens, inputs.block_tables, batch)
        self.rows.replay(batch, self._forward)
        rows = inputs.logits_rows
        if not isinstance(padded_rows, range):  # a range: every flat row is its own padded row
            rows = [padded_rows[row] for row in rows]
        if rows and rows == list(range(rows[0], rows[0] + len(rows))):
            # Every row of every request in order (each verifies k drafts, nothing else): a view of the buffer,
            # with no index copy to the device and no gather between the replay and the sampler.
            return self.logits[rows[0]:rows[0] + len(rows)]
        return self.logits.index_select(0, sampler.to_device(rows, torch.int64, self.device))

    @torch.inference_mode()
    def capture(self) -> None:
        self.rows.capture(self._forward, self.model, "verify")

    def _forward(self, batch: int) -> None:
        """The padded forward of `batch` requests from the input buffers into self.logits; what a graph holds."""
        num_rows = batch * self.num_query_tokens
        hidden = self.model(self.rows.view("input_ids", num_rows), self.rows.view("positions", num_rows),
                            self.kv_caches, self.rows.metadata(batch))
        logits = self.model.compute_logits(hidden)
        if self.logits is None:  # on the first (largest) warm-up, outside any capture
            self.logits = torch.empty(self.max_batch * self.num_query_tokens, logits.shape[-1],
                                      dtype=logits.dtype, device=logits.device)
        self.logits[:num_rows].copy_(logits)
