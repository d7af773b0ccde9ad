"""Qwen3's per-head q/k RMSNorm on the Triton rms_norm kernel (what serval.layers.norm.RMSNorm runs for a 3-D input
on a GPU): the [T, heads, head_dim] views of a merged qkv output, strided, against the torch reference
(serval.layers.norm.rms_norm) and transformers' Qwen3 attention norm. In Triton's interpreter on CPU."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm  # noqa: E402

from serval.kernels import triton_fused  # noqa: E402
from serval.layers.norm import rms_norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 3])
def test_heads_of_a_qkv_view_match_the_reference(num_tokens, dtype):
    """Batch 1 is a view of the projection's output (no copy); more rows are gathered first. q's heads, then k's,
    each with its own weight, as Qwen3's attention normalizes them."""
    num_heads, num_kv_heads, head_dim = 4, 2, 32
    generator = torch.Generator().manual_seed(num_tokens)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator).to(DEVICE, dtype)
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    for x in (q.unflatten(-1, (num_heads, head_dim)), k.unflatten(-1, (num_kv_heads, head_dim))):
        weight = (1 + 0.1 * torch.randn(head_dim, generator=generator)).to(DEVICE, dtype)
        hf_norm = Qwen3RMSNorm(head_dim, eps=1e-6).to(dtype)
        hf_norm.weight.data.copy_(weight.cpu())
        expected, _ = rms_norm(x.cpu(), None, weight.cpu(), 1e-6)
        out, _ = triton_fused.rms_norm(x, None, weight, 1e-6)
        assert out.shape == x.shape and out.dtype == dtype
        tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(out.cpu(), expected, **tolerance)
        with torch.no_grad():
            torch.testing.assert_close(out.cpu(), hf_norm(x.cpu()), **tolerance)
