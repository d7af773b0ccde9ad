"""Per-token float8 quantization of activations for the fp8 matmuls, in Triton: one program per row reads the row
once, takes its absolute maximum, and writes the row in float8 e4m3 and its float32 scale.

Why: the torch reference (serval.layers.fp8.quantize_rows) is an abs, a max, a division, a clamp and a cast, each
a kernel and a trip through memory; before a prefill GEMM over thousands of tokens those trips cost a fifth of the
GEMM itself. With GATED the row is the merged gate/up output and silu(gate) * up is formed on the way (SwiGLU
fused into the down projection's quantization: the activation never goes to memory in half precision).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from serval.kernels import pdl
from serval.layers.fp8 import FP8, FP8_MAX, MIN_SCALE


@triton.jit
def round_to_e4m3(x):
    """x clamped to float8 e4m3's +-448 and rounded to the nearest e4m3 value (ties to even), as a float32.

    The cast that follows is then exact on every backend. Triton's interpreter (the CPU tests) casts to float8 by
    cutting the mantissa without carrying into the exponent (off by up to 2x) and flushes e4m3's subnormals, so
    the kernel rounds for itself; compiled and interpreted, it matches torch's cast of the clamped value byte for
    byte (tests/test_triton_attention.py).
    """
    x = tl.clamp(x.to(tl.float32), -448.0, 448.0)
    bits = x.to(tl.int32, bitcast=True)
    # The e4m3 spacing at x's float32 exponent e is 2^(e - 3), and 2^-9 throughout the subnormals (below 2^-6, a
    # biased float32 exponent of 121). Adding and subtracting 1.5 * 2^23 spacings rounds to a multiple of the
    # spacing in float32's own round-to-nearest-even: the sum's ulp is the spacing.
    exponent = tl.maximum((bits >> 23) & 0xFF, 121)
    magic = (((exponent + 20) << 23) | 0x400000).to(tl.float32, bitcast=True)
    magnitude = (tl.abs(x) + magic) - magic
    sign = bits & -2147483648  # put the sign bit back: -0.0 stays -0.0, as in torch
    return (magnitude.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, stride_x, stride_q, K, fp8_max, min_scale,
                          GATED: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl.wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if GATED:  # rounded to the model dtype as silu_and_mul's output is
        gate = x.to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + K + cols, mask=mask, other=0.0).to(tl.float32)
        x = (gate * tl.sigmoid(gate) * up).to(x_ptr.dtype.element_ty)
    x32 = x.to(tl.float32)
    # div_rn: the correctly rounded division torch does (a plain / compiles to an approximate one on a GPU), so
    # both paths get the same scale and pick the same float8 values. One division per row: the elements are
    # multiplied by its reciprocal (a division each made this kernel 14% of a batch-256 decode step).
    scale = tl.maximum(tl.div_rn(tl.max(tl.abs(x32), axis=0), fp8_max), min_scale)
    q = round_to_e4m3(x32 * tl.div_rn(1.0, scale))
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_rows(x: torch.Tensor, gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (or [M, 2K] merged gate/up with gated) -> (float8 e4m3 [M, K], float32 scales [M, 1]) with
    x ~= q * scale row by row; serval.layers.fp8.quantize_rows is the reference."""
    rows, width = x.shape
    k = width // 2 if gated else width
    q = torch.empty((rows, k), dtype=FP8, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(k)
        _quantize_rows_kernel[(rows,)](
            x, q, scale, x.stride(0), q.stride(0), k, FP8_MAX, MIN_SCALE, GATED=gated, BLOCK=block,
            num_warps=min(max(block // 512, 1), 16), **pdl.launch_options(x))
    return q, scale
