"""GGUF weights kept in their blocks for the Triton kernels (serval.kernels.triton_gguf): the GPU's packed GGUF path.

A projection's GGUF data (`<module>.gguf_blocks`, uint8 [rows, bytes per row], one row of blocks per output) is
copied as it is into the layer's `gguf_blocks` buffer, uint8 [N, K / QK * type size]: no repacking, so a layer
holds the file's bytes per weight (Q4_K 0.5625, Q4_1 0.625, Q6_K 0.82, Q8_0 1.0625) instead of 2 (bfloat16) or 4
(float32) when dequantized. The kernels dequantize each tile in registers. On the CPU it runs in Triton's
interpreter (tests); serving on the CPU keeps the int4 path (serval.layers.quant.gguf).
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

from serval.layers.activation import silu_and_mul
from serval.layers.quant.base import QuantMethod, check_loaded, mark_loaded, shard_rows

# Types gguf's own Python quantizer writes: what quantize_dense (dummy weights for benchmarks) can make.
QUANTIZABLE_TYPES = ("Q8_0", "Q4_0", "Q4_1")


@dataclass(frozen=True)
class GGUFTritonMethod(QuantMethod):
    """A GGUF type (qtype: a name in triton_gguf.SUPPORTED_TYPES) kept as its raw blocks, run by Triton."""

    qtype: str
    routed_tensors = ("gguf_blocks",)

    @property
    def name(self) -> str:
        return f"gguf {self.qtype}"

    def create_weights(self, layer) -> None:
        from serval.kernels import triton_gguf
        qtype = gguf.GGMLQuantizationType[self.qtype]
        if qtype not in triton_gguf.SUPPORTED_TYPES:
            raise ValueError(f"{self.name}: no Triton kernel for this type; supported: "
                             f"{[t.name for t in triton_gguf.SUPPORTED_TYPES]}")
        k = layer.in_features
        if k % triton_gguf.block_size(qtype):
            raise ValueError(f"{self.name}: a layer of {k} inputs does not hold whole blocks of "
                             f"{triton_gguf.block_size(qtype)} weights")
        device = layer.weight.device
        layer.register_parameter("weight", None)  # the checkpoint has no float weight for this layer
        layer.register_buffer("gguf_blocks", torch.zeros(layer.out_features, triton_gguf.row_bytes(qtype, k),
                                                         dtype=torch.uint8, device=device))

    def load(self, layer, shard: str | None, suffix: str, tensor: torch.Tensor, hf_name: str) -> None:
        start, rows = shard_rows(layer, shard)
        target = layer.gguf_blocks[start:start + rows]
        if tensor.dtype != torch.uint8 or tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"{self.name}: {hf_name!r} holds {tensor.dtype} {tuple(tensor.shape)}; the layer "
                             f"expects uint8 {tuple(target.shape)} ({rows} rows of {self.qtype} blocks)")
        target.copy_(tensor)
        mark_loaded(layer, shard, suffix)

    def finish(self, layer, layer_name: str) -> None:
        check_loaded(layer, layer_name, self.name, self.routed_tensors)

    def quantize_dense(self, layer) -> None:
        """The layer's float weight into GGUF blocks with gguf's quantizer (dummy weights for benchmarks)."""
        if self.qtype not in QUANTIZABLE_TYPES:
            raise ValueError(f"{self.name}: gguf's quantizer cannot write this type; dummy weights can be "
                             f"{list(QUANTIZABLE_TYPES)}")
        weight = layer.weight.detach().float().cpu().numpy()
        raw = gguf.quants.quantize(np.ascontiguousarray(weight), gguf.GGMLQuantizationType[self.qtype])
        self.create_weights(layer)
        layer.gguf_blocks.copy_(torch.from_numpy(raw))

    def apply(self, layer, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        from serval.kernels import triton_gguf
        if gated:
            x = silu_and_mul(x)
        rows = x.reshape(-1, x.shape[-1])
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        y = triton_gguf.matmul(rows, layer.gguf_blocks, gguf.GGMLQuantizationType[self.qtype])
        if layer.bias is not None:
            y += layer.bias
        return y.view(*x.shape[:-1], layer.out_features)
