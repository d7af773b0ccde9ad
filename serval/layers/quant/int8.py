"""INT8 W8A8 (compressed-tensors `int-quantized`, SmoothQuant-style checkpoints): int8 weight [N, K] with one
float32 scale per row (a per-tensor scale is repeated), activations quantized per token to int8 at run time.

The product is exact in int32: torch._int_mm on a GPU where its shape rules hold (more than 16 rows, K and N
multiples of 8), else the same integers multiplied in float32 (the reference, and what the CPU runs). A
checkpoint's static activation scale is not used: a per-token scale is never less precise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from serval.layers.activation import silu_and_mul
from serval.layers.quant.base import QuantMethod

INT8_MAX = 127.0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 [M, K], float32 scales [M, 1]), symmetric, one scale per row."""
    x32 = x.float()
    scale = (x32.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp_min(1e-12)
    return (x32 / scale).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def int8_product(q_x: torch.Tensor, q_weight: torch.Tensor) -> torch.Tensor:
    """q_x [M, K] @ q_weight [N, K]^T as float32 (exact int32 sums where torch._int_mm runs)."""
    m, k = q_x.shape
    if q_x.is_cuda and m > 16 and k % 8 == 0 and q_weight.shape[0] % 8 == 0:
        return torch._int_mm(q_x, q_weight.t()).float()
    return q_x.float() @ q_weight.float().t()


@dataclass(frozen=True)
class Int8Method(QuantMethod):
    name = "compressed-tensors int8 W8A8"

    def create_weights(self, layer) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.weight.shape, dtype=torch.int8, device=layer.weight.device),
                                    requires_grad=False)
        layer.weight_scale = torch.empty(layer.out_features, dtype=torch.float32, device=layer.weight.device)

    def quantize_dense(self, layer) -> None:
        q, scale = quantize_rows(layer.weight)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = scale.reshape(-1)

    def apply(self, layer, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        if gated:
            x = silu_and_mul(x)
        rows = x.reshape(-1, x.shape[-1])
        q_x, x_scale = quantize_rows(rows)
        y = (int8_product(q_x, layer.weight) * x_scale * layer.weight_scale).to(x.dtype)
        if layer.bias is not None:
            y += layer.bias
        return y.view(*x.shape[:-1], layer.out_features)
