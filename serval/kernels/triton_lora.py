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
reading anything. The torch reference (what the CPU runs) loops over the adapters in the batch.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from serval.lora.batch import LoRABatch

_SEGMENT_BLOCK_M = 16  # rows per program: tl.dot's smallest tile
_GATHER_BLOCK_N = 32
_BLOCK_K = 64


# ---------------------------------------------------------------- torch reference
def lora_shrink_reference(x: torch.Tensor, lora_a: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """x [T, in], lora_a [slots, K, in] -> h [T, K] float32; zero on rows without an adapter."""
    h = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for slot in batch.slots:
        rows = (batch.token_slots == slot).nonzero().squeeze(1)
        h[rows] = x[rows].float() @ lora_a[slot].float().T
    return h


def lora_expand_reference(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, batch: LoRABatch,
                          out_offset: int = 0) -> None:
    """y[:, out_offset:out_offset + n] += h @ lora_b[slot].T per row (lora_b [slots, n, R], h [T, R]), in place."""
    n = lora_b.shape[1]
    for slot in batch.slots:
        rows = (batch.token_slots == slot).nonzero().squeeze(1)
        part = y[rows, out_offset:out_offset + n].float() + h[rows].float() @ lora_b[slot].float().T
        y[rows, out_offset:out_offset + n] = part.to(y.dtype)


# ---------------------------------------------------------------- kernels
@triton.jit
def _segment_kernel(x_ptr, w_ptr, y_ptr, row_order_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, N, K, stride_xm,
                    stride_ws,
                    stride_wn, stride_ym, ACCUMULATE: tl.constexpr, DOT_IN_FLOAT32: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """y[row, n] (+)= x[row] . w[slot, n] for BLOCK_M rows of one segment (rows through row_order) and BLOCK_N
    columns."""
    pid_m, segment, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(seg_len_ptr + segment)
    if pid_m * BLOCK_M < length:
        start = tl.load(seg_start_ptr + segment)
        slot = tl.load(seg_slot_ptr + segment).to(tl.int64)
        local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = local < length
        rows = tl.load(row_order_ptr + start + local, mask=row_valid, other=0).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_valid = cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_valid = ks < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                        mask=row_valid[:, None] & k_valid[None, :], other=0.0)
            w = tl.load(w_ptr + slot * stride_ws + cols[None, :] * stride_wn + ks[:, None],
                        mask=k_valid[:, None] & col_valid[None, :], other=0.0)
            if DOT_IN_FLOAT32:
                acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(x.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
        y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
        mask = row_valid[:, None] & col_valid[None, :]
        if ACCUMULATE:
            acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_kernel(x_ptr, w_ptr, y_ptr, token_slot_ptr, N, K, stride_xm, stride_ws, stride_wn, stride_ym,
                   ACCUMULATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[row, n] (+)= x[row] . w[slot of row, n] for one row and BLOCK_N columns."""
    row, pid_n = tl.program_id(0), tl.program_id(1)
    slot = tl.load(token_slot_ptr + row).to(tl.int64)
    if slot >= 0:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_valid = cols < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_valid = ks < K
            x = tl.load(x_ptr + row * stride_xm + ks, mask=k_valid, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + slot * stride_ws + cols[:, None] * stride_wn + ks[None, :],
                        mask=col_valid[:, None] & k_valid[None, :], other=0.0).to(tl.float32)
            acc += w * x[None, :]
        out = tl.sum(acc, axis=1)
        y_ptrs = y_ptr + row * stride_ym + cols
        if ACCUMULATE:
            out += tl.load(y_ptrs, mask=col_valid, other=0.0).to(tl.float32)
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=col_valid)


def _apply(x: torch.Tensor, weights: torch.Tensor, y: torch.Tensor, batch: LoRABatch, accumulate: bool) -> None:
    """y (+)= x . weights[slot]^T per row; x [T, K] (unit stride in K), weights [slots, N, K], y [T, N] views."""
    num_rows, k = x.shape
    n = weights.shape[1]
    if num_rows == 0 or not batch.slots:
        return
    assert x.stride(1) == 1 and weights.stride(2) == 1 and y.stride(1) == 1
    if batch.uses_gather:
        block_k = min(_BLOCK_K, triton.next_power_of_2(k))
        grid = (num_rows, triton.cdiv(n, _GATHER_BLOCK_N))
        _gather_kernel[grid](x, weights, y, batch.token_slots, n, k, x.stride(0), weights.stride(0),
                             weights.stride(1), y.stride(0), ACCUMULATE=accumulate, BLOCK_N=_GATHER_BLOCK_N,
                             BLOCK_K=block_k)
        return
    # Triton's interpreter multiplies bfloat16 tiles wrongly (numpy has no bfloat16): there, widen them first.
    widen = weights.dtype == torch.float32 or (os.environ.get("TRITON_INTERPRET") == "1")
    block_n = max(16, min(64, triton.next_power_of_2(n)))
    block_k = max(16, min(_BLOCK_K, triton.next_power_of_2(k)))
    grid = (triton.cdiv(batch.max_segment_length, _SEGMENT_BLOCK_M), len(batch.slots), triton.cdiv(n, block_n))
    _segment_kernel[grid](x, weights, y, batch.row_order, batch.segment_starts, batch.segment_lengths,
                          batch.segment_slots, n, k, x.stride(0), weights.stride(0), weights.stride(1), y.stride(0), ACCUMULATE=accumulate,
                          DOT_IN_FLOAT32=widen, DOT_PRECISION="ieee" if widen else "tf32",
                          BLOCK_M=_SEGMENT_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """x [T, in], lora_a [slots, K, in] -> h [T, K] float32 (zero on rows without an adapter)."""
    h = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    _apply(x.contiguous(), lora_a, h, batch, accumulate=False)
    return h


def lora_expand(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, batch: LoRABatch,
                out_offset: int = 0) -> None:
    """y[:, out_offset:out_offset + n] += h @ lora_b[slot]^T per row, in place; h [T, R] may be a column slice."""
    n = lora_b.shape[1]
    _apply(h, lora_b, y[:, out_offset:out_offset + n], batch, accumulate=True)
