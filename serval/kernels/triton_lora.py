"""Batched LoRA for a batch that mixes adapters (Punica's SGMV/BGMV, Chen et al. 2023; S-LoRA, Sheng et al. 2023).

Each resident adapter sits in a slot of stacked weights: A [slots, K, in] and B [slots, out, R]. For row t with
slot s = token_slots[t] (-1: no adapter) a LoRA layer adds B[s] @ (A[s] @ x[t]) to the base output, in two steps:
    shrink: h[t] = A[s] @ x[t]                  h [T, K] float32, K = slices x R (q/k/v share one launch)
    expand: y[t, offset:offset + n] += B[s] @ h[t, columns of the slice]
Two forms of each (serval.lora.batch says which a step takes):
- segment (prefill, and decode with several rows per adapter): the rows of one adapter, grouped (row_order), are a
  segment; a program takes BLOCK_M rows of one segment and runs tl.dot on tiles of that adapter, reading each tile
  once for BLOCK_M rows.
- gather (decode with about one row per adapter): a program takes one row and BLOCK_N outputs, reads that row's
  adapter and reduces with elementwise products (a dot of one row is a GEMV, where reading the weights is the cost).
Rows without an adapter are skipped: they are in no segment, and in the gather form their program returns before
reading anything (h starts at zero). The shrink's K is long (4096, 14336) and its outputs few (slices x R), so a
decode batch's shrink has few programs: it splits K over a third grid axis (split_k) and each part adds into h
with atomic float adds (SGMV's and vLLM's split-K shrink). The torch
reference (what the CPU runs) loops over the adapters in the batch, or, in a captured graph's batch whose slots the
host does not know, gathers each row's adapter on the device.

A merged projection's expand is one launch for all its slices (q/k/v, gate/up): slice s adds
h[:, s*R:(s+1)*R] @ B[slot, offset_s:offset_s + size_s]^T into y's columns offset_s:offset_s + size_s, and the
programs of the slices share the launch's last grid axis. Each slice's offset and size are kernel arguments (up to
MAX_SLICES), never device reads, so nothing depends on the host at replay. With the shrink already one launch over
the stacked A matrices of every slice, each LoRA projection costs two launches (and h's zeroing).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from serval.lora.batch import SEGMENT_TILE_ROWS, LoRABatch

_GATHER_BLOCK_N = 32
_BLOCK_K = 64
MAX_SLICES = 3  # q/k/v
# A split-K shrink aims at about this many programs (a few per SM of an H200's 132) with parts of K at least this
# wide (four BLOCK_K steps: fewer would spend more on the atomic adds than on reading A).
TARGET_PROGRAMS = 512
MIN_SPLIT_COLUMNS = 256


@dataclass(frozen=True)
class ColumnSlice:
    """One slice of a merged projection's output: columns offset:offset + size of y and rows of B."""
    offset: int
    size: int


# ---------------------------------------------------------------- torch reference
def lora_shrink_reference(x: torch.Tensor, lora_a: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """x [T, in], lora_a [slots, K, in] -> h [T, K] float32; zero on rows without an adapter."""
    if batch.in_graph:
        a, has_adapter = _gathered(lora_a, batch.token_slots)
        return torch.einsum("tki,ti->tk", a.float(), x.float()) * has_adapter[:, None]
    h = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for slot in batch.slots:
        rows = (batch.token_slots == slot).nonzero().squeeze(1)
        h[rows] = x[rows].float() @ lora_a[slot].float().T
    return h


def lora_expand_reference(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, batch: LoRABatch,
                          out_offset: int = 0) -> None:
    """y[:, out_offset:out_offset + n] += h @ lora_b[slot].T per row (lora_b [slots, n, R], h [T, R]), in place."""
    n = lora_b.shape[1]
    if batch.in_graph:
        b, has_adapter = _gathered(lora_b, batch.token_slots)
        term = torch.einsum("tnr,tr->tn", b.float(), h.float())
        part = y[:, out_offset:out_offset + n]
        part.copy_(torch.where(has_adapter[:, None], part.float() + term, part.float()).to(y.dtype))
        return
    for slot in batch.slots:
        rows = (batch.token_slots == slot).nonzero().squeeze(1)
        part = y[rows, out_offset:out_offset + n].float() + h[rows].float() @ lora_b[slot].float().T
        y[rows, out_offset:out_offset + n] = part.to(y.dtype)


def lora_expand_slices_reference(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor,
                                 slices: Sequence[ColumnSlice], batch: LoRABatch) -> None:
    """lora_expand_slices' definition: each slice expanded on its own."""
    rank = lora_b.shape[2]
    for index, part in enumerate(slices):
        lora_expand_reference(y, h[:, index * rank:(index + 1) * rank],
                              lora_b[:, part.offset:part.offset + part.size], batch, part.offset)


def _gathered(weights: torch.Tensor, token_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's adapter weights [T, ...] (slot 0's for rows without one) and which rows have one: device ops
    only, as a graph's batch needs."""
    has_adapter = token_slots >= 0
    return weights[token_slots.clamp(min=0).long()], has_adapter


# ---------------------------------------------------------------- kernels
@triton.jit
def _slice_bounds(s, offset0, size0, offset1, size1, offset2, size2):
    offset = tl.where(s == 0, offset0, tl.where(s == 1, offset1, offset2))
    size = tl.where(s == 0, size0, tl.where(s == 1, size1, size2))
    return offset, size


@triton.jit
def _lora_segment_kernel(x_ptr, w_ptr, y_ptr, row_order_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr,
                         tile_segment_ptr, tile_block_ptr, K, k_per_split,
                         x_slice_stride, blocks_per_slice, offset0, size0, offset1, size1, offset2, size2,
                         stride_xm, stride_ws, stride_wn, stride_ym, ACCUMULATE: tl.constexpr,
                         SPLIT_K: tl.constexpr, DOT_IN_FLOAT32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[row, offset_s + n] (+)= x[row, s * x_slice_stride:] . w[slot, offset_s + n] for BLOCK_M rows of one
    segment (a tile: rows through row_order), BLOCK_N columns of slice s and the split's k_per_split columns of K
    (with SPLIT_K > 1 the splits add into y, which starts at zero)."""
    tile, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    segment = tl.load(tile_segment_ptr + tile)
    pid_m = tl.load(tile_block_ptr + tile)
    length = tl.load(seg_len_ptr + segment)
    s = pid_n // blocks_per_slice
    offset, size = _slice_bounds(s, offset0, size0, offset1, size1, offset2, size2)
    # A merged projection's narrower slices (k/v beside q) leave the programs past their columns nothing to do.
    if (pid_m * BLOCK_M < length) & ((pid_n % blocks_per_slice) * BLOCK_N < size):
        start = tl.load(seg_start_ptr + segment)
        slot = tl.load(seg_slot_ptr + segment).to(tl.int64)
        local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = local < length
        rows = tl.load(row_order_ptr + start + local, mask=row_valid, other=0).to(tl.int64)
        local_cols = (pid_n % blocks_per_slice) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_valid = local_cols < size
        cols = offset + local_cols
        x_base = x_ptr + rows[:, None] * stride_xm + s * x_slice_stride
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_end = tl.minimum(K, (split + 1) * k_per_split)
        for k0 in range(split * k_per_split, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_valid = ks < k_end
            x = tl.load(x_base + ks[None, :], mask=row_valid[:, None] & k_valid[None, :], other=0.0)
            w = tl.load(w_ptr + slot * stride_ws + cols[None, :] * stride_wn + ks[:, None],
                        mask=k_valid[:, None] & col_valid[None, :], other=0.0)
            if DOT_IN_FLOAT32:
                acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(x.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
        y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
        mask = row_valid[:, None] & col_valid[None, :]
        if SPLIT_K > 1:
            tl.atomic_add(y_ptrs, acc, mask=mask)
        else:
            if ACCUMULATE:
                acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lora_gather_kernel(x_ptr, w_ptr, y_ptr, token_slot_ptr, K, k_per_split, x_slice_stride, blocks_per_slice,
                        offset0, size0, offset1, size1, offset2, size2, stride_xm, stride_ws, stride_wn, stride_ym,
                        ACCUMULATE: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """y[row, offset_s + n] (+)= x[row, s * x_slice_stride:] . w[slot of row, offset_s + n] for one row, BLOCK_N
    columns of slice s and the split's k_per_split columns of K (with SPLIT_K > 1 the splits add into y, which
    starts at zero); a row without an adapter is left alone."""
    row, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(token_slot_ptr + row).to(tl.int64)
    s = pid_n // blocks_per_slice
    offset, size = _slice_bounds(s, offset0, size0, offset1, size1, offset2, size2)
    local_cols = (pid_n % blocks_per_slice) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = local_cols < size
    cols = offset + local_cols
    y_ptrs = y_ptr + row * stride_ym + cols
    if (slot >= 0) & ((pid_n % blocks_per_slice) * BLOCK_N < size):
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        x_base = x_ptr + row * stride_xm + s * x_slice_stride
        k_end = tl.minimum(K, (split + 1) * k_per_split)
        for k0 in range(split * k_per_split, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_valid = ks < k_end
            x = tl.load(x_base + ks, mask=k_valid, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + slot * stride_ws + cols[:, None] * stride_wn + ks[None, :],
                        mask=col_valid[:, None] & k_valid[None, :], other=0.0).to(tl.float32)
            acc += w * x[None, :]
        out = tl.sum(acc, axis=1)
        if SPLIT_K > 1:
            tl.atomic_add(y_ptrs, out, mask=col_valid)
        else:
            if ACCUMULATE:
                out += tl.load(y_ptrs, mask=col_valid, other=0.0).to(tl.float32)
            tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=col_valid)


def split_k(num_programs: int, k: int, block_k: int) -> int:
    """How many parts a launch of num_programs splits its K into (each adding its partial sums into y): enough
    for about TARGET_PROGRAMS programs, each at least MIN_SPLIT_COLUMNS of K. The shrink of a decode batch has
    few programs (a 16-row tile or a row of an adapter, times a rank's few columns) and a long K (4096, 14336):
    unsplit, a few programs stream the adapters' A matrices one BLOCK_K at a time while the rest of the GPU idles."""
    most = max(1, k // max(block_k, MIN_SPLIT_COLUMNS))
    return max(1, min(most, TARGET_PROGRAMS // max(1, num_programs)))


def _apply(x: torch.Tensor, weights: torch.Tensor, y: torch.Tensor, batch: LoRABatch, accumulate: bool,
           slices: Sequence[ColumnSlice], x_slice_stride: int, splittable: bool = False) -> None:
    """y[:, slice s] (+)= x[:, s * x_slice_stride:][:K] . weights[slot, slice s]^T per row, one launch for every
    slice; x [T, *] (unit stride), weights [slots, N, K], y [T, *] views. splittable: y is float32 and zero (the
    shrink's h), so programs may split K and add their parts into it."""
    num_rows, k = x.shape[0], weights.shape[2]
    if num_rows == 0 or not batch.has_adapters:
        return
    assert x.stride(1) == 1 and weights.stride(2) == 1 and y.stride(1) == 1 and 1 <= len(slices) <= MAX_SLICES
    bounds = [value for part in slices for value in (part.offset, part.size)]
    bounds += [0, 0] * (MAX_SLICES - len(slices))
    widest = max(part.size for part in slices)
    if batch.uses_gather:
        block_k = min(_BLOCK_K, triton.next_power_of_2(k))
        blocks_per_slice = triton.cdiv(widest, _GATHER_BLOCK_N)
        programs = num_rows * len(slices) * blocks_per_slice
        splits = split_k(programs, k, block_k) if splittable else 1
        k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
        grid = (num_rows, len(slices) * blocks_per_slice, triton.cdiv(k, k_per_split))
        _lora_gather_kernel[grid](x, weights, y, batch.token_slots, k, k_per_split, x_slice_stride,
                                  blocks_per_slice, *bounds, x.stride(0), weights.stride(0), weights.stride(1),
                                  y.stride(0), ACCUMULATE=accumulate, SPLIT_K=grid[2], BLOCK_N=_GATHER_BLOCK_N,
                                  BLOCK_K=block_k)
        return
    # Triton's interpreter multiplies bfloat16 tiles wrongly (numpy has no bfloat16): there, widen them first.
    widen = weights.dtype == torch.float32 or (os.environ.get("TRITON_INTERPRET") == "1")
    block_n = max(16, min(64, triton.next_power_of_2(widest)))
    block_k = max(16, min(_BLOCK_K, triton.next_power_of_2(k)))
    blocks_per_slice = triton.cdiv(widest, block_n)
    num_tiles = batch.tile_segments.shape[0]
    splits = split_k(num_tiles * len(slices) * blocks_per_slice, k, block_k) if splittable else 1
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    grid = (num_tiles, len(slices) * blocks_per_slice, triton.cdiv(k, k_per_split))
    _lora_segment_kernel[grid](x, weights, y, batch.row_order, batch.segment_starts, batch.segment_lengths,
                               batch.segment_slots, batch.tile_segments, batch.tile_blocks, k, k_per_split,
                               x_slice_stride, blocks_per_slice, *bounds, x.stride(0), weights.stride(0),
                               weights.stride(1), y.stride(0), ACCUMULATE=accumulate, SPLIT_K=grid[2],
                               DOT_IN_FLOAT32=widen, DOT_PRECISION="ieee" if widen else "tf32",
                               BLOCK_M=SEGMENT_TILE_ROWS, BLOCK_N=block_n, BLOCK_K=block_k)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """x [T, in], lora_a [slots, K, in] -> h [T, K] float32 (zero on rows without an adapter)."""
    # h starts at zero: rows without an adapter keep it, and the programs of a split K add their parts into it.
    h = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    _apply(x.contiguous(), lora_a, h, batch, accumulate=False, slices=(ColumnSlice(0, lora_a.shape[1]),),
           x_slice_stride=0, splittable=True)
    return h


def lora_expand(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, batch: LoRABatch,
                out_offset: int = 0) -> None:
    """y[:, out_offset:out_offset + n] += h @ lora_b[slot]^T per row, in place; h [T, R] may be a column slice."""
    n = lora_b.shape[1]
    _apply(h, lora_b, y[:, out_offset:out_offset + n], batch, accumulate=True, slices=(ColumnSlice(0, n),),
           x_slice_stride=0)


def lora_expand_slices(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, slices: Sequence[ColumnSlice],
                       batch: LoRABatch) -> None:
    """For each slice s, in one launch: y[:, offset_s:offset_s + size_s] += h[:, s*R:(s+1)*R] @
    lora_b[slot, offset_s:offset_s + size_s]^T per row, in place (lora_b [slots, out, R], h [T, len(slices) * R])."""
    _apply(h, lora_b, y, batch, accumulate=True, slices=slices, x_slice_stride=lora_b.shape[2])
