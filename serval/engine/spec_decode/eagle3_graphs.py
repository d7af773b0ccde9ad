"""CUDA graphs of the EAGLE-3 head's own steps: its pass over the target's kept rows and its chain steps.

Eager, a head step launches a few dozen small kernels (one decoder layer, the LM head, the argmax) for a few rows,
so at batch 1 the host's launch cost dominates it, k times a step. Each graph here holds the head's forward and its
greedy drafts for B requests of exactly Q query rows each, read from fixed buffers, padded as the target's verify
graphs are (serval.engine.spec_decode.verify_graphs):

    rows b*Q .. b*Q+Q-1   request b's L rows, then Q - L padding rows (token 0, slot -1, its last position)
    seq_lens[b]           first position + Q: the kernel puts row i at position first + i
    requests n .. B-1     padding: every row slot -1, seq_len 0 (attention reads no key)
    hidden[b*Q + i]       row i's input hidden state (padding rows keep stale values: they write nowhere)

Two sets are captured, one graph per batch size of the ladder each: Q = 1 for the chain steps (draft j + 1 from
draft j and the head's own pre-norm output) and for the pass after a step in which every request computed one row
(plain decodes); Q = k + 1 for the pass after a verify step (its first row and one more per accepted draft: 1..k+1
rows a request, padded to k + 1, one graph per size serving every mix of acceptances). A pass over a prefill chunk
longer than k + 1 rows runs eagerly. fc, which fuses the target's three hidden states, runs before the replay: one
matmul over the kept rows, scattered into the padded rows. The Triton kernels skip slot -1 on write, which the torch
reference does not, so these graphs need the Triton backend; on a CPU, tests run the same buffers eagerly through
the Triton interpreter (run() with nothing captured).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from serval.engine import sampler
from serval.engine.request import Request
from serval.engine.spec_decode.draft_model import slot_of
from serval.engine.spec_decode.padded_graphs import PaddedRows
from serval.kernels import paged_attention as torch_attention
from serval.layers.attention import attention_backend


@dataclass
class HeadStep:
    """One head step's flat batch: request i's rows are query_start_loc[i]:[i + 1], at consecutive positions."""
    input_ids: list[int]
    positions: list[int]
    query_start_loc: list[int]
    seq_lens: list[int]  # each request's context including this step's rows
    requests: list[Request]
    hidden: torch.Tensor  # [rows, hidden]: each row's input hidden state (fused target states or a chain's own)


@dataclass
class HeadDrafts:
    """What a head step gives back for the rows asked for: their greedy drafts (target ids) and pre-norm outputs."""
    token_ids: list[int]
    prenorm: torch.Tensor  # [rows asked for, hidden], a tensor of its own (no graph buffer behind it)


class HeadGraphs:
    def __init__(self, head: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int, max_num_seqs: int,
                 max_model_len: int, num_query_tokens: int, device: torch.device) -> None:
        if attention_backend(device) is torch_attention:
            raise ValueError("EAGLE-3 head graphs need the Triton attention backend: the torch reference writes the "
                             "padding rows' slot -1 into the cache's last slot")
        self.head = head
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.rows = PaddedRows(block_size, max_num_seqs, max_model_len, num_query_tokens, device)
        self.num_query_tokens = num_query_tokens
        self.max_batch = self.rows.max_batch
        self.graphs = self.rows.graphs
        weight = head.fc.weight
        self.hidden = torch.zeros(self.rows.max_rows, head.config.hidden_size, dtype=weight.dtype, device=device)
        # Written by every graph: each padded row's draft (a target id) and pre-norm output.
        self.draft_ids = torch.zeros(self.rows.max_rows, dtype=torch.int64, device=device)
        self.prenorm = torch.zeros(self.rows.max_rows, head.config.hidden_size, dtype=weight.dtype, device=device)
        self.device = device

    def can_run(self, query_start_loc: list[int]) -> bool:
        num_requests = len(query_start_loc) - 1
        return (0 < num_requests <= self.max_batch
                and all(0 < end - start <= self.num_query_tokens
                        for start, end in zip(query_start_loc, query_start_loc[1:])))

    @torch.inference_mode()
    def run(self, step: HeadStep, draft_rows: list[int]) -> HeadDrafts:
        """The drafts and pre-norm outputs of the step's flat rows draft_rows, by graph replay (or, with no graph
        captured, by the same padded forward run eagerly)."""
        batch = self.rows.batch_for(len(step.requests))
        starts = step.query_start_loc
        slot_mapping = [slot_of(request, position, self.block_size)
                        for request, start, end in zip(step.requests, starts, starts[1:])
                        for position in step.positions[start:end]]
        padded_rows = self.rows.fill(starts, step.input_ids, step.positions, slot_mapping, step.seq_lens,
                                     [request.block_ids for request in step.requests], batch)
        rows = sampler.to_device(padded_rows, torch.int64, self.device)
        self.hidden.index_copy_(0, rows, step.hidden.to(self.hidden.dtype))
        self.rows.replay(batch, self._forward)
        wanted = sampler.to_device([padded_rows[row] for row in draft_rows], torch.int64, self.device)
        return HeadDrafts(self.draft_ids.index_select(0, wanted).tolist(), self.prenorm.index_select(0, wanted))

    @torch.inference_mode()
    def capture(self) -> None:
        self.rows.capture(self._forward, self.head, "eagle3 head")

    def _forward(self, batch: int) -> None:
        """The padded head step of `batch` requests from the input buffers into the output buffers: what a graph
        holds."""
        num_rows = batch * self.num_query_tokens
        normed, prenorm = self.head(self.rows.view("input_ids", num_rows), self.rows.view("positions", num_rows),
                                    self.hidden[:num_rows], self.kv_caches, self.rows.metadata(batch))
        self.draft_ids[:num_rows].copy_(self.head.draft_token_ids(normed))
        self.prenorm[:num_rows].copy_(prenorm)
