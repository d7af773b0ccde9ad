"""CUDA graphs of the decode step: the model's forward and logits, captured once per batch size of a ladder.

A decode step launches a few hundred small kernels (eight or so per layer); replaying them as one graph removes
the host's launch cost, which at batch 1 is larger than the GPU's work. A step with n requests replays the graph
of the smallest captured size >= n; the rows past n are padding: slot -1 (the KV write skips them) and sequence
length 0 (attention reads nothing and returns zeros), so they cost a little compute and change nothing.

The graphs read fixed input buffers, filled before each replay with one host-to-device copy of a pinned staging
buffer. The attention kernels take every length from these buffers, never from the host, which is what makes the
captured graph valid for any sequence lengths (see serval.kernels.triton_attention).

With LoRA (`lora`, the model's LoRAContext) the buffer has one more region, each row's adapter slot (-1: none, as
padding rows are), and the graphs are captured with the LoRA kernels in them, reading that region: one graph serves
any mix of adapters, since adapters are copied into fixed slots of stacked weights (serval.layers.lora). Without
LoRA the graphs are exactly the base model's.

With a hybrid KV cache (serval.engine.kv_groups, `num_kv_groups` > 0) each group has its own slots and block
tables: the slots region holds one row of max_batch per group, and each request's block-table row holds one row
per group, so a batch's tables stay one prefix of the buffer; each group's table is a strided view of it.

Off CUDA (tests) nothing is captured and run() calls the same forward on the same buffers eagerly.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from serval.engine.kv_groups import with_group_metadata
from serval.engine.sampler import to_device
from serval.layers.attention import AttentionMetadata
from serval.lora.batch import graph_lora_batch

if TYPE_CHECKING:
    from serval.layers.lora import LoRAContext

logger = logging.getLogger(__name__)


@dataclass
class StagedDecode:
    """A decode step whose inputs are in the graphs' buffers (DecodeGraphs.stage), awaiting its replay."""
    num_requests: int
    batch: int  # the captured size it replays


def gather_input_ids(input_ids: torch.Tensor, source: torch.Tensor, rows: list[int] | None = None) -> None:
    """In place on the device: the input ids at `rows` (all where None) are row numbers of `source`, the previous
    step's samples, which the host has not read yet; each becomes the token sampled there (asynchronous
    scheduling)."""
    if rows is None:
        input_ids.copy_(source.index_select(0, input_ids))
        return
    if not rows:
        return
    index = to_device(rows, torch.int64, input_ids.device)
    tokens = source.index_select(0, input_ids.index_select(0, index))
    input_ids.index_copy_(0, index, tokens.to(input_ids.dtype))


def capture_sizes(max_num_seqs: int) -> list[int]:
    """vLLM's ladder: 1, 2, 4, then every multiple of 8, up to max_num_seqs (itself included)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int, max_num_seqs: int,
                 max_model_len: int, device: torch.device, lora: LoRAContext | None = None,
                 max_loras: int = 0, num_kv_groups: int = 0) -> None:
        self.model = model
        self.num_kv_groups = num_kv_groups
        self.lora, self.max_loras = lora, max_loras
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sizes = capture_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        # One int32 buffer holds every input, so a replay needs one copy: input ids, positions, slots, seq_lens,
        # then the block table rows. (Token ids and positions fit int32; embedding and rotary index with them.)
        batch = self.max_batch
        self._layout = {"input_ids": 0, "positions": batch, "slot_mapping": 2 * batch, "seq_lens": 3 * batch,
                        "block_tables": 4 * batch}
        if lora is not None:  # each row's LoRA slot, before the block tables: a replay copies one prefix
            self._layout["lora_slots"], self._layout["block_tables"] = 4 * batch, 5 * batch
        if num_kv_groups:  # per group, its slots (before the tables: a replay still copies one prefix)
            self._layout["group_slots"] = self._layout["block_tables"]
            self._layout["block_tables"] += num_kv_groups * batch
        self._table_rows = max(num_kv_groups, 1)  # block-table rows per request
        size = self._layout["block_tables"] + batch * self._table_rows * self.max_blocks
        # Two staging buffers, used in turn: with asynchronous scheduling the host fills step N+1's while step N's
        # copy may not have run yet; by the time a buffer comes round again the host has waited for that step.
        self._stagings = [torch.zeros(size, dtype=torch.int32, pin_memory=device.type == "cuda") for _ in range(2)]
        self._fills = 0
        self.inputs = torch.zeros(size, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def _view(self, name: str, batch: int) -> torch.Tensor:
        start = self._layout[name]
        if name == "block_tables":
            return self.inputs[start:start + batch * self.max_blocks].view(batch, self.max_blocks)
        return self.inputs[start:start + batch]

    def _group_views(self, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A hybrid cache's per-group slots [batch] and block tables [batch, max_blocks] (strided views)."""
        slots_start, tables_start = self._layout["group_slots"], self._layout["block_tables"]
        tables = self.inputs[tables_start:tables_start + batch * self._table_rows * self.max_blocks]
        tables = tables.view(batch, self._table_rows, self.max_blocks)
        slots = [self.inputs[slots_start + g * self.max_batch:slots_start + g * self.max_batch + batch]
                 for g in range(self.num_kv_groups)]
        return slots, [tables[:, g] for g in range(self.num_kv_groups)]

    def _forward(self, batch: int) -> torch.Tensor:
        group_slots, group_tables = self._group_views(batch) if self.num_kv_groups else ([], [])
        metadata = AttentionMetadata(
            slot_mapping=group_slots[0] if group_slots else self._view("slot_mapping", batch),
            query_start_loc=list(range(batch + 1)), seq_lens=[1] * batch,
            block_tables=group_tables[0] if group_tables else self._view("block_tables", batch),
            block_size=self.block_size, max_query_len=1, max_seq_len=1, seq_lens_tensor=self._view("seq_lens", batch),
            query_start_loc_tensor=self.query_start_loc[:batch + 1])
        if self.num_kv_groups:
            with_group_metadata(metadata, group_slots, group_tables)
        if self.lora is not None:
            self.lora.batch = graph_lora_batch(self._view("lora_slots", batch), self.max_loras)
        try:
            hidden = self.model(self._view("input_ids", batch), self._view("positions", batch), self.kv_caches,
                                metadata)
        finally:
            if self.lora is not None:
                self.lora.batch = None
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        started = time.monotonic()
        self._fill([], [], [], [], [], self.max_batch)
        torch.cuda.synchronize()
        pool = None
        for batch in reversed(self.sizes):  # largest first: the later, smaller graphs reuse its memory pool
            for _ in range(2):  # warm-up: Triton compiles and cuBLAS picks its kernels outside the capture
                self._forward(batch)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[batch] = self._forward(batch)
            pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize()
        logger.info("cuda graphs captured", extra={"batch_sizes": len(self.sizes), "max_batch": self.max_batch,
                                                   "seconds": round(time.monotonic() - started, 2)})

    def can_run(self, num_requests: int) -> bool:
        return 0 < num_requests <= self.max_batch

    def padded_batch(self, num_requests: int) -> int:
        """The captured size a step of num_requests replays (tensor parallelism checks every rank's agrees)."""
        return next(size for size in self.sizes if size >= num_requests)

    def run(self, input_ids: list[int], positions: list[int], slot_mapping: list[int], seq_lens: list[int],
            block_tables: list[list[int]], source: torch.Tensor | None = None,
            lora_slots: list[int] | None = None,
            groups: list[tuple[list[int], list[list[int]]]] | None = None) -> torch.Tensor:
        """Logits [n, vocab] of a decode step of n requests (one new token each), by graph replay.
        With `source` (a device tensor of token ids), input_ids are row indices into it rather than token ids:
        the previous step's samples, gathered on the device without the host reading them. lora_slots: each
        request's adapter slot (-1: none), with LoRA. groups: with a hybrid KV cache, each group's (slots, block
        tables), which replace slot_mapping and block_tables."""
        return self.replay(self.stage(input_ids, positions, slot_mapping, seq_lens, block_tables, lora_slots, groups),
                           source)

    def stage(self, input_ids: list[int], positions: list[int], slot_mapping: list[int], seq_lens: list[int],
              block_tables: list[list[int]], lora_slots: list[int] | None = None,
              groups: list[tuple[list[int], list[list[int]]]] | None = None) -> StagedDecode:
        """run's first half: the step's inputs into the buffers, their copy queued on the stream now. Done ahead of
        the replay (a constrained batch stages step N+2 before step N+1's sampling, which waits for the grammar
        masks), it is safe in stream order: step N+1's graph, queued before, has read the buffers by the time the
        copy runs, and its sampling reads only its logits. Arguments as run's."""
        num_requests = len(input_ids)
        batch = self.padded_batch(num_requests)
        self._fill(input_ids, positions, slot_mapping, seq_lens, block_tables, batch, lora_slots, groups)
        return StagedDecode(num_requests, batch)

    def replay(self, staged: StagedDecode, source: torch.Tensor | None = None,
               rows: list[int] | None = None) -> torch.Tensor:
        """run's second half: gather the input ids from `source` (as run) and replay the staged step's graph.
        rows: only these requests' input ids are rows of `source` (the rest are token ids); None: all."""
        if source is not None:
            gather_input_ids(self._view("input_ids", staged.num_requests), source, rows)
        if staged.batch not in self.graphs:  # nothing captured (off CUDA): the same forward on the same buffers
            return self._forward(staged.batch)[:staged.num_requests]
        self.graphs[staged.batch].replay()
        return self.logits[staged.batch][:staged.num_requests]

    def _fill(self, input_ids, positions, slot_mapping, seq_lens, block_tables, batch: int,
              lora_slots: list[int] | None = None, groups: list[tuple[list[int], list[list[int]]]] | None = None
              ) -> None:
        n = len(input_ids)
        staging_tensor = self._stagings[self._fills % 2]
        self._fills += 1
        staging = staging_tensor.numpy()  # numpy slice assignment from lists is several times cheaper than torch's
        vectors = [("input_ids", input_ids), ("positions", positions), ("slot_mapping", slot_mapping),
                   ("seq_lens", seq_lens)]
        if self.lora is not None:
            vectors.append(("lora_slots", [-1] * n if lora_slots is None else lora_slots))
        for name, values in vectors:
            start = self._layout[name]
            staging[start:start + n] = values
            staging[start + n:start + batch] = -1 if name in ("slot_mapping", "lora_slots") else 0
        table_start = self._layout["block_tables"]
        if self.num_kv_groups:
            self._fill_groups(staging, groups, batch)
        else:
            table = staging[table_start:table_start + batch * self.max_blocks].reshape(batch, self.max_blocks)
            for i, row in enumerate(block_tables):
                table[i, :len(row)] = row
        # Only what this batch reads goes over: the per-request vectors and its block-table rows.
        end = table_start + batch * self._table_rows * self.max_blocks
        self.inputs[:end].copy_(staging_tensor[:end], non_blocking=True)

    def _fill_groups(self, staging, groups: list[tuple[list[int], list[list[int]]]] | None, batch: int) -> None:
        """A hybrid cache's per-group slots and block tables into the staging buffer (padding rows: slot -1)."""
        slots_start, table_start = self._layout["group_slots"], self._layout["block_tables"]
        tables = staging[table_start:table_start + batch * self._table_rows * self.max_blocks]
        tables = tables.reshape(batch, self._table_rows, self.max_blocks)
        for g in range(self.num_kv_groups):
            slots, block_tables = groups[g] if groups else ([], [])
            start = slots_start + g * self.max_batch
            staging[start:start + len(slots)] = slots
            staging[start + len(slots):start + batch] = -1
            for i, row in enumerate(block_tables):
                tables[i, g, :len(row)] = row
