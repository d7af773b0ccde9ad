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

import logging
import time
from typing import TYPE_CHECKING

import torch

from serval.engine import sampler
from serval.engine.cuda_graphs import capture_sizes
from serval.kernels import paged_attention as torch_attention
from serval.layers.attention import AttentionMetadata, attention_backend
from serval.layers.quant.kv_scales import kv_scales_frozen

if TYPE_CHECKING:
    from serval.engine.model_runner import ForwardInputs
    from serval.engine.spec_decode.config import SpeculativeConfig

logger = logging.getLogger(__name__)

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
        self.block_size = block_size
        self.num_query_tokens = num_query_tokens
        self.sizes = capture_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        # Padding rows sit up to Q - 1 positions past a request's end: room for their (never read) table entries.
        self.max_blocks = -(-(max_model_len + num_query_tokens) // block_size)
        max_rows = self.max_batch * num_query_tokens
        # One int32 buffer holds every input, so a step needs one host-to-device copy (as DecodeGraphs).
        self._layout = {"input_ids": 0, "positions": max_rows, "slot_mapping": 2 * max_rows,
                        "seq_lens": 3 * max_rows, "block_tables": 3 * max_rows + self.max_batch}
        size = self._layout["block_tables"] + self.max_batch * self.max_blocks
        # One staging buffer: speculation runs no asynchronous steps, the host reads each step's tokens first.
        self._staging = torch.zeros(size, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.inputs = torch.zeros(size, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(self.max_batch + 1, dtype=torch.int32, device=device) * num_query_tokens
        self._seq_lens_host = [0] * self.max_batch  # this step's, for AttentionMetadata's host fields
        self.logits: torch.Tensor | None = None  # [max_batch * Q, vocab] float32, written by every graph
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
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
        num_requests = len(inputs.seq_lens)
        batch = next(size for size in self.sizes if size >= num_requests)
        padded_rows = self._fill(inputs, batch)
        if batch in self.graphs:
            self.graphs[batch].replay()
        else:
            self._forward(batch)
        rows = sampler.to_device([padded_rows[row] for row in inputs.logits_rows], torch.int64, self.device)
        return self.logits.index_select(0, rows)

    @torch.inference_mode()
    def capture(self) -> None:
        started = time.monotonic()
        self._fill_padding(self.max_batch)
        torch.cuda.synchronize()
        pool = None
        with kv_scales_frozen(self.model):
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
        logger.info("verify cuda graphs captured", extra={"batch_sizes": len(self.sizes), "max_batch": self.max_batch,
                                                          "query_tokens": self.num_query_tokens,
                                                          "seconds": round(time.monotonic() - started, 2)})

    def _view(self, name: str, length: int) -> torch.Tensor:
        start = self._layout[name]
        if name == "block_tables":
            return self.inputs[start:start + length * self.max_blocks].view(length, self.max_blocks)
        return self.inputs[start:start + length]

    def _forward(self, batch: int) -> None:
        """The padded forward of `batch` requests from the input buffers into self.logits; what a graph holds."""
        num_rows = batch * self.num_query_tokens
        seq_lens = self._seq_lens_host[:batch]
        metadata = AttentionMetadata(
            slot_mapping=self._view("slot_mapping", num_rows),
            query_start_loc=list(range(0, num_rows + 1, self.num_query_tokens)), seq_lens=seq_lens,
            block_tables=self._view("block_tables", batch), block_size=self.block_size,
            max_query_len=self.num_query_tokens, max_seq_len=max(max(seq_lens), 1),
            seq_lens_tensor=self._view("seq_lens", batch), query_start_loc_tensor=self.query_start_loc[:batch + 1])
        hidden = self.model(self._view("input_ids", num_rows), self._view("positions", num_rows), self.kv_caches,
                            metadata)
        logits = self.model.compute_logits(hidden)
        if self.logits is None:  # on the first (largest) warm-up, outside any capture
            self.logits = torch.empty(self.max_batch * self.num_query_tokens, logits.shape[-1],
                                      dtype=logits.dtype, device=logits.device)
        self.logits[:num_rows].copy_(logits)

    def _fill(self, inputs: ForwardInputs, batch: int) -> list[int]:
        """Write the step's inputs, padded, into the buffers; return each flat row's padded row."""
        width = self.num_query_tokens
        input_ids, positions, slot_mapping, seq_lens, padded_rows = [], [], [], [], []
        starts = inputs.query_start_loc
        for b, (start, end) in enumerate(zip(starts, starts[1:])):
            padding = width - (end - start)
            input_ids += inputs.input_ids[start:end] + [0] * padding
            positions += inputs.positions[start:end] + [inputs.positions[end - 1]] * padding
            slot_mapping += inputs.slot_mapping[start:end] + [-1] * padding
            seq_lens.append(inputs.seq_lens[b] + padding)
            padded_rows += range(b * width, b * width + end - start)
        staging = self._staging.numpy()
        self._write(staging, input_ids, positions, slot_mapping, seq_lens, batch)
        table_start = self._layout["block_tables"]
        table = staging[table_start:table_start + batch * self.max_blocks].reshape(batch, self.max_blocks)
        # Entries past a request's blocks keep earlier steps' ids: valid blocks, and no visible key reads them.
        for b, block_ids in enumerate(inputs.block_tables):
            table[b, :len(block_ids)] = block_ids
        self._copy_to_device(batch)
        return padded_rows

    def _fill_padding(self, batch: int) -> None:
        """Inputs of a batch of padding requests only (what capture runs)."""
        self._write(self._staging.numpy(), [], [], [], [], batch)
        self._copy_to_device(batch)

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
