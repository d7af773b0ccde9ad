"""Block-scaled FP8 GEMM: y [M, N] = dequant(xq, x_scale) @ dequant(wq, w_scale)^T, in Triton.

The operands are float8 e4m3. x has one float32 scale per row and per group of G columns ([M, K/G], per-token-group
quantization), W one per row and group ([N, K/G], the checkpoint's 128x128 block scales repeated per row). Each
program walks K one group at a time: one float8 tile product on the tensor cores per group, multiplied by the two
scales in float32 and summed. That is DeepSeek-V3's recipe (and vLLM's/SGLang's w8a8 block GEMM): a per-group
scale keeps an outlier in one channel from costing a whole row its precision.

`reference_linear` is the same product in float32 (dequantize both operands, then matmul): what the CPU runs and
what the tests compare the kernel with.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
MIN_SCALE = 1e-12
# Rows and columns of y per program, and warps. Decode rows (M <= 16) use the smallest BLOCK_M tl.dot takes.
GEMM_CONFIG = (64, 128, 4)
DECODE_CONFIG = (16, 64, 4)


def quantize_weight_blocks(weight: torch.Tensor, block_n: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (float8 [N, K], float32 scales [ceil(N/bn), ceil(K/bk)]), as the published checkpoints
    store them (weight ~= q * scale of its block)."""
    n, k = weight.shape
    padded = torch.zeros(-(-n // block_n) * block_n, -(-k // block_k) * block_k, dtype=torch.float32,
                         device=weight.device)
    padded[:n, :k] = weight.float()
    blocks = padded.view(padded.shape[0] // block_n, block_n, padded.shape[1] // block_k, block_k)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp_min(MIN_SCALE)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view_as(padded)[:n, :k].to(FP8)
    return q.contiguous(), scale


def quantize_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K a multiple of group) -> (float8 [M, K], float32 scales [M, K/group]): one scale per token and
    group of columns."""
    m, k = x.shape
    groups = x.float().view(m, k // group, group)
    scale = (groups.abs().amax(dim=2) / FP8_MAX).clamp_min(MIN_SCALE)
    q = (groups * scale.reciprocal()[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(m, k), scale


def reference_linear(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                     group: int) -> torch.Tensor:
    """The kernel's product in float32: both operands dequantized group by group, then one matmul."""
    x = xq.float() * x_scale.repeat_interleave(group, dim=1)[:, :xq.shape[1]]
    w = wq.float() * w_scale.repeat_interleave(group, dim=1)[:, :wq.shape[1]]
    return x @ w.t()


def linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, group: int,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] in half or float precision -> [M, N] in x's dtype: x quantized per token and group, then the
    block-scaled product (the Triton kernel on a GPU, or anywhere with SERVAL_FP8_BLOCK=triton; else the
    reference)."""
    xq, x_scale = quantize_groups(x, group)
    if x.is_cuda or os.environ.get("SERVAL_FP8_BLOCK") == "triton":
        y = gemm(xq, x_scale, weight, weight_scale, group, out_dtype=x.dtype)
    else:
        y = reference_linear(xq, x_scale, weight, weight_scale, group).to(x.dtype)
    if bias is not None:
        y += bias
    return y


@triton.jit
def _fp8_block_kernel(xq_ptr, xs_ptr, wq_ptr, ws_ptr, y_ptr, M, N, K, NUM_GROUPS,
                      GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    offsets = tl.arange(0, GROUP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, NUM_GROUPS):
        ks = g * GROUP + offsets
        x = tl.load(xq_ptr + rows[:, None].to(tl.int64) * K + ks[None, :], mask=row_ok[:, None], other=0.0)
        w = tl.load(wq_ptr + cols[None, :].to(tl.int64) * K + ks[:, None], mask=col_ok[None, :], other=0.0)
        if UPCAST:  # every e4m3 value is exact in float16; the interpreter has no float8 product
            part = tl.dot(x.to(tl.float16), w.to(tl.float16), out_dtype=tl.float32)
        else:
            part = tl.dot(x, w)
        x_scale = tl.load(xs_ptr + rows * NUM_GROUPS + g, mask=row_ok, other=0.0)
        w_scale = tl.load(ws_ptr + cols * NUM_GROUPS + g, mask=col_ok, other=0.0)
        acc += part * x_scale[:, None] * w_scale[None, :]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def gemm(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, group: int,
         out_dtype: torch.dtype = torch.float32, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """xq [M, K] float8, x_scale [M, K/group], weight [N, K] float8, weight_scale [N, K/group] -> y [M, N]."""
    m, k = xq.shape
    n = weight.shape[0]
    assert k % group == 0 and weight.shape[1] == k and weight.is_contiguous() and xq.is_contiguous(), \
        (xq.shape, weight.shape)
    block_m, block_n, num_warps = config or (DECODE_CONFIG if m <= 16 else GEMM_CONFIG)
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_block_kernel[grid](xq, x_scale.contiguous(), weight, weight_scale.contiguous(), y, m, n, k, k // group,
                            GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n,
                            UPCAST=not xq.is_cuda, num_warps=num_warps)
    return y
