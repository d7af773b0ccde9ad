"""serval.layers.quant.gguf_triton: GGUF blocks on a Linear layer, run by the Triton kernels (the interpreter on the
CPU), against gguf's own dequantizer followed by a float32 matmul: bias, merged projections of one type and of
several, the fused SwiGLU input, dummy weights, and refusals that name the layer's format."""
from __future__ import annotations

import gguf
import pytest
import torch
from tests.kernels.test_triton_gguf import DEVICE, gguf_reference, gguf_rows

from serval.layers.linear import Linear, MergedLinear
from serval.layers.quant.gguf_triton import GGUFTritonMethod

pytest.importorskip("triton")

Q = gguf.GGMLQuantizationType
# float32 x on a GPU: the GEMM's tl.dot runs on tf32 tensor cores (10-bit mantissa).
TOLERANCE = dict(atol=1e-4, rtol=1e-4) if DEVICE == "cpu" else dict(atol=3e-2, rtol=1e-2)


def close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got.cpu(), expected, **TOLERANCE)


def loaded(layer, method: GGUFTritonMethod, raws: dict) -> None:
    layer.requires_grad_(False)
    layer.to(DEVICE)
    layer.set_quant_method(method)
    for shard, raw in raws.items():
        layer.quant_method.load(layer, shard, "gguf_blocks", torch.from_numpy(raw), f"{shard}.gguf_blocks")
    layer.quant_method.finish(layer, "layer")


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("batch", [1, 9])
def test_linear_with_bias_equals_dequantized_matmul(qtype, batch):
    k, n = 256, 40
    raw = gguf_rows(qtype, n, k, seed=1)
    layer = Linear(k, n, bias=True)
    layer.bias.data.copy_(torch.randn(n))
    loaded(layer, GGUFTritonMethod(qtype.name), {None: raw})
    x = torch.randn(2, batch, k)  # leading dims are the model's (batch, tokens)
    expected = x @ gguf_reference(raw, qtype).t() + layer.bias.cpu()
    close(layer(x.to(DEVICE)), expected)
    assert layer.weight is None and layer.gguf_blocks.shape == (n, raw.shape[1])
    assert layer.gguf_blocks.numel() / (n * k) == gguf.GGML_QUANT_SIZES[qtype][1] / gguf.GGML_QUANT_SIZES[qtype][0]


def test_merged_layers_of_one_type_and_of_several_fuse_swiglu():
    k = 64
    gate_up = MergedLinear(k, {"gate": 32, "up": 32})
    raws = {"gate": gguf_rows(Q.Q4_1, 32, k, seed=2), "up": gguf_rows(Q.Q4_1, 32, k, seed=3)}
    loaded(gate_up, GGUFTritonMethod("Q4_1"), raws)
    qkv = MergedLinear(k, {"q": 64, "k": 32, "v": 32})
    qkv_types = (("q", "Q5_0"), ("k", "Q5_0"), ("v", "Q8_0"))
    qkv_raws = {shard: gguf_rows(Q[name], qkv.output_sizes[shard], k, seed=i)
                for i, (shard, name) in enumerate(qkv_types)}
    loaded(qkv, GGUFTritonMethod("Q5_0+Q5_0+Q8_0", shard_types=qkv_types), qkv_raws)
    down = Linear(32, 16, bias=False)
    with pytest.raises(ValueError, match="does not hold whole Q6_K blocks of 256 weights"):
        Linear(32, 16, bias=False).set_quant_method(GGUFTritonMethod("Q6_K"))
    down_raw = gguf_rows(Q.Q8_0, 16, 32, seed=4)
    loaded(down, GGUFTritonMethod("Q8_0"), {None: down_raw})

    x = torch.randn(5, k)
    gate, up = (x @ gguf_reference(raws[s], Q.Q4_1).t() for s in ("gate", "up"))
    expected = (torch.nn.functional.silu(gate) * up) @ gguf_reference(down_raw, Q.Q8_0).t()
    close(down.forward_silu_and_mul(gate_up(x.to(DEVICE))), expected)
    expected_qkv = torch.cat([x @ gguf_reference(qkv_raws[s], Q[name]).t() for s, name in qkv_types], dim=-1)
    close(qkv(x.to(DEVICE)), expected_qkv)


def test_dummy_weights_are_gguf_s_quantization():
    layer = Linear(64, 16, bias=False)
    layer.weight.data.copy_(torch.randn(16, 64) * 0.1)
    raw = gguf.quants.quantize(layer.weight.detach().numpy(), Q.Q4_0)
    layer.to(DEVICE).quantize_(GGUFTritonMethod("Q4_0"))
    assert torch.equal(layer.gguf_blocks.cpu(), torch.from_numpy(raw))
    with pytest.raises(ValueError, match="gguf Q4_K: gguf's quantizer cannot write this"):
        Linear(256, 16).quantize_(GGUFTritonMethod("Q4_K"))


def test_wrong_tensors_and_types_are_named():
    layer = MergedLinear(64, {"q": 32, "k": 32})
    layer.set_quant_method(GGUFTritonMethod("Q8_0"))
    with pytest.raises(ValueError, match=r"gguf Q8_0: 'q.gguf_blocks' holds torch.uint8 \(32, 40\); the layer "
                                         r"expects uint8 \(32, 68\)"):
        layer.quant_method.load(layer, "q", "gguf_blocks", torch.zeros(32, 40, dtype=torch.uint8), "q.gguf_blocks")
    layer.quant_method.load(layer, "q", "gguf_blocks", torch.from_numpy(gguf_rows(Q.Q8_0, 32, 64, 0)), "q")
    with pytest.raises(ValueError, match=r"missing tensors \['qkv\[k\]\.gguf_blocks'\]"):
        layer.quant_method.finish(layer, "qkv")
    with pytest.raises(ValueError, match="no Triton kernel for Q2_K"):
        Linear(256, 16).set_quant_method(GGUFTritonMethod("Q2_K"))
    mixed = GGUFTritonMethod("Q4_0+Q8_0", shard_types=(("gate", "Q4_0"), ("up", "Q8_0")))
    with pytest.raises(ValueError, match=r"projections \['gate', 'up'\], but the layer merges \['q', 'k'\]"):
        MergedLinear(64, {"q": 32, "k": 32}).set_quant_method(mixed)
