"""LoRABatch: one step's adapter per row of the flat batch, in the two forms the kernels read.

    requests:      r0 (slot 2)   r1 (base)  r2 (slot 0)  r3 (slot 2)
    rows:          0 1 2 3       4 5        6            7
    token_slots:   2 2 2 2      -1 -1       0            2       gather form: each row reads its own adapter
    row_order:     6 | 0 1 2 3 7                                 segment form: the adapter rows grouped by slot,
    segments:      (start 0, len 1, slot 0) (1, 5, slot 2)       so each A/B tile is read once per BLOCK_M rows
    tiles:         (segment 0, block 0) (segment 1, block 0)     a kernel program per BLOCK_M rows of a segment

Rows of base-model requests (slot -1) get no LoRA term and are in no segment. The segment form serves prefill and
decode batches with several rows per adapter; the gather form decode batches with about one row per adapter (where
grouping saves nothing). Built once per step by the model runner and read by every LoRA layer of the model.

Inside a captured decode graph (serval.engine.cuda_graphs) the host does not know the step's slots: token_slots is a
region of the graph's input buffer, and graph_lora_batch derives the segments from it on the device (elementwise
ops, cumsums, a scatter and a searchsorted: nothing that syncs with the host), sized for every slot (max_loras
segments, any of them empty) so that one captured graph serves any mix of adapters. Its tile table has a fixed
length, a bound on the tiles any mix needs (T / BLOCK_M + max_loras); the tiles past the step's own point at no rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# The gather form while no adapter has more rows than this in the step: below a tl.dot tile (16 rows), grouping
# reads the weights about as often as gathering does and costs a launch's worth of index work.
MAX_GATHER_ROWS_PER_ADAPTER = 4
SEGMENT_TILE_ROWS = 16  # rows of a segment per kernel program (BLOCK_M): tl.dot's smallest tile


@dataclass
class LoRABatch:
    token_slots: torch.Tensor  # [T] int32: each row's resident slot, -1 for none
    row_order: torch.Tensor  # [R] int32: the rows that have an adapter, grouped by slot
    segment_starts: torch.Tensor  # [S] int32: each segment's first index into row_order
    segment_lengths: torch.Tensor  # [S] int32
    segment_slots: torch.Tensor  # [S] int32
    max_segment_length: int
    # The segment form's programs: tile i covers rows tile_blocks[i] * SEGMENT_TILE_ROWS onwards of segment
    # tile_segments[i] (none once past its length).
    tile_segments: torch.Tensor  # [num_tiles] int32
    tile_blocks: torch.Tensor  # [num_tiles] int32
    slots: list[int]  # the distinct slots in the batch (host copy, for the torch reference); [] in a graph
    # token_slots is a captured graph's input: the slots are known on the device only, max_segment_length is the
    # row count (a bound), and every slot has a segment (most of them empty).
    in_graph: bool = False

    @property
    def uses_gather(self) -> bool:
        return self.max_segment_length <= MAX_GATHER_ROWS_PER_ADAPTER

    @property
    def has_adapters(self) -> bool:
        """Whether any row may have an adapter (in a graph the host cannot tell, so it must assume so)."""
        return self.in_graph or bool(self.slots)


def build_lora_batch(rows_per_request: list[int], slot_per_request: list[int], device: torch.device) -> LoRABatch:
    """rows_per_request[i] flat rows for request i, whose adapter sits in slot_per_request[i] (-1: none)."""
    token_slots = [slot for num_rows, slot in zip(rows_per_request, slot_per_request, strict=True)
                   for _ in range(num_rows)]
    rows_by_slot: dict[int, list[int]] = {}
    for row, slot in enumerate(token_slots):
        if slot >= 0:
            rows_by_slot.setdefault(slot, []).append(row)
    row_order, starts, lengths, slots, tile_segments, tile_blocks = [], [], [], [], [], []
    for slot in sorted(rows_by_slot):
        num_rows = len(rows_by_slot[slot])
        tile_segments.extend([len(starts)] * -(-num_rows // SEGMENT_TILE_ROWS))
        tile_blocks.extend(range(-(-num_rows // SEGMENT_TILE_ROWS)))
        starts.append(len(row_order))
        lengths.append(num_rows)
        slots.append(slot)
        row_order.extend(rows_by_slot[slot])

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)

    return LoRABatch(tensor(token_slots), tensor(row_order), tensor(starts), tensor(lengths), tensor(slots),
                     max(lengths, default=0), tensor(tile_segments), tensor(tile_blocks), slots)

# A captured graph of at most this many rows gathers (each row reads its adapter); a larger one groups its rows by
# slot on the device, so each adapter's weight tile is read once per 16 rows instead of once per row.
MAX_GRAPH_GATHER_ROWS = 8


def graph_lora_batch(token_slots: torch.Tensor, max_loras: int) -> LoRABatch:
    """The LoRABatch of a decode graph whose rows' slots are token_slots [T] int32 (-1: none; padding rows are -1),
    built with device ops only, so it can be captured and replayed for any slots.

    Segment s holds slot s's rows, in row order:
        one_hot[t, s] = token_slots[t] == s;  rank[t] = (cumsum over rows of one_hot)[t, slot of t] - 1
        segment_lengths = sum of one_hot over rows;  segment_starts = exclusive cumsum of segment_lengths
        row_order[segment_starts[slot of t] + rank[t]] = t   (rows without an adapter are in no segment)
    """
    num_rows = token_slots.shape[0]
    device = token_slots.device
    empty = torch.zeros(0, dtype=torch.int32, device=device)
    if num_rows <= MAX_GRAPH_GATHER_ROWS:
        return LoRABatch(token_slots, empty, empty, empty, empty, 0, empty, empty, slots=[], in_graph=True)
    slots = token_slots.long()
    all_slots = torch.arange(max_loras, device=device)
    one_hot = (slots[:, None] == all_slots[None, :]).to(torch.int32)  # [T, max_loras]
    lengths = one_hot.sum(dim=0)
    starts = torch.cumsum(lengths, dim=0) - lengths
    has_adapter = slots >= 0
    own = slots.clamp(min=0)
    rank = torch.cumsum(one_hot, dim=0).gather(1, own[:, None]).squeeze(1) - 1
    # Rows without an adapter go to a spare last position, past every segment, and are never read.
    destination = torch.where(has_adapter, starts[own] + rank, num_rows)
    row_order = torch.zeros(num_rows + 1, dtype=torch.int32, device=device)
    row_order.scatter_(0, destination, torch.arange(num_rows, dtype=torch.int32, device=device))
    # Tile i belongs to the segment whose tiles' running end first passes i; tiles past the last are left pointing
    # at a block past any segment's rows, so their programs return at once.
    tiles_per_segment = (lengths + SEGMENT_TILE_ROWS - 1) // SEGMENT_TILE_ROWS
    tiles_end = torch.cumsum(tiles_per_segment, dim=0)
    max_tiles = -(-num_rows // SEGMENT_TILE_ROWS) + min(max_loras, num_rows)
    tile = torch.arange(max_tiles, device=device)
    segment = torch.searchsorted(tiles_end, tile, right=True)
    in_use = segment < max_loras
    segment = segment.clamp(max=max_loras - 1)
    block = torch.where(in_use, tile - (tiles_end - tiles_per_segment)[segment], num_rows)
    return LoRABatch(token_slots, row_order[:num_rows], starts.to(torch.int32), lengths.to(torch.int32),
                     all_slots.to(torch.int32), num_rows, segment.to(torch.int32), block.to(torch.int32),
                     slots=[], in_graph=True)
