"""What the verify graphs and the EAGLE-3 head's graphs share: steps of B requests with exactly Q query rows each.

Both pad a step the same way (the layout is in serval.engine.spec_decode.verify_graphs' docstring): request b's
rows at b*Q.., padding rows with token 0, slot -1 and the request's last position, seq_lens[b] = first position +
Q, padding requests of no context. PaddedRows owns the one int32 input buffer those graphs read (and its pinned
staging copy), the attention metadata built from it, and the graphs, one per batch size of the ladder; the graph
classes own only their forward and their outputs.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from serval.engine.cuda_graphs import capture_sizes
from serval.layers.attention import AttentionMetadata
from serval.layers.quant.kv_scales import kv_scales_frozen

logger = logging.getLogger(__name__)


class PaddedRows:
    def __init__(self, block_size: int, max_num_seqs: int, max_model_len: int, num_query_tokens: int,
                 device: torch.device) -> None:
        self.block_size = block_size
        self.num_query_tokens = num_query_tokens
        self.sizes = capture_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        # Padding rows sit up to Q - 1 positions past a request's end: room for their (never read) table entries.
        self.max_blocks = -(-(max_model_len + num_query_tokens) // block_size)
        self.max_rows = self.max_batch * num_query_tokens
        # One int32 buffer holds every integer input, so a step needs one host-to-device copy (as DecodeGraphs).
        self._layout = {"input_ids": 0, "positions": self.max_rows, "slot_mapping": 2 * self.max_rows,
                        "seq_lens": 3 * self.max_rows, "block_tables": 3 * self.max_rows + self.max_batch}
        size = self._layout["block_tables"] + self.max_batch * self.max_blocks
        # One staging buffer: speculation runs no asynchronous steps, the host reads each step's tokens first.
        self._staging = torch.zeros(size, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.inputs = torch.zeros(size, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(self.max_batch + 1, dtype=torch.int32, device=device) * num_query_tokens
        self._seq_lens_host = [0] * self.max_batch  # this step's, for AttentionMetadata's host fields
        # Per batch size, the (device, staging) prefixes its copy moves: made once, as slicing a device tensor costs the
        # host a few microseconds before the replay, on a verify step's critical path.
        self._copy_views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.device = device

    def batch_for(self, num_requests: int) -> int:
        return next(size for size in self.sizes if size >= num_requests)

    def view(self, name: str, length: int) -> torch.Tensor:
        start = self._layout[name]
        if name == "block_tables":
            return self.inputs[start:start + length * self.max_blocks].view(length, self.max_blocks)
        return self.inputs[start:start + length]

    def metadata(self, batch: int) -> AttentionMetadata:
        """The attention metadata of a padded batch, over the buffers (what a graph captures)."""
        num_rows = batch * self.num_query_tokens
        seq_lens = self._seq_lens_host[:batch]
        return AttentionMetadata(
            slot_mapping=self.view("slot_mapping", num_rows),
            query_start_loc=list(range(0, num_rows + 1, self.num_query_tokens)), seq_lens=seq_lens,
            block_tables=self.view("block_tables", batch), block_size=self.block_size,
            max_query_len=self.num_query_tokens, max_seq_len=max(max(seq_lens), 1),
            seq_lens_tensor=self.view("seq_lens", batch), query_start_loc_tensor=self.query_start_loc[:batch + 1],
            split_queries=True)

    def fill(self, query_start_loc: list[int], input_ids: list[int], positions: list[int], slot_mapping: list[int],
             seq_lens: list[int], block_tables: list[list[int]], batch: int) -> list[int] | range:
        """Write a flat step's inputs (request i's rows at query_start_loc[i]:[i + 1]), padded, into the buffers;
        return each flat row's padded row (a range where they are the same)."""
        staging = self._staging.numpy()
        if len(input_ids) == self.num_query_tokens * len(seq_lens):
            # Every request has all Q rows (each verifies k drafts): the flat step is already in the padded layout.
            self._write(staging, input_ids, positions, slot_mapping, seq_lens, batch)
            padded_rows = range(len(input_ids))
        else:
            padded_rows = self._write_padded(staging, query_start_loc, input_ids, positions, slot_mapping, seq_lens,
                                             batch)
        table_start = self._layout["block_tables"]
        table = staging[table_start:table_start + batch * self.max_blocks].reshape(batch, self.max_blocks)
        # Entries past a request's blocks keep earlier steps' ids: valid blocks, and no visible key reads them.
        for b, block_ids in enumerate(block_tables):
            table[b, :len(block_ids)] = block_ids
        self._copy_to_device(batch)
        return padded_rows

    def _write_padded(self, staging, query_start_loc: list[int], input_ids: list[int], positions: list[int],
                      slot_mapping: list[int], seq_lens: list[int], batch: int) -> list[int]:
        """fill's vectors of a step where some request has fewer than Q rows, each padded to Q."""
        width = self.num_query_tokens
        padded_ids, padded_positions, padded_slots, padded_seq_lens, padded_rows = [], [], [], [], []
        for b, (start, end) in enumerate(zip(query_start_loc, query_start_loc[1:])):
            padding = width - (end - start)
            padded_ids += input_ids[start:end] + [0] * padding
            padded_positions += positions[start:end] + [positions[end - 1]] * padding
            padded_slots += slot_mapping[start:end] + [-1] * padding
            padded_seq_lens.append(seq_lens[b] + padding)
            padded_rows += range(b * width, b * width + end - start)
        self._write(staging, padded_ids, padded_positions, padded_slots, padded_seq_lens, batch)
        return padded_rows

    def fill_padding(self, batch: int) -> None:
        """Inputs of a batch of padding requests only (what capture runs)."""
        self._write(self._staging.numpy(), [], [], [], [], batch)
        self._copy_to_device(batch)

    def replay(self, batch: int, forward: Callable[[int], None]) -> None:
        """The batch's graph, or with none captured (a CPU, or before capture) the same padded forward eagerly."""
        if batch in self.graphs:
            self.graphs[batch].replay()
        else:
            forward(batch)

    def capture(self, forward: Callable[[int], None], module: torch.nn.Module, what: str) -> None:
        """One graph of forward(batch) per size, largest first (the smaller graphs reuse its memory pool)."""
        started = time.monotonic()
        self.fill_padding(self.max_batch)
        torch.cuda.synchronize()
        pool = None
        with kv_scales_frozen(module):
            for batch in reversed(self.sizes):
                for _ in range(2):  # warm-up: Triton compiles and cuBLAS picks its kernels outside the capture
                    forward(batch)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    forward(batch)
                pool = graph.pool()
                self.graphs[batch] = graph
        torch.cuda.synchronize()
        logger.info("speculation cuda graphs captured", extra={"graphs": what, "batch_sizes": len(self.sizes),
                                                               "max_batch": self.max_batch,
                                                               "query_tokens": self.num_query_tokens,
                                                               "seconds": round(time.monotonic() - started, 2)})

    def _write(self, staging, input_ids: list[int], positions: list[int], slot_mapping: list[int],
               seq_lens: list[int], batch: int) -> None:
        num_rows = batch * self.num_query_tokens
        for name, values, fill in (("input_ids", input_ids, 0), ("positions", positions, 0),
                                   ("slot_mapping", slot_mapping, -1)):
            start = self._layout[name]
            staging[start:start + len(values)] = values
            if len(values) < num_rows:  # a step of whole requests only (the usual verify step) has no tail
                staging[start + len(values):start + num_rows] = fill
        start = self._layout["seq_lens"]
        staging[start:start + len(seq_lens)] = seq_lens
        if len(seq_lens) < batch:
            staging[start + len(seq_lens):start + batch] = 0
        self._seq_lens_host[:batch] = seq_lens + [0] * (batch - len(seq_lens))

    def _copy_to_device(self, batch: int) -> None:
        # Every vector is copied whole (its rows past this batch are stale and unread); the table only to this batch.
        if batch not in self._copy_views:
            end = self._layout["block_tables"] + batch * self.max_blocks
            self._copy_views[batch] = self.inputs[:end], self._staging[:end]
        device, staging = self._copy_views[batch]
        device.copy_(staging, non_blocking=True)
