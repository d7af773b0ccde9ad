"""FP8 formats on a Linear layer: per-channel W8A8 (vLLM's dynamic fp8, fp8 and compressed-tensors checkpoints
with per-tensor or per-channel scales) and block-wise FP8 (Qwen3-FP8, DeepSeek-V3: one scale per 128x128 block).

Per-channel: the math is serval.layers.fp8. A checkpoint's per-tensor scale is repeated per row, and its static
activation scale (`input_scale`) is not used: activations are quantized per token instead, which is never less
precise.

Block-wise: the checkpoint's `weight` [N, K] float8 e4m3 and `weight_scale_inv` [ceil(N/bn), ceil(K/bk)] (the
dequantization multiplier, despite the name) are kept as written, except that the scales are repeated per row
([N, K/bk]): the rows of q, k and v need not start on a block boundary of the merged layer, and a row's scale
costs 4 bytes per 128 weights. Activations are quantized per token and per group of bk columns
(serval.kernels.triton_fp8_block), so each bk-long slice of the product has one scale per side.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from serval.layers import fp8
from serval.layers.activation import silu_and_mul
from serval.layers.quant.base import QuantMethod, check_loaded, mark_loaded, shard_rows


@dataclass(frozen=True)
class Fp8Method(QuantMethod):
    """float8 e4m3 weight [N, K] with one float32 scale per row, activations quantized per token."""

    name = "fp8"

    def create_weights(self, layer) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.weight.shape, dtype=fp8.FP8, device=layer.weight.device),
                                    requires_grad=False)
        layer.weight_scale = torch.empty(layer.out_features, dtype=torch.float32, device=layer.weight.device)

    def quantize_dense(self, layer) -> None:
        qweight, layer.weight_scale = fp8.quantize_weight(layer.weight)
        layer.weight = nn.Parameter(qweight, requires_grad=False)

    def apply(self, layer, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        from serval.layers.linear import takes_gemv, takes_small_batch_gemv
        if takes_gemv(x, 2 * layer.in_features if gated else layer.in_features):
            from serval.kernels import triton_gemv
            out = triton_gemv.gemv(x, layer.weight, layer.bias, gated=gated, weight_scale=layer.weight_scale)
            return out.view(*x.shape[:-1], layer.out_features)
        if takes_small_batch_gemv(x, 2 * layer.in_features if gated else layer.in_features):
            from serval.kernels import triton_gemv  # x stays unquantized, as in the one-row GEMV
            out = triton_gemv.gemv_rows(x, layer.weight, layer.bias, gated=gated, weight_scale=layer.weight_scale)
            return out.view(*x.shape[:-1], layer.out_features)
        return fp8.linear(x, layer.weight, layer.weight_scale, layer.bias, gated=gated)


@dataclass(frozen=True)
class BlockFp8Method(QuantMethod):
    """float8 e4m3 weight [N, K] with one scale per block_n x block_k block, activations per token and group."""

    block_n: int = 128
    block_k: int = 128
    name = "fp8 (block-wise)"
    routed_tensors = ("weight_scale_inv",)

    def create_weights(self, layer) -> None:
        self._check_shape(layer)
        device = layer.weight.device
        layer.weight = nn.Parameter(torch.empty(layer.weight.shape, dtype=fp8.FP8, device=device),
                                    requires_grad=False)
        layer.register_buffer("weight_scale_inv", torch.empty(
            layer.out_features, -(-layer.in_features // self.block_k), dtype=torch.float32, device=device))

    def load(self, layer, shard: str | None, suffix: str, tensor: torch.Tensor, hf_name: str) -> None:
        start, rows = shard_rows(layer, shard)
        k_blocks = layer.weight_scale_inv.shape[1]
        expected = (-(-rows // self.block_n), k_blocks)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{self.name}: {hf_name!r} has shape {tuple(tensor.shape)}; a [{rows}, "
                             f"{layer.in_features}] weight in {self.block_n}x{self.block_k} blocks needs {expected}")
        per_row = tensor.float().repeat_interleave(self.block_n, dim=0)[:rows]
        layer.weight_scale_inv[start:start + rows].copy_(per_row)
        mark_loaded(layer, shard, suffix)

    def finish(self, layer, layer_name: str) -> None:
        check_loaded(layer, layer_name, self.name, self.routed_tensors)

    def _check_shape(self, layer) -> None:
        # Activations are quantized in groups of block_k columns: a partial group has no kernel.
        if layer.in_features % self.block_k:
            raise ValueError(f"{self.name}: a layer of {layer.in_features} inputs is not a whole number of "
                             f"{self.block_k}-column blocks")

    def quantize_dense(self, layer) -> None:
        self._check_shape(layer)
        from serval.kernels.triton_fp8_block import quantize_weight_blocks
        qweight, block_scales = quantize_weight_blocks(layer.weight, self.block_n, self.block_k)
        layer.weight = nn.Parameter(qweight, requires_grad=False)
        per_row = block_scales.repeat_interleave(self.block_n, dim=0)[:layer.out_features]
        layer.register_buffer("weight_scale_inv", per_row.contiguous())

    def apply(self, layer, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        from serval.kernels import triton_fp8_block
        from serval.layers.linear import takes_gemv
        if takes_gemv(x, 2 * layer.in_features if gated else layer.in_features) and self.block_k & (
                self.block_k - 1) == 0:
            from serval.kernels import triton_gemv
            out = triton_gemv.block_scaled_gemv(x, layer.weight, layer.weight_scale_inv, self.block_k, layer.bias,
                                                gated=gated)
            return out.view(*x.shape[:-1], layer.out_features)
        if gated:
            x = silu_and_mul(x)
        rows = x.reshape(-1, x.shape[-1])
        y = triton_fp8_block.linear(rows, layer.weight, layer.weight_scale_inv, self.block_k, layer.bias)
        return y.view(*x.shape[:-1], layer.out_features)
