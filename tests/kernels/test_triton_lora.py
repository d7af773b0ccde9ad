"""The batched LoRA kernels (shrink and expand, segment and gather forms) against their torch reference and a plain
per-row loop, in Triton's interpreter on CPU: ranks 8/16/64, mixed segments, rows without adapters, float32 and
bfloat16."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from serval.kernels import triton_lora  # noqa: E402
from serval.lora.batch import build_lora_batch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def stacked(num_slots: int, rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(num_slots, rows, cols, generator=generator) * cols ** -0.5).to(DEVICE, dtype)


def per_row(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """The definition, one row at a time."""
    out = y.float().clone()
    for row, slot in enumerate(slots):
        if slot >= 0:
            out[row] += b[slot].float() @ (a[slot].float() @ x[row].float())
    return out


def run(rows_per_request: list[int], slot_per_request: list[int], rank: int, dtype: torch.dtype,
        hidden: int = 96, out: int = 80, num_slots: int = 4) -> None:
    batch = build_lora_batch(rows_per_request, slot_per_request, torch.device(DEVICE))
    num_rows = sum(rows_per_request)
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(num_rows, hidden, generator=generator).to(DEVICE, dtype)
    y = torch.randn(num_rows, out, generator=generator).to(DEVICE, dtype)
    a, b = stacked(num_slots, rank, hidden, dtype, 1), stacked(num_slots, out, rank, dtype, 2)
    row_slots = [slot for n, slot in zip(rows_per_request, slot_per_request) for _ in range(n)]

    h = triton_lora.lora_shrink(x, a, batch)
    h_ref = triton_lora.lora_shrink_reference(x, a, batch)
    torch.testing.assert_close(h, h_ref, **TOLERANCE[dtype])
    y_kernel, y_ref = y.clone(), y.clone()
    triton_lora.lora_expand(y_kernel, h, b, batch)
    triton_lora.lora_expand_reference(y_ref, h_ref, b, batch)
    torch.testing.assert_close(y_kernel.float(), y_ref.float(), **TOLERANCE[dtype])
    torch.testing.assert_close(y_kernel.float(), per_row(y, x, a, b, row_slots), **TOLERANCE[dtype])
    base_rows = [row for row, slot in enumerate(row_slots) if slot < 0]
    assert torch.equal(y_kernel[base_rows], y[base_rows])  # rows without an adapter are left exactly alone


@pytest.mark.parametrize("rank", [8, 16, 64])
def test_segment_form_mixed_prefill(rank):
    # Segments of several lengths (one over a BLOCK_M tile), two requests on one adapter, base rows between.
    run([5, 19, 3, 1, 7], [2, -1, 0, 3, 2], rank, torch.float32)


@pytest.mark.parametrize("rank", [8, 16, 64])
def test_segment_form_decode_rows_grouped_by_adapter(rank):
    """A decode batch with many rows per adapter, interleaved: grouped through row_order into segments."""
    slots = [(row * 7) % 3 - 1 for row in range(40)]  # -1, 0, 1 interleaved
    batch = build_lora_batch([1] * 40, slots, torch.device(DEVICE))
    assert not batch.uses_gather
    run([1] * 40, slots, rank, torch.float32)


@pytest.mark.parametrize("rank", [8, 16, 64])
def test_gather_form_decode(rank):
    assert build_lora_batch([1] * 9, [0, -1, 3, 3, 1, -1, 2, 0, 1], torch.device(DEVICE)).uses_gather
    run([1] * 9, [0, -1, 3, 3, 1, -1, 2, 0, 1], rank, torch.float32)


def test_bfloat16():
    run([4, 1, 17], [1, -1, 0], 16, torch.bfloat16)
    run([1, 1, 1], [1, -1, 0], 16, torch.bfloat16)


def test_no_adapter_rows_only_is_a_no_op():
    run([3, 2], [-1, -1], 16, torch.float32)


def test_expand_into_a_column_slice():
    """A merged projection's slice: expand adds into its columns only, reading its columns of h."""
    batch = build_lora_batch([3, 1], [1, 0], torch.device(DEVICE))
    generator = torch.Generator().manual_seed(3)
    h = torch.randn(4, 3 * 8, generator=generator).to(DEVICE)
    b = stacked(2, 16, 8, torch.float32, 4)
    y = torch.randn(4, 48, generator=generator).to(DEVICE)
    y_kernel, y_ref = y.clone(), y.clone()
    triton_lora.lora_expand(y_kernel, h[:, 8:16], b, batch, out_offset=16)
    triton_lora.lora_expand_reference(y_ref, h[:, 8:16], b, batch, out_offset=16)
    torch.testing.assert_close(y_kernel, y_ref, **TOLERANCE[torch.float32])
    assert torch.equal(y_kernel[:, :16], y[:, :16]) and torch.equal(y_kernel[:, 32:], y[:, 32:])
    assert not torch.allclose(y_kernel[:, 16:32], y[:, 16:32])


BATCHES = {"prefill segments": ([5, 19, 3], [2, -1, 0]),
           "decode segments": ([1] * 12, [0, -1, 2, 2, 1, -1, 0, 3, 3, 3, 3, 3]),
           "decode gather": ([1] * 6, [0, -1, 2, 2, 1, 3])}


@pytest.mark.parametrize("rank", [8, 16, 64])
@pytest.mark.parametrize("form", list(BATCHES))
def test_fused_expand_of_merged_slices(rank, form):
    """One launch for q/k/v (slices of unequal widths, one wider than a BLOCK_N tile): the same as expanding each
    slice on its own, and nothing written outside the slices' columns' rows with an adapter."""
    slices = (triton_lora.ColumnSlice(0, 96), triton_lora.ColumnSlice(96, 40), triton_lora.ColumnSlice(136, 40))
    rows, slots = BATCHES[form]
    batch = build_lora_batch(rows, slots, torch.device(DEVICE))
    assert batch.uses_gather == (form == "decode gather")
    num_rows = sum(rows)
    generator = torch.Generator().manual_seed(11)
    h = torch.randn(num_rows, 3 * rank, generator=generator).to(DEVICE)
    b = stacked(4, 176, rank, torch.float32, 5)
    y = torch.randn(num_rows, 176, generator=generator).to(DEVICE)
    y_kernel, y_ref = y.clone(), y.clone()
    triton_lora.lora_expand_slices(y_kernel, h, b, slices, batch)
    triton_lora.lora_expand_slices_reference(y_ref, h, b, slices, batch)
    torch.testing.assert_close(y_kernel, y_ref, **TOLERANCE[torch.float32])
    row_slots = torch.tensor([slot for n, slot in zip(rows, slots) for _ in range(n)])
    assert torch.equal(y_kernel[row_slots < 0], y[row_slots < 0])
    for index, part in enumerate(slices):  # the definition, slice by slice
        columns = slice(part.offset, part.offset + part.size)
        expected = per_row(y[:, columns], h[:, index * rank:(index + 1) * rank], torch.eye(rank).expand(4, -1, -1),
                           b[:, columns], row_slots.tolist())
        torch.testing.assert_close(y_kernel[:, columns].float(), expected, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("num_rows", [4, 16, 40, 90])
def test_graph_batch_from_a_device_slot_buffer(num_rows):
    """graph_lora_batch: slots read from a device buffer (padding rows -1), no host list of slots. Gather form up
    to MAX_GRAPH_GATHER_ROWS rows, every slot's segment (empty ones included) past it. Shrink and fused expand, the
    kernels and the gathering torch reference, equal the host-built batch's reference."""
    from serval.lora.batch import MAX_GRAPH_GATHER_ROWS, graph_lora_batch
    max_loras, rank, hidden = 5, 16, 64
    generator = torch.Generator().manual_seed(num_rows)
    slots = torch.randint(-1, max_loras - 1, (num_rows,), generator=generator).tolist()  # slot 4 unused
    slots[-1] = -1  # a padding row
    buffer = torch.full((num_rows + 3,), 7, dtype=torch.int32, device=DEVICE)  # the slots are one region of it
    buffer[1:num_rows + 1] = torch.tensor(slots, dtype=torch.int32)
    graph_batch = graph_lora_batch(buffer[1:num_rows + 1], max_loras)
    assert graph_batch.in_graph and graph_batch.uses_gather == (num_rows <= MAX_GRAPH_GATHER_ROWS)
    if not graph_batch.uses_gather:
        order = graph_batch.row_order.tolist()
        for slot in range(max_loras):
            start, length = graph_batch.segment_starts[slot].item(), graph_batch.segment_lengths[slot].item()
            assert order[start:start + length] == [row for row, s in enumerate(slots) if s == slot]
        # Every 16-row block of every segment is exactly one tile; the spare tiles cover no rows.
        lengths = graph_batch.segment_lengths.tolist()
        tiles = [(segment, block) for segment, block in zip(graph_batch.tile_segments.tolist(),
                                                            graph_batch.tile_blocks.tolist())
                 if block * 16 < lengths[segment]]
        assert sorted(tiles) == [(segment, block) for segment, length in enumerate(lengths)
                                 for block in range(-(-length // 16))]
    host_batch = build_lora_batch([1] * num_rows, slots, torch.device(DEVICE))
    x = torch.randn(num_rows, hidden, generator=generator).to(DEVICE)
    a = stacked(max_loras, 2 * rank, hidden, torch.float32, 1)
    b = stacked(max_loras, 48, rank, torch.float32, 2)
    y = torch.randn(num_rows, 48, generator=generator).to(DEVICE)
    slices = (triton_lora.ColumnSlice(0, 32), triton_lora.ColumnSlice(32, 16))
    h_expected = triton_lora.lora_shrink_reference(x, a, host_batch)
    y_expected = y.clone()
    triton_lora.lora_expand_slices_reference(y_expected, h_expected, b, slices, host_batch)
    for shrink, expand in ((triton_lora.lora_shrink, triton_lora.lora_expand_slices),
                           (triton_lora.lora_shrink_reference, triton_lora.lora_expand_slices_reference)):
        h = shrink(x, a, graph_batch)
        torch.testing.assert_close(h, h_expected, **TOLERANCE[torch.float32])
        y_out = y.clone()
        expand(y_out, h, b, slices, graph_batch)
        torch.testing.assert_close(y_out, y_expected, **TOLERANCE[torch.float32])
