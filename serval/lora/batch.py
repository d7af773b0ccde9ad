"""LoRABatch: one step's adapter per row of the flat batch, in the two forms the kernels read.

    requests:        r0 (slot 2)    r1 (base)  r2 (slot 0)
    rows:            0 1 2 3        4 5        6
    token_slots:     2 2 2 2       -1 -1       0            gather form: decode, one row per request
    segments:        (start 0, len 4, slot 2)  (6, 1, 0)    segment form: prefill, a request's rows share one A/B

Rows of base-model requests (slot -1) get no LoRA term; their segments are left out. Built once per step by the
model runner and read by every LoRA layer of the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRABatch:
    token_slots: torch.Tensor  # [T] int32: each row's resident slot, -1 for none
    segment_starts: torch.Tensor  # [S] int32: first row of each segment that has an adapter
    segment_lengths: torch.Tensor  # [S] int32
    segment_slots: torch.Tensor  # [S] int32
    max_segment_length: int
    slots: list[int]  # the distinct slots in the batch (host copy, for the torch reference)

    @property
    def is_decode(self) -> bool:
        """One row per segment: the gather form, where each row reads its own adapter."""
        return self.max_segment_length <= 1


def build_lora_batch(rows_per_request: list[int], slot_per_request: list[int], device: torch.device) -> LoRABatch:
    """rows_per_request[i] flat rows for request i, whose adapter sits in slot_per_request[i] (-1: none)."""
    token_slots: list[int] = []
    starts, lengths, slots = [], [], []
    row = 0
    for num_rows, slot in zip(rows_per_request, slot_per_request, strict=True):
        token_slots.extend([slot] * num_rows)
        if slot >= 0 and num_rows:
            starts.append(row)
            lengths.append(num_rows)
            slots.append(slot)
        row += num_rows

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)

    return LoRABatch(tensor(token_slots), tensor(starts), tensor(lengths), tensor(slots), max(lengths, default=0),
                     sorted(set(slots)))
