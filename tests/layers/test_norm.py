"""RMSNorm with fused residual add against transformers' LlamaRMSNorm; the gated activations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from serval.layers.activation import get_act_and_mul, silu_and_mul
from serval.layers.norm import RMSNorm, rms_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers_with_and_without_residual(dtype):
    torch.manual_seed(0)
    hf = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    ours = RMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        hf.weight.normal_()
        ours.weight.copy_(hf.weight)
    x, residual = torch.randn(7, 64, dtype=dtype), torch.randn(7, 64, dtype=dtype)
    torch.testing.assert_close(ours(x), hf(x), atol=0, rtol=0)
    normed, new_residual = ours(x, residual)
    torch.testing.assert_close(new_residual, x + residual, atol=0, rtol=0)
    torch.testing.assert_close(normed, hf(x + residual), atol=0, rtol=0)


def test_function_returns_input_as_residual_when_none():
    x, weight = torch.randn(2, 8), torch.full((8,), 2.0)
    normed, residual = rms_norm(x, None, weight, 1e-6)
    assert residual is x
    torch.testing.assert_close(normed.pow(2).mean(-1), torch.full((2,), 4.0), atol=1e-4, rtol=1e-4)


def test_per_head_norm_on_three_dims():
    # Qwen3 normalizes q/k per head: [T, H, D] normalizes over D only.
    norm = RMSNorm(4)
    x = torch.tensor([[[1.0, 1, 1, 1], [10.0, 10, 10, 10]]])
    torch.testing.assert_close(norm(x), torch.ones(1, 2, 4), atol=1e-4, rtol=1e-4)


def test_act_and_mul():
    x = torch.randn(3, 10)
    torch.testing.assert_close(silu_and_mul(x), F.silu(x[:, :5]) * x[:, 5:])
    assert get_act_and_mul("silu") is silu_and_mul
    with pytest.raises(ValueError, match="'relu'.*supported"):
        get_act_and_mul("relu")
