"""4-bit weight-only formats (W4A16): GPTQ, AWQ (GEMM layout) and compressed-tensors `pack-quantized`, each
repacked at load into the one layout serval.kernels.triton_w4a16 reads (qweight [K/8, N], scales and uint8 zero
points [G, N], g_idx [K]). The formats differ only in how they pack:

    gptq                qweight [K/8, N] int32, 8 rows per word in order; qzeros [G, N/8], 8 columns per word,
                        each stored as zero - 1 (checkpoint_format "gptq"; "gptq_v2" stores the zero itself);
                        scales [G, N]; g_idx [K] (act-order when desc_act)
    awq                 qweight [K, N/8] int32, word nibble j holds column 8c + [0, 2, 4, 6, 1, 3, 5, 7][j];
                        qzeros [G, N/8] the same; scales [G, N]
    compressed-tensors  weight_packed [N, K/8] int32, 8 columns of K per word in order, value + 8;
                        weight_scale [N, G]; weight_zero_point [N/8, G] packed along N (asymmetric only);
                        weight_shape [2] = (N, K)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from serval.layers.quant.base import QuantMethod, check_loaded, mark_loaded, shard_rows

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
SEQUENTIAL = tuple(range(8))
SUPPORTED_GROUP_SIZES = (32, 64, 128)


def unpack_int4(packed: torch.Tensor, dim: int, order: tuple[int, ...] = SEQUENTIAL) -> torch.Tensor:
    """int32 words -> the 4-bit unsigned values they hold, 8 per word along dim (nibble j is element order[j])."""
    packed = packed.movedim(dim, -1)
    shifts = torch.tensor([4 * order.index(i) for i in range(8)], dtype=torch.int32, device=packed.device)
    values = (packed[..., None] >> shifts) & 0xF
    return values.reshape(*packed.shape[:-1], -1).movedim(-1, dim)


def pack_int4(values: torch.Tensor, dim: int, order: tuple[int, ...] = SEQUENTIAL) -> torch.Tensor:
    """The inverse of unpack_int4: unsigned 4-bit values (any integer dtype) -> int32 words along dim."""
    values = values.movedim(dim, -1).long()
    values = values.reshape(*values.shape[:-1], -1, 8)
    words = torch.zeros(values.shape[:-1], dtype=torch.long, device=values.device)
    for j, element in enumerate(order):
        words |= (values[..., element] & 0xF) << (4 * j)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)
    return words.to(torch.int32).movedim(-1, dim).contiguous()


@dataclass(frozen=True)
class W4A16Method(QuantMethod):
    """4-bit integer weights, a scale and a zero point per group_size rows of K; x stays in its dtype."""

    layout: str  # "gptq", "awq" or "compressed-tensors"
    group_size: int  # -1: one group over all of K (per channel)
    symmetric: bool = True
    zero_offset: int = 0  # added to stored zero points (1 for GPTQ's original format)

    @property
    def name(self) -> str:
        return f"{self.layout} (4-bit)"

    @property
    def routed_tensors(self) -> tuple[str, ...]:
        if self.layout == "compressed-tensors":
            return ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
        return ("qweight", "qzeros", "scales", "g_idx")

    def _required(self) -> tuple[str, ...]:
        if self.layout == "compressed-tensors":
            return ("weight_packed", "weight_scale", "weight_shape") + (() if self.symmetric else
                                                                        ("weight_zero_point",))
        return ("qweight", "qzeros", "scales")

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def create_weights(self, layer) -> None:
        k, n = layer.in_features, layer.out_features
        group = k if self.group_size == -1 else self.group_size
        if k % 8 or k % group:
            raise ValueError(f"{self.name}: a layer of {k} inputs cannot hold groups of {group} packed 8 a word")
        device, dtype = layer.weight.device, layer.weight.dtype
        layer.register_parameter("weight", None)  # the checkpoint has no float weight for this layer
        layer.register_buffer("qweight", torch.zeros(k // 8, n, dtype=torch.int32, device=device))
        layer.register_buffer("scales", torch.zeros(k // group, n, dtype=dtype, device=device))
        layer.register_buffer("zeros", torch.full((k // group, n), 8, dtype=torch.uint8, device=device))
        layer.register_buffer("g_idx", (torch.arange(k, device=device) // group).int())

    def hold_every_group(self, layer, num_groups: int) -> None:
        """Room for every group's scales and zero points: a row-parallel shard (serval.distributed) of an
        act-order checkpoint, whose input columns may belong to any of the full projection's num_groups groups."""
        scales = layer.scales
        layer.register_buffer("scales", scales.new_zeros(num_groups, layer.out_features))
        layer.register_buffer("zeros", torch.full((num_groups, layer.out_features), 8, dtype=torch.uint8,
                                                  device=scales.device))

    def load(self, layer, shard: str | None, suffix: str, tensor: torch.Tensor, hf_name: str) -> None:
        start, rows = shard_rows(layer, shard)
        columns = slice(start, start + rows)
        k = layer.in_features
        if self.layout == "compressed-tensors":
            value = self._compressed_tensors(suffix, tensor, rows, k, hf_name)
        else:
            value = self._gptq_or_awq(suffix, tensor, hf_name)
        if suffix == "g_idx":
            value = value.int()
            loaded_before = any(s == "g_idx" for _, s in layer.__dict__.get("quant_loaded", ()))
            if value.shape != layer.g_idx.shape or int(value.min()) < 0 or int(value.max()) >= len(layer.scales):
                raise ValueError(f"{self.name}: {hf_name!r} is not a group index of {k} inputs in "
                                 f"{len(layer.scales)} groups")
            if loaded_before and not torch.equal(layer.g_idx, value):
                raise ValueError(f"{self.name}: {hf_name!r} orders the inputs differently from the projections "
                                 "merged with it; Serval needs one g_idx per merged layer")
            layer.g_idx.copy_(value)
        elif value is not None:
            target = getattr(layer, _TARGET[suffix])[:, columns]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{self.name}: {hf_name!r} has shape {tuple(tensor.shape)}; a [{rows}, {k}] "
                                 f"projection in groups of {self.group_size} needs the layout of "
                                 f"{tuple(target.shape)} once repacked")
            target.copy_(value)
        mark_loaded(layer, shard, suffix)

    def _gptq_or_awq(self, suffix: str, tensor: torch.Tensor, hf_name: str) -> torch.Tensor:
        awq = self.layout == "awq"
        if suffix == "qweight":  # to [K/8, N] with rows in order
            return pack_int4(unpack_int4(tensor, 1, AWQ_ORDER), 0) if awq else tensor
        if suffix == "qzeros":
            zeros = unpack_int4(tensor, 1, AWQ_ORDER if awq else SEQUENTIAL) + self.zero_offset
            return zeros.to(torch.uint8)
        if suffix == "g_idx":
            if awq:
                raise ValueError(f"{self.name}: {hf_name!r}: AWQ checkpoints carry no g_idx")
            return tensor.int()
        return tensor

    def _compressed_tensors(self, suffix: str, tensor: torch.Tensor, rows: int, k: int,
                            hf_name: str) -> torch.Tensor | None:
        if suffix == "weight_shape":
            if [int(v) for v in tensor.reshape(-1)] != [rows, k]:
                raise ValueError(f"{self.name}: {hf_name!r} says {tensor.tolist()}; the model expects [{rows}, {k}]")
            return None
        if suffix == "weight_packed":  # [N, K/8] along K -> [K/8, N] along K
            return pack_int4(unpack_int4(tensor, 1).t(), 0)
        if suffix == "weight_scale":
            return tensor.t()
        if suffix == "weight_zero_point":
            return unpack_int4(tensor, 0).t().to(torch.uint8)
        raise ValueError(f"{self.name}: {hf_name!r} is not a tensor of this format")

    def finish(self, layer, layer_name: str) -> None:
        check_loaded(layer, layer_name, self.name, self._required())
        _note_group_order(layer)

    def quantize_dense(self, layer) -> None:
        """Symmetric round-to-nearest into the packed layout (dummy weights for benchmarks)."""
        weight = layer.weight.float().t()  # [K, N]
        k, n = weight.shape
        group = k if self.group_size == -1 else self.group_size
        self.create_weights(layer)
        grouped = weight.reshape(k // group, group, n)
        scale = (grouped.abs().amax(dim=1) / 7).clamp_min(1e-12)
        q = (grouped / scale[:, None, :]).round().clamp(-8, 7) + 8
        layer.qweight.copy_(pack_int4(q.reshape(k, n), 0))
        layer.scales.copy_(scale)
        _note_group_order(layer)

    def apply(self, layer, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        from serval.kernels import triton_w4a16
        from serval.layers.activation import silu_and_mul
        if gated:
            x = silu_and_mul(x)
        rows = x.reshape(-1, x.shape[-1])
        y = triton_w4a16.linear(rows, layer.qweight, layer.scales, layer.zeros, layer.g_idx, layer.bias,
                                group_size=getattr(layer, "w4a16_group_in_order", None))
        return y.view(*x.shape[:-1], layer.out_features)


def _note_group_order(layer) -> None:
    """Remember, once, whether the layer's groups are in order (no act-order): the kernels then read one scale row
    per tile instead of gathering one per weight."""
    from serval.kernels import triton_w4a16
    layer.w4a16_group_in_order = triton_w4a16.groups_in_order(layer.g_idx, layer.scales.shape[0])


_TARGET = {"qweight": "qweight", "qzeros": "zeros", "scales": "scales", "weight_packed": "qweight",
           "weight_scale": "scales", "weight_zero_point": "zeros"}
