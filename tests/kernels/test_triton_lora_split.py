"""The split-K shrink (serval.kernels.triton_lora.split_k): a long K cut into parts that add into h, in both kernel
forms and in a graph's device-built batch, against the torch reference and a per-row loop, in Triton's
interpreter on CPU. K is odd-sized (not a multiple of BLOCK_K nor of a part), ranks 8/16/64, rows without an
adapter beside mixed segments."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from serval.kernels import triton_lora  # noqa: E402
from serval.lora.batch import build_lora_batch, graph_lora_batch  # noqa: E402
from tests.kernels.test_triton_lora import DEVICE, TOLERANCE, per_row, stacked  # noqa: E402

HIDDEN = 808  # three parts of 320 columns; the last has 168, its last BLOCK_K step partial


def test_split_count_for_llama_3_8b_shapes():
    """Few programs and a long K split (a decode batch's shrink); many programs or a short K (a prefill's, or an
    expand's K = rank) do not; parts never go below MIN_SPLIT_COLUMNS."""
    assert triton_lora.split_k(num_programs=24, k=4096, block_k=64) == 16  # 256 decode rows, 8 adapters: q/k/v
    assert triton_lora.split_k(num_programs=24, k=14336, block_k=64) == 21  # down: 512 programs
    assert triton_lora.split_k(num_programs=8, k=4096, block_k=64) == 16  # 8 gathered rows
    assert triton_lora.split_k(num_programs=160, k=4096, block_k=64) == 3  # a 2048-token mixed step
    assert triton_lora.split_k(num_programs=1024, k=4096, block_k=64) == 1
    assert triton_lora.split_k(num_programs=1, k=16, block_k=16) == 1  # an expand
    assert triton_lora.split_k(num_programs=1, k=HIDDEN, block_k=64) == 3


def check_shrink_and_expand(batch, x, a, b, y, row_slots):
    h = triton_lora.lora_shrink(x, a, batch)
    h_ref = triton_lora.lora_shrink_reference(x, a, batch)
    tolerance = TOLERANCE[x.dtype]
    torch.testing.assert_close(h, h_ref, **tolerance)
    y_kernel = y.clone()
    triton_lora.lora_expand(y_kernel, h, b, batch)
    torch.testing.assert_close(y_kernel.float(), per_row(y, x, a, b, row_slots), **tolerance)
    base_rows = [row for row, slot in enumerate(row_slots) if slot < 0]
    assert torch.equal(h[base_rows], torch.zeros_like(h[base_rows]))
    assert torch.equal(y_kernel[base_rows], y[base_rows])


def inputs(num_rows: int, rank: int, dtype: torch.dtype, num_slots: int = 4, out: int = 40):
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(num_rows, HIDDEN, generator=generator).to(DEVICE, dtype)
    y = torch.randn(num_rows, out, generator=generator).to(DEVICE, dtype)
    return x, stacked(num_slots, rank, HIDDEN, dtype, 1), stacked(num_slots, out, rank, dtype, 2), y


@pytest.mark.parametrize("rank", [8, 16, 64])
def test_split_shrink_segments(rank):
    """Mixed segments (one past a 16-row tile) and base rows: the segment form with K in three parts."""
    rows, slots = [3, 18, 2, 1], [2, 0, -1, 2]
    batch = build_lora_batch(rows, slots, torch.device(DEVICE))
    assert not batch.uses_gather
    row_slots = [slot for n, slot in zip(rows, slots) for _ in range(n)]
    check_shrink_and_expand(batch, *inputs(sum(rows), rank, torch.float32), row_slots)


@pytest.mark.parametrize("rank", [8, 16, 64])
def test_split_shrink_gather(rank):
    slots = [1, -1, 3, 1, 0]
    batch = build_lora_batch([1] * 5, slots, torch.device(DEVICE))
    assert batch.uses_gather
    check_shrink_and_expand(batch, *inputs(5, rank, torch.float32), slots)


@pytest.mark.parametrize("num_rows", [6, 20])
def test_split_shrink_in_a_graph_batch(num_rows):
    """graph_lora_batch's batches (gathered, and every slot's segment with the spare tiles): K in parts too."""
    slots = [(row * 5) % 4 - 1 for row in range(num_rows)]
    slots[-1] = -1  # a padding row
    batch = graph_lora_batch(torch.tensor(slots, dtype=torch.int32, device=DEVICE), max_loras=4)
    check_shrink_and_expand(batch, *inputs(num_rows, 16, torch.float32), slots)


def test_split_shrink_bfloat16():
    rows, slots = [2, 17, 1], [0, 3, -1]
    batch = build_lora_batch(rows, slots, torch.device(DEVICE))
    row_slots = [slot for n, slot in zip(rows, slots) for _ in range(n)]
    check_shrink_and_expand(batch, *inputs(sum(rows), 16, torch.bfloat16), row_slots)
