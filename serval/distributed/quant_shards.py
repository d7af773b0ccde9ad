"""One rank's slices of a quantized checkpoint's tensors (compressed-tensors FP8/INT8 W8A8 and W4A16, AWQ, GPTQ,
per-channel fp8), and the checks that a format's packing and groups fall on the shards' boundaries.

A projection's shard is a range of its weight's output rows (column-parallel: q/k/v, gate/up) or input columns
(row-parallel: o_proj, down_proj), `base` below. Each format stores that range in its own layout, so a rank reads
the matching range of each tensor:

    tensor (format)                   stored as      column-parallel (rows s..s+l)   row-parallel (columns s..s+l)
    weight (fp8, int8)                [N, K]         rows s..s+l                     columns s..s+l
    weight_scale (fp8, int8)          [N, 1] or [1]  rows s..s+l (per tensor: all)   all (one scale per row)
    qweight (gptq)                    [K/8, N]       columns s..s+l                  rows s/8..(s+l)/8
    qweight (awq)                     [K, N/8]       columns s/8..(s+l)/8            rows s..s+l
    qzeros (gptq, awq)                [G, N/8]       columns s/8..(s+l)/8            groups s/g..(s+l)/g
    scales (gptq, awq)                [G, N]         columns s..s+l                  groups s/g..(s+l)/g
    g_idx (gptq)                      [K]            all                             entries s..s+l
    weight_packed (compressed)        [N, K/8]       rows s..s+l                     columns s/8..(s+l)/8
    weight_scale (compressed W4A16)   [N, G]         rows s..s+l                     groups s/g..(s+l)/g
    weight_zero_point (compressed)    [N/8, G]       rows s/8..(s+l)/8               groups s/g..(s+l)/g
    weight_shape (compressed)         [2]            the shard's own [l, K]          the shard's own [N, l]

GPTQ with act-order (desc_act): the input columns are quantized in a permuted order, so a row-parallel shard's
columns belong to any of the G groups. Its rank reads its entries of g_idx and every group's scales and zero
points (G x N values, small beside the weights: W4A16Method.hold_every_group), as vLLM does.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from serval.layers.parallel import ShardLayout, TensorSlice, checkpoint_slice
from serval.layers.quant import CheckpointQuantization, QuantMethod
from serval.layers.quant.fp8 import BlockFp8Method, Fp8Method
from serval.layers.quant.int8 import Int8Method
from serval.layers.quant.w4a16 import W4A16Method

PACKED = 8  # 4-bit values per int32 word
# The formats a rank reads sliced (block fp8's slices are checkpoint_slice's own, in block units).
SHARDED_CHECKPOINT_METHODS = (Fp8Method, BlockFp8Method, Int8Method, W4A16Method)
_QUANTIZED_SUFFIXES = ("weight_scale", "input_scale", "qweight", "qzeros", "scales", "g_idx", "weight_packed",
                       "weight_zero_point", "weight_shape")


@dataclass(frozen=True)
class QuantizedSharding:
    """What a rank needs to slice a quantized checkpoint: its formats, and whether GPTQ's groups are permuted."""
    declared: CheckpointQuantization
    act_order: bool


@dataclass(frozen=True)
class QuantizedRead:
    """How a rank loads one quantized checkpoint tensor: these pieces of it (none: all of it). A compressed-tensors
    weight_shape holds the full projection's [N, K]: `narrowed_shape` says which entry becomes the shard's length.
    A GPTQ g_idx without act-order numbers the full projection's groups: `first_group` is the shard's first, which
    becomes its group 0 (its scales are its groups' only)."""
    pieces: list[TensorSlice]
    narrowed_shape: TensorSlice | None = None
    first_group: int = 0

    def finish(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.narrowed_shape is not None:
            tensor = tensor.clone()
            tensor.view(-1)[self.narrowed_shape.dim] = self.narrowed_shape.length
        return tensor - self.first_group if self.first_group else tensor


def quantized_sharding(hf_config, declared: CheckpointQuantization | None) -> QuantizedSharding | None:
    if declared is None:
        return None
    config = getattr(hf_config, "quantization_config", None) or {}
    if not isinstance(config, dict):
        config = config.to_dict()
    return QuantizedSharding(declared, bool(config.get("desc_act")) and declared.quant_method == "gptq")


def quantized_read(hf_name: str, layout: ShardLayout, sharding: QuantizedSharding,
                   shape: list[int]) -> QuantizedRead | None:
    """How rank layout.rank reads `hf_name` (stored with `shape`) when it is a format's own tensor of a sharded
    projection; None for any other tensor (checkpoint_slice's rules apply)."""
    module, _, suffix = hf_name.rpartition(".")
    if suffix not in _QUANTIZED_SUFFIXES:
        return None
    method = sharding.declared.method_for(module)
    base = checkpoint_slice(f"{module}.weight", layout)
    if method is None or base is None:
        return None
    if isinstance(method, W4A16Method):
        return _w4a16_read(method, suffix, base, sharding.act_order)
    if suffix == "weight_scale" and base.dim == 0 and shape and shape[0] > 1:  # per channel: the shard's rows
        return QuantizedRead([TensorSlice(0, base.start, base.length, base.length)])
    return QuantizedRead([])  # per-tensor scales, input scales, a row-parallel shard's per-row scales: whole


def _w4a16_read(method: W4A16Method, suffix: str, base: TensorSlice, act_order: bool) -> QuantizedRead:
    start, length = base.start, base.length
    if suffix == "weight_shape":
        return QuantizedRead([], narrowed_shape=base)
    group = method.group_size

    def piece(dim: int, unit: int = 1) -> QuantizedRead:
        return QuantizedRead([TensorSlice(dim, start // unit, length // unit, length // unit)])

    def groups(dim: int) -> QuantizedRead:  # one group (per channel) or permuted groups: every rank all of them
        if group == -1 or act_order:
            return QuantizedRead([])
        return piece(dim, group)

    if method.layout == "compressed-tensors":  # [N, K/8], [N, G], [N/8, G]
        if base.dim == 0:
            return {"weight_packed": piece(0), "weight_scale": piece(0)}.get(suffix) or piece(0, PACKED)
        return piece(1, PACKED) if suffix == "weight_packed" else groups(1)
    awq = method.layout == "awq"
    if base.dim == 0:  # the output columns of [K/8, N] / [K, N/8], [G, N/8], [G, N], all of g_idx [K]
        return {"qweight": piece(1, PACKED if awq else 1), "qzeros": piece(1, PACKED), "scales": piece(1),
                "g_idx": QuantizedRead([])}[suffix]
    if suffix == "qweight":
        return piece(0, 1 if awq else PACKED)
    if suffix == "g_idx":
        first_group = 0 if group == -1 or act_order else start // group
        return QuantizedRead([TensorSlice(0, start, length, length)], first_group=first_group)
    return groups(0)


def check_quantized_layout(layout: ShardLayout, method: QuantMethod) -> None:
    """Raise ValueError naming the projection whose rank shard a 4-bit format cannot split: output rows not whole
    int32 words of zero points (8 columns), input columns not whole words or whole groups."""
    if not isinstance(method, W4A16Method):
        return
    q_rows, kv_rows = layout.local_num_heads * layout.head_dim, layout.local_num_kv_heads * layout.head_dim
    kv_starts = [replace(layout, rank=rank).first_kv_head * layout.head_dim for rank in range(layout.size)]
    kv_start = next((start for start in kv_starts if start % PACKED), 0)
    inputs = method.group_size if method.group_size != -1 else PACKED
    checks = [("q_proj", "output rows", q_rows, PACKED), ("k_proj/v_proj", "output rows", kv_rows, PACKED),
              ("k_proj/v_proj", "first output row", kv_start, PACKED),
              ("gate_proj/up_proj", "output rows", layout.local_intermediate_size, PACKED),
              ("o_proj", "input columns", q_rows, inputs),
              ("down_proj", "input columns", layout.local_intermediate_size, inputs)]
    for projection, what, value, unit in checks:
        if value % unit:
            kind = "groups" if unit == method.group_size else "int32 words"
            raise ValueError(f"tensor_parallel_size={layout.size}: each rank's shard of {projection} ({value} "
                             f"{what}) is not whole {method.name} {kind} of {unit}; the checkpoint's packing cannot "
                             "be split between ranks there")

