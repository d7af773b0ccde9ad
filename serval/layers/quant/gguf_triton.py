"""GGUF weights kept in their blocks for the Triton kernels (serval.kernels.triton_gguf): the GPU's packed GGUF path.

A projection's GGUF data (`<module>.gguf_blocks`, uint8 [rows, bytes per row], one row of blocks per output) is
copied as it is into the layer's `gguf_blocks` buffer, uint8 [N, K / QK * type size]: no repacking, so a layer
holds the file's bytes per weight (Q4_K 0.5625, Q4_1 0.625, Q6_K 0.82, Q8_0 1.0625) instead of 2 (bfloat16) or 4
(float32) when dequantized. The kernels dequantize each tile in registers.

A merged layer whose projections the file stores in different types (llama.cpp's Q4_K_M gives some layers' v_proj
Q6_K or Q8_0 beside a Q4_K q/k) keeps one buffer per projection, `gguf_blocks_<shard>`, and runs one kernel per
projection into its columns of the output.

On the CPU this runs in Triton's interpreter (tests); serving on the CPU keeps the int4 path
(serval.layers.quant.gguf).
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

from serval.layers.activation import silu_and_mul
from serval.layers.quant.base import QuantMethod, check_loaded, mark_loaded, shard_rows

# Types gguf's own Python quantizer writes: what quantize_dense (dummy weights for benchmarks) can make.
QUANTIZABLE_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
BUFFER = "gguf_blocks"


@dataclass(frozen=True)
class GGUFTritonMethod(QuantMethod):
    """GGUF blocks run by Triton. qtype: the type's name (one of triton_gguf.SUPPORTED_TYPES); shard_types:
    for a merged layer of several types, (shard, type name) of each projection, in the layer's order (qtype is
    then only a label)."""

    qtype: str
    shard_types: tuple[tuple[str, str], ...] = ()
    routed_tensors = ("gguf_blocks",)

    @property
    def name(self) -> str:
        return f"gguf {self.qtype}"

    def _buffers(self, layer) -> list[tuple[str | None, str, gguf.GGMLQuantizationType]]:
        """(shard, buffer name, type) of each buffer the layer holds."""
        if not self.shard_types:
            return [(None, BUFFER, _qtype(self.name, self.qtype))]
        if tuple(shard for shard, _ in self.shard_types) != layer.shard_names:
            raise ValueError(f"{self.name}: types given for projections {[s for s, _ in self.shard_types]}, but "
                             f"the layer merges {list(layer.shard_names)}")
        return [(shard, f"{BUFFER}_{shard}", _qtype(self.name, name)) for shard, name in self.shard_types]

    def create_weights(self, layer) -> None:
        from serval.kernels import triton_gguf
        k = layer.in_features
        device = layer.weight.device
        for shard, buffer, qtype in self._buffers(layer):
            if k % triton_gguf.block_size(qtype):
                raise ValueError(f"{self.name}: a layer of {k} inputs does not hold whole {qtype.name} blocks of "
                                 f"{triton_gguf.block_size(qtype)} weights")
            rows = shard_rows(layer, shard)[1]
            layer.register_buffer(buffer, torch.zeros(rows, triton_gguf.row_bytes(qtype, k), dtype=torch.uint8,
                                                      device=device))
        layer.register_parameter("weight", None)  # the checkpoint has no float weight for this layer

    def load(self, layer, shard: str | None, suffix: str, tensor: torch.Tensor, hf_name: str) -> None:
        if self.shard_types:
            if shard is None:
                raise ValueError(f"{self.name}: {hf_name!r} stores the merged projections as one tensor; their "
                                 "types differ, so each must come on its own")
            target = getattr(layer, f"{BUFFER}_{shard}")
        else:
            start, rows = shard_rows(layer, shard)
            target = layer.gguf_blocks[start:start + rows]
        if tensor.dtype != torch.uint8 or tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"{self.name}: {hf_name!r} holds {tensor.dtype} {tuple(tensor.shape)}; the layer "
                             f"expects uint8 {tuple(target.shape)} (rows of GGUF blocks)")
        target.copy_(tensor)
        mark_loaded(layer, shard, suffix)

    def finish(self, layer, layer_name: str) -> None:
        check_loaded(layer, layer_name, self.name, self.routed_tensors)

    def quantize_dense(self, layer) -> None:
        """The layer's float weight into GGUF blocks with gguf's quantizer (dummy weights for benchmarks)."""
        if self.shard_types or self.qtype not in QUANTIZABLE_TYPES:
            raise ValueError(f"{self.name}: gguf's quantizer cannot write this; dummy weights can be one of "
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
        parts = [triton_gguf.matmul(rows, getattr(layer, buffer), qtype) for _, buffer, qtype in self._buffers(layer)]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        if layer.bias is not None:
            y += layer.bias
        return y.view(*x.shape[:-1], layer.out_features)


def _qtype(format_name: str, type_name: str) -> gguf.GGMLQuantizationType:
    from serval.kernels import triton_gguf
    qtype = getattr(gguf.GGMLQuantizationType, type_name, None)
    if qtype not in triton_gguf.SUPPORTED_TYPES:
        raise ValueError(f"{format_name}: no Triton kernel for {type_name}; supported: "
                         f"{[t.name for t in triton_gguf.SUPPORTED_TYPES]}")
    return qtype
