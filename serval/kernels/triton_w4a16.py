"""W4A16: y [M, N] = x [M, K] @ W, W stored as 4-bit integers with a scale and a zero point per group of K rows,
dequantized in registers (Triton): a GEMV for decode rows and a GEMM for prefill.

The one layout every 4-bit format is repacked into at load (serval.layers.quant.w4a16):
    qweight [K/8, N] int32   eight consecutive rows of a column per word, row 8i+j in bits 4j..4j+3 (unsigned)
    scales  [G, N]           x's dtype
    zeros   [G, N] uint8     the unsigned zero point (8 for symmetric formats)
    g_idx   [K] int32        the group of each row of K (k // group_size, or GPTQ's act-order permutation)
    W[k, n] = (q[k, n] - zeros[g_idx[k], n]) * scales[g_idx[k], n]
Reading 4 bits a weight instead of 16 is what a decode step gains: it is nothing but reading the weights.

`reference_linear` dequantizes W in float32 and multiplies: what the CPU runs and what the tests compare with.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# (BLOCK_N, BLOCK_K, num_warps) of the GEMV; (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the GEMM.
GEMV_CONFIG = (64, 128, 4)
GEMM_CONFIG = (32, 64, 64, 4)
# Up to this many rows the GEMV (one program per row and BLOCK_N columns) reads W once per row and still wins.
GEMV_MAX_ROWS = 4


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               g_idx: torch.Tensor) -> torch.Tensor:
    """The [K, N] float32 weight the packed layout stands for."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    q = ((qweight[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(-1, qweight.shape[1])
    groups = g_idx.long()
    return (q - zeros[groups].int()).float() * scales[groups].float()


def reference_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     g_idx: torch.Tensor) -> torch.Tensor:
    return x.float() @ dequantize(qweight, scales, zeros, g_idx)


def linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype: the kernels on a GPU (or anywhere with SERVAL_W4A16=triton), else the
    reference."""
    if x.is_cuda or os.environ.get("SERVAL_W4A16") == "triton":
        y = matmul(x, qweight, scales, zeros, g_idx)
    else:
        y = reference_linear(x, qweight, scales, zeros, g_idx).to(x.dtype)
    if bias is not None:
        y += bias
    return y


@triton.jit
def _dequantized_tile(qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, ks, cols, K, N):
    """W[ks, cols] as float32 [BLOCK_K, BLOCK_N], read from the packed layout (zero past K or N)."""
    k_ok = ks < K
    mask = k_ok[:, None] & (cols < N)[None, :]
    words = tl.load(qweight_ptr + (ks // 8)[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0)
    q = (words >> ((ks % 8) * 4)[:, None]) & 0xF
    groups = tl.load(g_idx_ptr + ks, mask=k_ok, other=0).to(tl.int64)
    scale = tl.load(scales_ptr + groups[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + groups[:, None] * N + cols[None, :], mask=mask, other=0).to(tl.int32)
    return (q - zero).to(tl.float32) * scale


@triton.jit
def _w4a16_gemv_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, y_ptr, N, K, stride_x,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offsets = tl.arange(0, BLOCK_K)
    partial = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        ks = k + offsets
        x = tl.load(x_ptr + row * stride_x + ks, mask=ks < K, other=0.0).to(tl.float32)
        partial += x[:, None] * _dequantized_tile(qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, ks, cols, K, N)
    y = tl.sum(partial, axis=0)
    tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=cols < N)


@triton.jit
def _w4a16_gemm_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, y_ptr, M, N, K, stride_x,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offsets = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        ks = k + offsets
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :],
                    mask=(rows < M)[:, None] & (ks < K)[None, :], other=0.0)
        w = _dequantized_tile(qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, ks, cols, K, N)
        acc += tl.dot(x, w.to(x.dtype))
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


def matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
           gemv_config: tuple[int, int, int] | None = None,
           gemm_config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] @ W -> [M, N] in x's dtype, accumulated in float32: the GEMV up to GEMV_MAX_ROWS rows, else the
    GEMM."""
    m, k = x.shape
    n = qweight.shape[1]
    assert qweight.shape[0] * 8 == k and g_idx.shape == (k,) and x.stride(1) == 1, (x.shape, qweight.shape)
    assert qweight.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous(), "row-major layout only"
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m <= GEMV_MAX_ROWS:
        block_n, block_k, num_warps = gemv_config or GEMV_CONFIG
        _w4a16_gemv_kernel[(m, triton.cdiv(n, block_n))](x, qweight, scales, zeros, g_idx, y, n, k, x.stride(0),
                                                         BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    else:
        block_m, block_n, block_k, num_warps = gemm_config or GEMM_CONFIG
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _w4a16_gemm_kernel[grid](x, qweight, scales, zeros, g_idx, y, m, n, k, x.stride(0),
                                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return y
