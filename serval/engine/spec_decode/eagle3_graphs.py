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

import logging
import time
from dataclasses import dataclass

import torch

from serval.engine import sampler
from serval.engine.cuda_graphs import capture_sizes
from serval.engine.request import Request
from serval.engine.spec_decode.draft_model import slot_of
from serval.kernels import paged_attention as torch_attention
from serval.layers.attention import AttentionMetadata, attention_backend
from serval.layers.quant.kv_scales import kv_scales_frozen

logger = logging.getLogger(__name__)


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
        self.num_query_tokens = num_query_tokens
        self.sizes = capture_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        # Padding rows sit up to Q - 1 positions past a request's end: room for their (never read) table entries.
        self.max_blocks = -(-(max_model_len + num_query_tokens) // block_size)
        max_rows = self.max_batch * num_query_tokens
        # One int32 buffer holds every integer input, so a step needs one host-to-device copy (as DecodeGraphs).
        self._layout = {"input_ids": 0, "positions": max_rows, "slot_mapping": 2 * max_rows,
                        "seq_lens": 3 * max_rows, "block_tables": 3 * max_rows + self.max_batch}
        size = self._layout["block_tables"] + self.max_batch * self.max_blocks
        # One staging buffer: the host reads each head step's drafts before it fills the next step's inputs.
        self._staging = torch.zeros(size, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.inputs = torch.zeros(size, dtype=torch.int32, device=device)
        weight = head.fc.weight
        self.hidden = torch.zeros(max_rows, head.config.hidden_size, dtype=weight.dtype, device=device)
        self.query_start_loc = torch.arange(self.max_batch + 1, dtype=torch.int32, device=device) * num_query_tokens
        self._seq_lens_host = [0] * self.max_batch  # this step's, for AttentionMetadata's host fields
        # Written by every graph: each padded row's draft (a target id) and pre-norm output.
        self.draft_ids = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.prenorm = torch.zeros(max_rows, head.config.hidden_size, dtype=weight.dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
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
        batch = next(size for size in self.sizes if size >= len(step.requests))
        padded_rows = self._fill(step, batch)
        rows = sampler.to_device(padded_rows, torch.int64, self.device)
        self.hidden.index_copy_(0, rows, step.hidden.to(self.hidden.dtype))
        if batch in self.graphs:
            self.graphs[batch].replay()
        else:
            self._forward(batch)
        wanted = sampler.to_device([padded_rows[row] for row in draft_rows], torch.int64, self.device)
        return HeadDrafts(self.draft_ids.index_select(0, wanted).tolist(), self.prenorm.index_select(0, wanted))

    @torch.inference_mode()
    def capture(self) -> None:
        started = time.monotonic()
        self._write(self._staging.numpy(), [], [], [], [], self.max_batch)
        self._copy_to_device(self.max_batch)
        torch.cuda.synchronize()
        pool = None
        with kv_scales_frozen(self.head):
            for batch in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
                for _ in range(2):  # warm-up: Triton compiles and cuBLAS picks its kernels outside the capture
                    self._forward(batch)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._forward(batch)
                pool = graph.pool()
                self.graphs[batch] = graph
        torch.cuda.synchronize()
        logger.info("eagle3 head cuda graphs captured", extra={"batch_sizes": len(self.sizes),
                                                               "max_batch": self.max_batch,
                                                               "query_tokens": self.num_query_tokens,
                                                               "seconds": round(time.monotonic() - started, 2)})

    def _view(self, name: str, length: int) -> torch.Tensor:
        start = self._layout[name]
        if name == "block_tables":
            return self.inputs[start:start + length * self.max_blocks].view(length, self.max_blocks)
        return self.inputs[start:start + length]

    def _forward(self, batch: int) -> None:
        """The padded head step of `batch` requests from the input buffers into the output buffers: what a graph
        holds."""
        num_rows = batch * self.num_query_tokens
        seq_lens = self._seq_lens_host[:batch]
        metadata = AttentionMetadata(
            slot_mapping=self._view("slot_mapping", num_rows),
            query_start_loc=list(range(0, num_rows + 1, self.num_query_tokens)), seq_lens=seq_lens,
            block_tables=self._view("block_tables", batch), block_size=self.block_size,
            max_query_len=self.num_query_tokens, max_seq_len=max(max(seq_lens), 1),
            seq_lens_tensor=self._view("seq_lens", batch), query_start_loc_tensor=self.query_start_loc[:batch + 1])
        normed, prenorm = self.head(self._view("input_ids", num_rows), self._view("positions", num_rows),
                                    self.hidden[:num_rows], self.kv_caches, metadata)
        self.draft_ids[:num_rows].copy_(self.head.draft_token_ids(normed))
        self.prenorm[:num_rows].copy_(prenorm)

    def _fill(self, step: HeadStep, batch: int) -> list[int]:
        """Write the step's integer inputs, padded, into the buffers; return each flat row's padded row."""
        width = self.num_query_tokens
        input_ids, positions, slot_mapping, seq_lens, padded_rows = [], [], [], [], []
        starts = step.query_start_loc
        for b, (request, start, end) in enumerate(zip(step.requests, starts, starts[1:])):
            padding = width - (end - start)
            input_ids += step.input_ids[start:end] + [0] * padding
            positions += step.positions[start:end] + [step.positions[end - 1]] * padding
            slot_mapping += [slot_of(request, p, self.block_size) for p in step.positions[start:end]]
            slot_mapping += [-1] * padding
            seq_lens.append(step.seq_lens[b] + padding)
            padded_rows += range(b * width, b * width + end - start)
        staging = self._staging.numpy()
        self._write(staging, input_ids, positions, slot_mapping, seq_lens, batch)
        table_start = self._layout["block_tables"]
        table = staging[table_start:table_start + batch * self.max_blocks].reshape(batch, self.max_blocks)
        # Entries past a request's blocks keep earlier steps' ids: valid blocks, and no visible key reads them.
        for b, request in enumerate(step.requests):
            table[b, :len(request.block_ids)] = request.block_ids
        self._copy_to_device(batch)
        return padded_rows

    def _write(self, staging, input_ids: list[int], positions: list[int], slot_mapping: list[int],
               seq_lens: list[int], batch: int) -> None:
        num_rows = batch * self.num_query_tokens
        for name, values, fill in (("input_ids", input_ids, 0), ("positions", positions, 0),
                                   ("slot_mapping", slot_mapping, -1)):
            start = self._layout[name]
            staging[start:start + len(values)] = values
            staging[start + len(values):start + num_rows] = fill
        start = self._layout["seq_lens"]
        staging[start:start + len(seq_lens)] = seq_lens
        staging[start + len(seq_lens):start + batch] = 0
        self._seq_lens_host[:batch] = seq_lens + [0] * (batch - len(seq_lens))

    def _copy_to_device(self, batch: int) -> None:
        # Every vector is copied whole (its rows past this batch are stale and unread); the table only to this batch.
        end = self._layout["block_tables"] + batch * self.max_blocks
        self.inputs[:end].copy_(self._staging[:end], non_blocking=True)

