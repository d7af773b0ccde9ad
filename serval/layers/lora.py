"""LoRALinear: a projection of the base model plus, per row of the batch, its request's adapter (if any).

The base layer is kept whole and runs first, exactly as without LoRA; the adapters' term is added to its output:
    y = base(x);  for each slice s of the projection: y[:, slice s] += B_s[slot] @ (A_s[slot] @ x)
A merged projection (q/k/v, gate/up) has one slice per part, each with its own adapter pair; their A matrices are
stacked, so one shrink serves all slices, and one expand writes every slice into its columns of y: two launches
per projection. Every slot holds
max_lora_rank rows of A and columns of B: an adapter of lower rank, or one that leaves a slice out, is zero there.

Which slot each row uses is the step's LoRABatch (serval.lora.batch), on a LoRAContext that every LoRA layer of the
model shares and the model runner sets; with none set (no adapter in the step) the layer is the base layer.
The stacked lora_a / lora_b buffers are allocated once and adapters are copied into their slots in place
(set_slot), so decode graphs captured over them stay valid as adapters come and go.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from serval.layers.activation import silu_and_mul
from serval.kernels.triton_lora import ColumnSlice
from serval.layers.linear import Linear
from serval.lora.batch import LoRABatch


@dataclass
class LoRAContext:
    """The LoRA batch of the step being run; None while no request of it has an adapter."""
    batch: LoRABatch | None = None
    use_triton: bool = False  # the Triton kernels (CUDA); else the torch reference


@dataclass(frozen=True)
class LoRASlice:
    name: str | None  # the merged projection's part (q, k, v, gate, up), None for an unmerged one
    offset: int  # its first output column
    size: int


class LoRALinear(nn.Module):
    def __init__(self, base: Linear, context: LoRAContext, max_loras: int, max_lora_rank: int) -> None:
        super().__init__()
        self.base = base
        self.context = context
        self.max_lora_rank = max_lora_rank
        if base.shard_names:
            self.slices = tuple(LoRASlice(name, base.offsets[name], base.output_sizes[name])
                                for name in base.shard_names)
        else:
            self.slices = (LoRASlice(None, 0, base.out_features),)
        self.column_slices = tuple(ColumnSlice(part.offset, part.size) for part in self.slices)
        weight = base.weight
        dtype = weight.dtype if weight.is_floating_point() and weight.element_size() >= 2 else torch.bfloat16
        rank_rows = len(self.slices) * max_lora_rank
        self.register_buffer("lora_a", torch.zeros(max_loras, rank_rows, base.in_features, dtype=dtype,
                                                   device=weight.device), persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_loras, base.out_features, max_lora_rank, dtype=dtype,
                                                   device=weight.device), persistent=False)

    # The base layer's interface, which the model uses: its sizes, split of a merged output, fused SwiGLU.
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.base.split(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.context.batch
        if batch is None:
            return y
        return self.add_lora(y, x, batch)

    def forward_silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        y = self.base.forward_silu_and_mul(gate_up)
        batch = self.context.batch
        if batch is None:
            return y
        # The base keeps its fused path (a decode graph with LoRA runs every step through here); the adapters
        # read the activation on their own.
        return self.add_lora(y, silu_and_mul(gate_up), batch)

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
        """y + each row's adapter term; x [T, in], y [T, out]."""
        if self.context.use_triton:
            from serval.kernels.triton_lora import lora_expand_slices, lora_shrink
        else:
            from serval.kernels.triton_lora import lora_expand_slices_reference as lora_expand_slices
            from serval.kernels.triton_lora import lora_shrink_reference as lora_shrink
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        h = lora_shrink(flat_x, self.lora_a, batch)
        lora_expand_slices(flat_y, h, self.lora_b, self.column_slices, batch)
        return y

    def set_slot(self, slot: int, pairs: dict) -> None:
        """Copy an adapter's pairs for this layer into slot (pairs: slice name -> LoRAPair); zero the rest."""
        rank = self.max_lora_rank
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        for index, part in enumerate(self.slices):
            pair = pairs.get(part.name)
            if pair is None:
                continue
            r = pair.a.shape[0]
            self.lora_a[slot, index * rank:index * rank + r].copy_(pair.a, non_blocking=True)
            self.lora_b[slot, part.offset:part.offset + part.size, :r].copy_(pair.b, non_blocking=True)


# Which projections of a decoder layer take adapters (the PEFT names map onto these: serval.lora.adapter).
LORA_PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@dataclass
class LoRALayers:
    """The model's LoRA layers by module path, and the context they share."""
    context: LoRAContext
    layers: dict[str, LoRALinear] = field(default_factory=dict)


def wrap_lora_layers(model: nn.Module, max_loras: int, max_lora_rank: int, use_triton: bool) -> LoRALayers:
    """Replace each decoder layer's projections by LoRALinear around them (after the weights are loaded)."""
    wrapped = LoRALayers(LoRAContext(use_triton=use_triton))
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear) or not any(f".{name}".endswith(f".{p}") for p in LORA_PROJECTIONS):
            continue
        parent_name, _, child = name.rpartition(".")
        layer = LoRALinear(module, wrapped.context, max_loras, max_lora_rank)
        setattr(model.get_submodule(parent_name), child, layer)
        wrapped.layers[name] = layer
    if not wrapped.layers:
        raise ValueError(f"{type(model).__name__} has no projections LoRA can adapt ({', '.join(LORA_PROJECTIONS)})")
    return wrapped
