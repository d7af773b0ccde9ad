"""FP8 linear algebra for quantization="fp8" (vLLM's dynamic fp8, from a half-precision checkpoint): weights in
float8 e4m3 with one scale per output channel, taken once at load; activations quantized per token at run time;
the product on the tensor cores' float8 path (torch._scaled_mm, cuBLASLt on an H100; on CPU the same product in
float32) with both scales applied to its float32 accumulator.

Why: a Hopper GPU multiplies float8 at twice its bfloat16 rate and a decode step reads half the bytes of weight,
so the prefill-bound and the memory-bound ends of serving both gain. Per-channel and per-token scales keep an
outlier in one row or one token from costing every other row its precision.

The functions here are the reference; on a GPU quantize_rows runs serval.kernels.triton_quant and a single row
goes to the Triton GEMV (serval.layers.linear decides).
"""
from __future__ import annotations

import os

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# A row of zeros gets this scale instead of 0 (no division by zero; its values quantize to 0 either way).
MIN_SCALE = 1e-12


def _fast_accumulation() -> bool:
    """Let the tensor cores keep their float8 accumulator through the whole K loop instead of promoting it to float32
    every few steps (cuBLASLt's fast accumulation, which vLLM's and SGLang's fp8 GEMMs use for inference too): the
    GEMMs run faster at a precision cost below the quantization's own. SERVAL_FP8_FAST_ACCUM=0 turns it off."""
    return os.environ.get("SERVAL_FP8_FAST_ACCUM", "1") != "0"


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (float8 e4m3 [N, K], float32 scales [N]) with weight ~= q * scale[:, None]."""
    weight32 = weight.float()
    scale = (weight32.abs().amax(dim=1) / FP8_MAX).clamp_min(MIN_SCALE)
    q = (weight32 / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def quantize_rows(x: torch.Tensor, gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8 e4m3 [M, K], float32 scales [M, 1]), one scale per row (token). gated: x is a merged
    gate/up output [M, 2K] and silu(gate) * up is what is quantized."""
    if x.is_cuda:
        from serval.kernels import triton_quant
        return triton_quant.quantize_rows(x, gated)
    if gated:
        from serval.layers.activation import silu_and_mul
        x = silu_and_mul(x)
    x32 = x.float()
    scale = (x32.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)
    # Times the reciprocal, as the kernel does (one division per row there).
    return (x32 * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
           gated: bool = False) -> torch.Tensor:
    """x [..., K] @ (weight * weight_scale[:, None]).T + bias in x's dtype, with x quantized per token first
    (gated: x is [..., 2K] and the product is with silu(gate) * up)."""
    rows = x.reshape(-1, x.shape[-1])
    q, scale = quantize_rows(rows, gated)
    if x.is_cuda:
        y = torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale.view(1, -1), out_dtype=x.dtype,
                             use_fast_accum=_fast_accumulation())
    else:  # the same product in float32 (CPU torch's _scaled_mm takes per-row scales only in some versions)
        y = ((q.float() @ weight.float().t()) * scale * weight_scale).to(x.dtype)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], weight.shape[0])
