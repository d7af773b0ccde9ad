"""LoRALinear: the base projection plus each row's adapter, slice by slice for merged projections, against the
definition W x + B (A x) per row and slice; no LoRA batch set means exactly the base layer."""
from __future__ import annotations

import torch
from torch import nn

from serval.layers.linear import Linear, qkv_linear
from serval.layers.lora import LoRAContext, LoRALinear, wrap_lora_layers
from serval.layers.mlp import GatedMLP
from serval.lora.adapter import LoRAPair
from serval.lora.batch import build_lora_batch

MAX_RANK = 8


def random_pair(in_features: int, out_features: int, rank: int, seed: int) -> LoRAPair:
    generator = torch.Generator().manual_seed(seed)
    return LoRAPair(torch.randn(rank, in_features, generator=generator),
                    torch.randn(out_features, rank, generator=generator))


def filled(layer: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for param in layer.parameters():
        param.data = torch.randn(param.shape, generator=generator) * 0.1
    return layer


def test_merged_qkv_slices_and_rows_without_adapters():
    base = filled(qkv_linear(32, num_heads=4, num_kv_heads=2, head_dim=8, bias=True))
    layer = LoRALinear(base, LoRAContext(), max_loras=2, max_lora_rank=MAX_RANK)
    # slot 0: an adapter of q and v only (rank 4); slot 1: of q, k and v (rank 8)
    slot0 = {"q": random_pair(32, 32, 4, 1), "v": random_pair(32, 16, 4, 2)}
    slot1 = {"q": random_pair(32, 32, 8, 3), "k": random_pair(32, 16, 8, 4), "v": random_pair(32, 16, 8, 5)}
    layer.set_slot(0, slot0)
    layer.set_slot(1, slot1)
    x = torch.randn(6, 32)
    slots = [1, 1, -1, 0, 1, -1]  # requests of 2, 1, 1, 1, 1 rows
    layer.context.batch = build_lora_batch([2, 1, 1, 1, 1], [1, -1, 0, 1, -1], torch.device("cpu"))
    y = layer(x)
    expected = base(x)
    for row, slot in enumerate(slots):
        if slot < 0:
            continue
        for name, pair in (slot0 if slot == 0 else slot1).items():
            columns = slice(base.offsets[name], base.offsets[name] + base.output_sizes[name])
            expected[row, columns] += pair.b @ (pair.a @ x[row])
    torch.testing.assert_close(y, expected)
    q, k, v = layer.split(y)
    assert q.shape[-1] == 32 and k.shape[-1] == 16 and v.shape[-1] == 16


def test_no_batch_is_the_base_layer():
    base = filled(Linear(16, 24, bias=False))
    layer = LoRALinear(base, LoRAContext(), max_loras=1, max_lora_rank=MAX_RANK)
    layer.set_slot(0, {None: random_pair(16, 24, 8, 1)})
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), base(x))


def test_gated_mlp_down_projection_gets_its_adapter_after_swiglu():
    mlp = filled(GatedMLP(16, 32, "silu"))
    reference = filled(GatedMLP(16, 32, "silu"))
    wrapped = wrap_lora_layers(nn.ModuleDict({"mlp": mlp}), max_loras=1, max_lora_rank=MAX_RANK, use_triton=False)
    assert set(wrapped.layers) == {"mlp.gate_up_proj", "mlp.down_proj"}
    down = random_pair(32, 16, 8, 7)
    wrapped.layers["mlp.down_proj"].set_slot(0, {None: down})
    x = torch.randn(2, 16)
    wrapped.context.batch = build_lora_batch([2], [0], torch.device("cpu"))
    gate, up = reference.gate_up_proj(x).chunk(2, dim=-1)
    hidden = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(mlp(x), reference.down_proj(hidden) + hidden @ down.a.T @ down.b.T)
    wrapped.context.batch = None
    torch.testing.assert_close(mlp(x), reference(x))
