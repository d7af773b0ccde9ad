"""Each quantization format as an object on a Linear layer: quantize a float layer into it, then the layer's
forward (and its fused SwiGLU entry) is the product with the dequantized weight, within the format's rounding."""
from __future__ import annotations

import pytest
import torch

from serval.layers.activation import silu_and_mul
from serval.layers.linear import Linear, MergedLinear
from serval.layers.quant import BlockFp8Method, Fp8Method, Int8Method, W4A16Method

# (method, tolerance on the relative error of two chained layers against the float ones): weight rounding plus, for
# W8A8, activations'. Round-to-nearest 4-bit on Gaussian weights costs ~11% a layer; exactness against the
# dequantized weights is tests/model/test_quantized_checkpoints.py's.
METHODS = [(Fp8Method(), 0.1), (BlockFp8Method(128, 128), 0.1), (Int8Method(), 0.02),
           (W4A16Method("gptq", 128), 0.3), (W4A16Method("awq", -1), 0.3)]


@pytest.mark.parametrize("method, tolerance", METHODS, ids=lambda v: getattr(v, "name", str(v)))
@torch.no_grad()
def test_a_quantized_layer_keeps_its_interface(method, tolerance):
    torch.manual_seed(0)
    gate_up = MergedLinear(256, {"gate": 128, "up": 128}, bias=True)
    down = Linear(128, 256, bias=False)
    for module in (gate_up, down):
        torch.nn.init.normal_(module.weight, std=0.05)
    torch.nn.init.normal_(gate_up.bias, std=0.05)
    x = torch.randn(3, 5, 256)
    exact = down(silu_and_mul(gate_up(x)))
    gate_up.quantize_(method)
    down.quantize_(method)
    assert gate_up.quant_method == method and down.quant_method == method
    y = gate_up(x)
    assert y.shape == (3, 5, 256) and y.dtype == torch.float32
    fused = down.forward_silu_and_mul(y)
    torch.testing.assert_close(fused, down(silu_and_mul(y)), atol=1e-5, rtol=1e-5)
    assert 0 < (fused - exact).norm() / exact.norm() < tolerance
    with pytest.raises(ValueError, match="already quantized"):
        down.quantize_(method)
