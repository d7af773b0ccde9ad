"""The batch-1 GEMV over float8 e4m3 weights with row scales (quantization="fp8"), its products in float16:
y [1, N] = x [1, K] @ (W [N, K] * scale [N])^T, x in bfloat16 or float16. serval.kernels.triton_gemv.gemv takes it
for 16-bit x and float8 W (SERVAL_FP8_GEMV_HALF, half_products); its float32 path is the one this replaces.

Why: the float32 path converts each weight e4m3 -> f16 (one cvt a pair), f16 -> f32 (one HADD2.F32 each) and
multiplies it in an FFMA: 3.5 to 4.3 sm_90 instructions a weight before x's share, and with SwiGLU fused (the down
projection) 8 to 13, so the H200 read float8 at 2.6-3.5 TB/s where bfloat16 reads 3.9-4.6 (docs/performance.md).
Here a weight costs a half cvt (cvt.rn.f16x2.e4m3x2, two weights) and a half FMA (fma.rn.f16x2, two products):

    program: BLOCK_N rows of W, K in BLOCK_K steps (as triton_gemv's float32 path; its tuned blocks apply)
    x:       first a pass over x for a power of two 2^s with |x| 2^s < 1 (gated: a bound, _gated_bound), then each
             tile's x times 2^s in float16 (exact: bfloat16's 8 bits of mantissa fit float16's 11), shared by the
             BLOCK_N rows a thread holds (normed: x is the weight-scaled row of a pending RMSNorm, whose 1/rms
             multiplies y at the end, from the sums of squares the GEMV before left: triton_gemv.PendingNorm)
    weight:  e4m3 pairs -> f16x2 (exact), f16x2 FMAs into a [BLOCK_N, BLOCK_K] float16 partial sum
    flush:   every FLUSH_TILES tiles and at the end, the partial summed across threads in float32;
             y = sum 2^-s scale[n] (+ bias)
Range: |w| <= 448 and |x 2^s| < 1 (a hair more, gated: bfloat16 rounds silu(g) u up by at most 2^-8), so a partial
element, FLUSH_TILES = 128 products, stays under 448 x 1.004 x 128 = 57,600 < 65,504, float16's largest.
Accuracy: one float16 rounding (2^-11 relative) per product and per add of a partial element, over at most 128
adds before float32, against e4m3's own 2^-4: tests/kernels/test_triton_fp8_gemv.py compares with the
dequantized product in float32. x elements below 2^-14 of the scaled maximum become float16 subnormals (absolute
error <= 2^-25 of it): far below the weights' rounding.

sm_90 K loop at the H200 table's (4, 2048, 4): 2.44 instructions a weight (float32 path 3.48), gated 4.91 (7.92);
benchmarks/gemv_bench.py --count-instructions counts both paths, no GPU needed; docs/performance.md has the table.
On the CPU (Triton's interpreter) the inline PTX cannot run: the same float16 arithmetic in plain Triton (a product
and a sum rounded apart, not fused; the exact sigmoid).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from serval.kernels import pdl
from serval.kernels.triton_gemv import (PendingNorm, _load, _load_sums, _load_w, _row_block, _store_rows,
                                       fusion_arguments, fusion_constants, inverse_rms)
from serval.kernels.triton_w4a16_gemv import _fma_half

# The most of x the pass for its scale loads in one step (4096 bfloat16: 32 a thread at 4 warps, 16 registers).
X_PASS_BLOCK = 4096
# Tiles whose products one float16 partial element sums before it is flushed to float32 (the range bound above).
FLUSH_TILES = 128
# The largest |silu(g)| for g < 0 (at g = -1.278: -0.2785), rounded up.
SILU_NEGATIVE_BOUND = tl.constexpr(0.2785)


def half_products_on_gpu() -> bool:
    """This kernel on CUDA unless SERVAL_FP8_GEMV_HALF=0 (the float32 path). On the H200 its tuned configurations
    take a decode step's projections from 2.44 to 2.15 ms (gemv_bench.py --fp8, docs/performance.md)."""
    return os.environ.get("SERVAL_FP8_GEMV_HALF", "1") != "0"


@triton.jit
def _gated_bound(gate_up_ptr, offsets, K):
    """An upper bound of |silu(gate) up| per element with no exponential: silu(g) = g sigmoid(g) lies in (0, g] for
    g >= 0 and in [-0.2785, 0) for g < 0. Tight where x is largest (a large positive gate, within 2x); looser only
    where x is small, which costs those elements float16 range, not overflow."""
    gate = _load(gate_up_ptr, offsets, K, False).to(tl.float32)
    up = _load(gate_up_ptr + K, offsets, K, False).to(tl.float32)
    return tl.maximum(gate, SILU_NEGATIVE_BOUND) * tl.abs(up)


@triton.jit
def _x_scale(x_ptr, K, GATED: tl.constexpr, X_BLOCK: tl.constexpr):
    """(2^s, 2^-s): the power of two that puts x's largest |value| (or _gated_bound's) in [0.5, 1). One pass over
    x in X_BLOCK steps (masked), elementwise maxima across steps, one reduction across threads at the end. Every
    program waits for this pass before its K loop: X_BLOCK covers all of K in one step up to X_PASS_BLOCK, so it is
    one round trip to L2, not one per tile."""
    cols = tl.arange(0, X_BLOCK)
    largest = tl.zeros((X_BLOCK,), dtype=tl.float32)
    for k in range(0, K, X_BLOCK):
        if GATED:
            largest = tl.maximum(largest, _gated_bound(x_ptr, k + cols, K))
        else:
            largest = tl.maximum(largest, tl.abs(_load(x_ptr, k + cols, K, False).to(tl.float32)))
    amax = tl.max(largest, axis=0)
    # amax lies in [2^(e-127), 2^(e-126)) for its exponent field e: 2^(126-e) puts it in [0.5, 1). Clamped to
    # normal float32 powers (x all zero: 2^126, harmless).
    exponent = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    scale_field = tl.minimum(tl.maximum(253 - exponent, 1), 253)
    return (scale_field << 23).to(tl.float32, bitcast=True), ((254 - scale_field) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _load_half_x(x_ptr, offsets, K, x_scale, GATED: tl.constexpr, EVEN_K: tl.constexpr, USE_ASM: tl.constexpr):
    """x 2^s in float16 (gated: silu(gate) up, rounded to x's dtype as silu_and_mul rounds it, then scaled). On the
    GPU the sigmoid is ex2.approx.ftz and rcp.approx.ftz (a few float32 ulp; the range's ends give 0 and 1):
    tl.sigmoid's IEEE division and range checks made it the most of the down projection's K loop. Either rounds to
    the same 16-bit x but in rare ties."""
    if GATED:
        gate = _load(x_ptr, offsets, K, EVEN_K)
        gate32 = gate.to(tl.float32)
        up = _load(x_ptr + K, offsets, K, EVEN_K).to(tl.float32)
        if USE_ASM:
            sigmoid = tl.inline_asm_elementwise(
                "{ .reg .f32 e; ex2.approx.ftz.f32 e, $1; add.ftz.f32 e, e, 0f3F800000; rcp.approx.ftz.f32 $0, e; }",
                "=r,r", [gate32 * -1.4426950408889634], dtype=tl.float32, is_pure=True, pack=1)
        else:
            sigmoid = 1.0 / (1.0 + tl.math.exp2(gate32 * -1.4426950408889634))
        x = (gate32 * sigmoid * up).to(gate.dtype).to(tl.float32)
    else:
        x = _load(x_ptr, offsets, K, EVEN_K).to(tl.float32)
    return (x * x_scale).to(tl.float16)


@triton.jit
def _add_products(partial, w, x_ptr, offsets, K, x_scale, GATED: tl.constexpr, EVEN_K: tl.constexpr,
                  USE_ASM: tl.constexpr):
    """partial + W tile x (x 2^s), all in float16: two weights a cvt and two products an FMA on the GPU."""
    x = _load_half_x(x_ptr, offsets, K, x_scale, GATED, EVEN_K, USE_ASM)[None, :]
    return _fma_half(w.to(tl.float16), tl.broadcast_to(x, w.shape), partial, USE_ASM)


@triton.jit
def _fp8_half_gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, N, K, stride_w, residual_ptr, norm_ptr,
                          scaled_ptr, sums_out_ptr, sums_ptr, num_sums, eps, HAS_BIAS: tl.constexpr,
                          GATED: tl.constexpr, RESIDUAL: tl.constexpr, NEXT_NORM: tl.constexpr,
                          NORMED: tl.constexpr, SUMS_BLOCK: tl.constexpr, EVEN_K: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_BLOCK: tl.constexpr, FLUSH: tl.constexpr,
                          USE_ASM: tl.constexpr, USE_PDL: tl.constexpr):
    rows, row_valid, safe_rows, cols, w_rows = _row_block(w_ptr, N, stride_w, BLOCK_N, BLOCK_K)
    w = _load_w(w_rows, cols, K, EVEN_K)  # as triton_gemv._gemv_kernel: the first tile before the wait
    pdl.wait(USE_PDL)
    sums = _load_sums(sums_ptr, num_sums, NORMED, SUMS_BLOCK)
    x_scale, x_unscale = _x_scale(x_ptr, K, GATED, X_BLOCK)
    partial = _add_products(tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float16), w, x_ptr, cols, K, x_scale, GATED,
                            EVEN_K, USE_ASM)
    y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # FLUSH tiles a chunk (the first tile, taken above, is chunk 0's), the partial flushed after each: the inner loop
    # is the hot one, with no branch.
    for chunk in range(0, K, FLUSH * BLOCK_K):
        for k in range(tl.maximum(chunk, BLOCK_K), tl.minimum(chunk + FLUSH * BLOCK_K, K), BLOCK_K):
            partial = _add_products(partial, _load_w(w_rows, k + cols, K, EVEN_K), x_ptr, k + cols, K, x_scale,
                                    GATED, EVEN_K, USE_ASM)
        y += tl.sum(partial.to(tl.float32), axis=1)
        partial = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float16)
    y = y * x_unscale * tl.load(scale_ptr + safe_rows)  # in this order: 2^-s times a row scale may underflow
    if NORMED:
        y *= inverse_rms(sums, K, eps)
    _store_rows(y, y_ptr, bias_ptr, rows, row_valid, HAS_BIAS, residual_ptr, norm_ptr, scaled_ptr, sums_out_ptr,
                RESIDUAL, NEXT_NORM)


def launch(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
           y: torch.Tensor, config: tuple[int, int, int], gated: bool, residual: torch.Tensor | None = None,
           norm_weight: torch.Tensor | None = None, pending: PendingNorm | None = None,
           normed: PendingNorm | None = None) -> None:
    """y [1, N] = x @ (weight * weight_scale)^T (+ bias) with triton_gemv.gemv's checked operands: x flat and
    contiguous (gated: [gate | up]; normed: its scaled row), BLOCK_K already capped at K's next power of two;
    residual, norm_weight and pending (the next norm's parts, written) as triton_gemv._launch passes them."""
    n, k = weight.shape
    block_n, block_k, num_warps = config
    epilogue = dict(residual=residual, norm_weight=norm_weight, pending=pending)
    _fp8_half_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight_scale, bias if bias is not None else weight, y, n, k, weight.stride(0),
        *fusion_arguments(y, normed, **epilogue), HAS_BIAS=bias is not None, GATED=gated, EVEN_K=k % block_k == 0,
        BLOCK_N=block_n, BLOCK_K=block_k, X_BLOCK=min(triton.next_power_of_2(k), X_PASS_BLOCK), FLUSH=FLUSH_TILES,
        # The PTX takes two elements a thread at a time.
        USE_ASM=x.is_cuda and torch.version.hip is None and block_n * block_k >= 2 * 32 * num_warps,
        num_warps=num_warps, **fusion_constants(normed, **epilogue), **pdl.launch_options(x))
