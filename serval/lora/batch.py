"""LoRABatch: one step's adapter per row of the flat batch, in the two forms the kernels read.

    requests:      r0 (slot 2)   r1 (base)  r2 (slot 0)  r3 (slot 2)
    rows:          0 1 2 3       4 5        6            7
    token_slots:   2 2 2 2      -1 -1       0            2       gather form: each row reads its own adapter
    row_order:     6 | 0 1 2 3 7                                 segment form: the adapter rows grouped by slot,
    segments:      (start 0, len 1, slot 0) (1, 5, slot 2)       so each A/B tile is read once per BLOCK_M rows

Rows of base-model requests (slot -1) get no LoRA term and are in no segment. The segment form serves prefill and
decode batches with several rows per adapter; the gather form decode batches with about one row per adapter (where
grouping saves nothing). Built once per step by the model runner and read by every LoRA layer of the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# The gather form while no adapter has more rows than this in the step: below a tl.dot tile (16 rows), grouping
# reads the weights about as often as gathering does and costs a launch's worth of index work.
MAX_GATHER_ROWS_PER_ADAPTER = 4


@dataclass
class LoRABatch:
    token_slots: torch.Tensor  # [T] int32: each row's resident slot, -1 for none
    row_order: torch.Tensor  # [R] int32: the rows that have an adapter, grouped by slot
    segment_starts: torch.Tensor  # [S] int32: each segment's first index into row_order
    segment_lengths: torch.Tensor  # [S] int32
    segment_slots: torch.Tensor  # [S] int32
    max_segment_length: int
    slots: list[int]  # the distinct slots in the batch (host copy, for the torch reference)

    @property
    def uses_gather(self) -> bool:
        return self.max_segment_length <= MAX_GATHER_ROWS_PER_ADAPTER


def build_lora_batch(rows_per_request: list[int], slot_per_request: list[int], device: torch.device) -> LoRABatch:
    """rows_per_request[i] flat rows for request i, whose adapter sits in slot_per_request[i] (-1: none)."""
    token_slots = [slot for num_rows, slot in zip(rows_per_request, slot_per_request, strict=True)
                   for _ in range(num_rows)]
    rows_by_slot: dict[int, list[int]] = {}
    for row, slot in enumerate(token_slots):
        if slot >= 0:
            rows_by_slot.setdefault(slot, []).append(row)
    row_order, starts, lengths, slots = [], [], [], []
    for slot in sorted(rows_by_slot):
        starts.append(len(row_order))
        lengths.append(len(rows_by_slot[slot]))
        slots.append(slot)
        row_order.extend(rows_by_slot[slot])

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)

    return LoRABatch(tensor(token_slots), tensor(row_order), tensor(starts), tensor(lengths), tensor(slots),
                     max(lengths, default=0), slots)
