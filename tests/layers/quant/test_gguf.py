"""serval.layers.quant.gguf: 4-bit GGUF blocks kept packed on the CPU, against gguf's own dequantizer followed by
a float32 matmul (what the loader did before: dequantize, then nn.Linear). The kernel multiplies in bfloat16 and
returns bfloat16 (its float32 path is 60x slower), so results agree to bfloat16's precision: BF16_TOLERANCE of
the largest output."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from serval.layers.linear import Linear, MergedLinear
from serval.layers.quant.gguf import GGUFInt4Method, bfloat16_from_numpy, pack_int4_for_cpu
from serval.layers.quant.gguf_blocks import int4_blocks

Q = gguf.GGMLQuantizationType
INT4 = [Q.Q4_0, Q.Q4_1, Q.Q4_K]
BF16_TOLERANCE = 1e-2  # bfloat16 keeps 8 bits: a relative step of 2^-8 = 0.004 per rounding


def assert_close_in_bf16(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=BF16_TOLERANCE * float(expected.abs().max()))


def random_blocks(qtype: Q, rows: int, k: int, seed: int) -> np.ndarray:
    """GGUF data [rows, bytes per row]: quantized from normal weights where gguf.quants can, else random bytes
    with sane fp16 scales (Q4_K)."""
    rng = np.random.default_rng(seed)
    if qtype != Q.Q4_K:
        return gguf.quants.quantize(rng.normal(0, 0.5, size=(rows, k)).astype(np.float32), qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * k // block_size, type_size), dtype=np.uint8)
    for offset in (0, 2):
        raw[:, offset:offset + 2] = rng.uniform(0, 0.05, size=len(raw)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def reference(raw: np.ndarray, qtype: Q) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))


@pytest.mark.parametrize("qtype", INT4, ids=lambda t: t.name)
def test_int4_blocks_reproduce_the_dequantized_weights(qtype):
    raw = random_blocks(qtype, 8, 512, seed=0)
    blocks = int4_blocks(raw, qtype)
    groups = blocks.values.reshape(8, -1, 32).astype(np.float32) - 8
    weights = groups * blocks.scales[..., None] + blocks.zeros[..., None]
    np.testing.assert_allclose(weights.reshape(8, 512), reference(raw, qtype).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n,k", [(64, 32), (960, 576), (192, 1536), (48, 64)])
def test_numpy_packing_equals_torch(n, k):
    values = np.random.default_rng(n).integers(0, 16, size=(n, k), dtype=np.uint8)
    expected = torch._convert_weight_to_int4pack_for_cpu(torch.from_numpy(values.astype(np.int32)), 2)
    assert torch.equal(pack_int4_for_cpu(values), expected)


@pytest.mark.parametrize("qtype", INT4, ids=lambda t: t.name)
@pytest.mark.parametrize("batch", [1, 3, 17, 256])
def test_packed_linear_equals_dequantized_matmul(qtype, batch):
    k, n = 256, 128
    raw = random_blocks(qtype, n, k, seed=1)
    layer = Linear(k, n, bias=True)
    layer.bias.data.copy_(torch.randn(n))
    layer.requires_grad_(False)
    layer.set_quant_method(GGUFInt4Method(qtype.name))
    layer.quant_method.load(layer, None, "gguf_blocks", torch.from_numpy(raw), "w.gguf_blocks")
    layer.quant_method.finish(layer, "w")
    x = torch.randn(batch, k, generator=torch.Generator().manual_seed(batch))
    expected = x @ reference(raw, qtype).t() + layer.bias
    assert_close_in_bf16(layer(x), expected)
    assert layer.weight is None and layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (n, k // 2)


def test_merged_layer_loads_each_shard_and_fuses_swiglu():
    k, sizes = 128, {"gate": 64, "up": 64}
    layer = MergedLinear(k, sizes)
    down = Linear(64, 32, bias=False)
    raws = {name: random_blocks(Q.Q4_1, rows, k, seed=i) for i, (name, rows) in enumerate(sizes.items())}
    layer.set_quant_method(GGUFInt4Method("Q4_1"))
    for name, raw in raws.items():
        layer.quant_method.load(layer, name, "gguf_blocks", torch.from_numpy(raw), f"{name}_proj.gguf_blocks")
    layer.quant_method.finish(layer, "gate_up_proj")
    down_raw = random_blocks(Q.Q4_1, 32, 64, seed=9)
    down.set_quant_method(GGUFInt4Method("Q4_1"))
    down.quant_method.load(down, None, "gguf_blocks", torch.from_numpy(down_raw), "down_proj.gguf_blocks")
    down.quant_method.finish(down, "down_proj")
    x = torch.randn(5, k)
    gate, up = (x @ reference(raws[name], Q.Q4_1).t() for name in sizes)
    expected = (torch.nn.functional.silu(gate) * up) @ reference(down_raw, Q.Q4_1).t()
    assert_close_in_bf16(down.forward_silu_and_mul(layer(x)), expected)


def test_a_missing_shard_and_a_wrong_type_are_named():
    layer = MergedLinear(64, {"q": 64, "k": 64})
    layer.set_quant_method(GGUFInt4Method("Q4_0"))
    layer.quant_method.load(layer, "q", "gguf_blocks", torch.from_numpy(random_blocks(Q.Q4_0, 64, 64, 0)), "q")
    with pytest.raises(ValueError, match=r"missing tensors \['qkv\[k\]\.gguf_blocks'\]"):
        layer.quant_method.finish(layer, "qkv")
    with pytest.raises(ValueError, match="Q8_0: not a 4-bit type"):
        Linear(64, 64).set_quant_method(GGUFInt4Method("Q8_0"))


def test_bfloat16_rounding_equals_torch():
    rng = np.random.default_rng(3)
    values = (rng.normal(size=4096) * 10.0 ** rng.integers(-6, 6, size=4096)).astype(np.float32)
    assert torch.equal(bfloat16_from_numpy(values), torch.from_numpy(values).bfloat16())
