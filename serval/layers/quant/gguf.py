"""GGUF 4-bit weights kept packed on the CPU (Q4_0, Q4_1, Q4_K): torch's int4 weight-only CPU kernel.

At load, each projection's GGUF blocks (`<module>.gguf_blocks`, uint8 [rows, bytes per row]) become 4-bit values
and one scale and zero per 32 weights (gguf_blocks.int4_blocks), repacked for torch._weight_int4pack_mm_for_cpu:

    qweight           uint8 [N, K / 2]          torch._convert_weight_to_int4pack_for_cpu of the values
    scales_and_zeros  bfloat16 [K / 32, N, 2]   w = (q - 8) * scale + zero, GGUF's dequantized weight

A Q4_1 weight takes 0.625 bytes in memory (0.5 for the value, 0.125 for its share of a bfloat16 scale and zero)
instead of 4 when dequantized, and the kernel reads those bytes, not float32 rows. The kernel computes in
bfloat16 (its float32 path is scalar, see KERNEL_DTYPE), so outputs carry bfloat16's rounding: the default
model's greedy answers equal the float32 dequantized model's except at near ties (tests/model/test_gguf_packed).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from serval.layers.activation import silu_and_mul
from serval.layers.quant.base import QuantMethod, check_loaded, mark_loaded, shard_rows
from serval.layers.quant.gguf_blocks import GROUP_SIZE, INT4_TYPES, Q, int4_blocks

# The inner K tiles of the CPU packing: the only value torch's CPU kernel takes.
_INNER_K_TILES = 2
_STAGING = "gguf_int4_staging"
# The kernel's activation and scale dtype. With float32 it takes a scalar path: 22 ms for a 1536 x 576 layer at
# batch 1 on this CPU, against 0.04 ms in bfloat16 (AVX512-BF16) and 0.25 ms for the float32 matmul it replaces.
KERNEL_DTYPE = torch.bfloat16
# The int4 kernel's rule for a layer's outputs.
ROW_MULTIPLE = 16
# torch's CPU int4 layout interleaves rows in blocks whose size follows the CPU's vector width (pack_int4_rows).
_PACK_ROW_CANDIDATES = (64, 32)


@dataclass
class _Staging:
    """A layer's weights while its shards load."""
    values: np.ndarray  # uint8 [N, K], 0..15
    scales_and_zeros: np.ndarray  # float32 [K / 32, N, 2]


def bfloat16_from_numpy(values: np.ndarray) -> torch.Tensor:
    """float32 -> bfloat16, rounded to nearest even as torch rounds, in numpy: torch's .to() of 120 small tensors
    spent seconds at its thread barriers on this 2-core machine under load."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return torch.from_numpy(rounded).view(torch.bfloat16)


def pack_int4_for_cpu(values: np.ndarray) -> torch.Tensor:
    """uint8 [N, K] values in 0..15 -> uint8 [N, K / 2], torch._convert_weight_to_int4pack_for_cpu's layout.

    That layout: rows in blocks of B (64 where torch's kernel runs AVX-512, 32 on AVX2: pack_int4_rows), each block
    [K][B / 2] bytes, byte (k, j) holding row j's value in its low nibble and row j + B / 2's in its high one.
    numpy writes it in one pass; torch's own packing takes 30 ms a layer here. Other N, or a layout the probe does
    not recognise, go through torch's.
    """
    n, k = values.shape
    rows = pack_int4_rows()
    if rows is None or n % rows:
        return torch._convert_weight_to_int4pack_for_cpu(torch.from_numpy(values.astype(np.int32)), _INNER_K_TILES)
    return torch.from_numpy(_interleave(values, rows))


def _interleave(values: np.ndarray, rows: int) -> np.ndarray:
    n, k = values.shape
    halves = values.reshape(n // rows, 2, rows // 2, k)
    packed = halves[:, 0] | (halves[:, 1] << 4)  # [blocks, rows / 2, K]
    return np.ascontiguousarray(packed.transpose(0, 2, 1)).reshape(n, k // 2)


@functools.cache
def pack_int4_rows() -> int | None:
    """The row block of this process's torch CPU int4 layout, found by packing a random matrix with torch once and
    comparing (the kernel picks its layout by the CPU's instruction set, so no constant is right everywhere);
    None if no candidate matches."""
    values = np.random.default_rng(0).integers(0, 16, (128, 64)).astype(np.uint8)
    expected = torch._convert_weight_to_int4pack_for_cpu(torch.from_numpy(values.astype(np.int32)),
                                                         _INNER_K_TILES).numpy()
    return next((rows for rows in _PACK_ROW_CANDIDATES
                 if np.array_equal(_interleave(values, rows), expected)), None)


def int4_kernel_available() -> bool:
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


@dataclass(frozen=True)
class GGUFInt4Method(QuantMethod):
    """A 4-bit GGUF type (qtype: "Q4_0", "Q4_1" or "Q4_K") kept packed, on the CPU."""

    qtype: str
    routed_tensors = ("gguf_blocks",)

    @property
    def name(self) -> str:
        return f"gguf {self.qtype}"

    def create_weights(self, layer) -> None:
        if Q[self.qtype] not in INT4_TYPES:
            raise ValueError(f"{self.name}: not a 4-bit type with 32-weight groups ({[t.name for t in INT4_TYPES]})")
        n, k = layer.out_features, layer.in_features
        device = layer.weight.device
        if device.type != "cpu":
            raise ValueError(f"{self.name}: packed GGUF weights run on the CPU only; this layer is on {device}")
        if k % GROUP_SIZE or n % ROW_MULTIPLE:
            raise ValueError(f"{self.name}: a {n} x {k} layer does not fit the int4 kernel (inputs in whole "
                             f"{GROUP_SIZE}-weight groups, outputs a multiple of {ROW_MULTIPLE})")
        layer.register_parameter("weight", None)  # the checkpoint has no float weight for this layer
        # Staged in numpy and packed once in finish(): torch's small ops on this 2-core CPU cost more in thread
        # barriers than in work (the load took 11 s instead of 1 s with per-shard torch copies).
        layer.__dict__[_STAGING] = _Staging(np.empty((n, k), dtype=np.uint8),
                                            np.empty((k // GROUP_SIZE, n, 2), dtype=np.float32))

    def load(self, layer, shard: str | None, suffix: str, tensor: torch.Tensor, hf_name: str) -> None:
        start, rows = shard_rows(layer, shard)
        k = layer.in_features
        blocks = int4_blocks(tensor.numpy(), Q[self.qtype])
        if blocks.values.shape != (rows, k):
            raise ValueError(f"{self.name}: {hf_name!r} holds {blocks.values.shape} weights; the layer expects "
                             f"[{rows}, {k}]")
        staging = layer.__dict__[_STAGING]
        staging.values[start:start + rows] = blocks.values
        staging.scales_and_zeros[:, start:start + rows, 0] = blocks.scales.T
        staging.scales_and_zeros[:, start:start + rows, 1] = blocks.zeros.T
        mark_loaded(layer, shard, suffix)

    def finish(self, layer, layer_name: str) -> None:
        check_loaded(layer, layer_name, self.name, self.routed_tensors)
        staging = layer.__dict__.pop(_STAGING)
        layer.register_buffer("qweight", pack_int4_for_cpu(staging.values))
        layer.register_buffer("scales_and_zeros", bfloat16_from_numpy(staging.scales_and_zeros))

    def apply(self, layer, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        if gated:
            x = silu_and_mul(x)
        rows = x.reshape(-1, x.shape[-1])
        y = torch._weight_int4pack_mm_for_cpu(rows.to(KERNEL_DTYPE), layer.qweight, GROUP_SIZE,
                                              layer.scales_and_zeros)
        if layer.bias is not None:
            y = y + layer.bias
        return y.to(x.dtype).view(*x.shape[:-1], layer.out_features)

