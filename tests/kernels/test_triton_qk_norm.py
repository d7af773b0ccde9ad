"""Qwen3's per-head q/k RMSNorm on a GPU: the one-kernel, in-place norm of q and k (serval.kernels.triton_qk_norm,
what LlamaAttention runs through serval.layers.norm.rms_norm_heads) and the Triton rms_norm kernel on a 3-D input
(what RMSNorm runs for one), on the strided [T, heads, head_dim] views of a merged qkv output, against the torch
reference (serval.layers.norm.rms_norm) and transformers' Qwen3RMSNorm. In Triton's interpreter on CPU."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm  # noqa: E402

from serval.kernels import triton_fused, triton_qk_norm  # noqa: E402
from serval.layers.norm import rms_norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6


def qkv_views(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    """A merged projection's output and its q, k, v views, [T, heads, head_dim] each, as LlamaAttention splits it."""
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator).to(DEVICE, dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return qkv, *(x.unflatten(-1, (-1, head_dim)) for x in (q, k, v))


def norm_weight(head_dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return (1 + 0.1 * torch.randn(head_dim, generator=torch.Generator().manual_seed(seed))).to(DEVICE, dtype)


def transformers_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    norm = Qwen3RMSNorm(x.shape[-1], eps=EPS).to(x.dtype)
    norm.weight.data.copy_(weight.cpu())
    with torch.no_grad():
        return norm(x.cpu())


def tolerance(dtype: torch.dtype) -> dict:
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens,num_heads,num_kv_heads,head_dim", [(1, 4, 2, 32), (3, 4, 2, 32), (5, 6, 1, 24)])
def test_q_and_k_normalized_in_place_as_transformers(num_tokens, num_heads, num_kv_heads, head_dim, dtype):
    """Each head of q with q's weight and each of k with k's, written over the projection's output; v untouched.
    6 heads and head_dim 24: neither a power of two, so the masks matter."""
    qkv, q, k, v = qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, seed=num_tokens)
    q_weight, k_weight = norm_weight(head_dim, dtype, seed=1), norm_weight(head_dim, dtype, seed=2)
    q_in, k_in, v_in = q.cpu().clone(), k.cpu().clone(), v.cpu().clone()
    q_out, k_out = triton_qk_norm.rms_norm_qk_(q, k, q_weight, k_weight, EPS)
    assert q_out.data_ptr() == qkv.data_ptr() and k_out.data_ptr() == k.data_ptr()
    for got, x, weight in ((q_out, q_in, q_weight), (k_out, k_in, k_weight)):
        torch.testing.assert_close(got.cpu(), rms_norm(x, None, weight.cpu(), EPS)[0], **tolerance(dtype))
        torch.testing.assert_close(got.cpu(), transformers_norm(x, weight), **tolerance(dtype))
    assert torch.equal(v.cpu(), v_in)


def test_empty_batch():
    _, q, k, _ = qkv_views(0, 4, 2, 32, torch.float32, seed=0)
    q_out, k_out = triton_qk_norm.rms_norm_qk_(q, k, norm_weight(32, torch.float32, 1),
                                               norm_weight(32, torch.float32, 2), EPS)
    assert q_out.shape == (0, 4, 32) and k_out.shape == (0, 2, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 3])
def test_rms_norm_kernel_on_a_3d_view(num_tokens, dtype):
    """RMSNorm's GPU path for a 3-D input: rows of head_dim (a view at batch 1; more rows are gathered first)."""
    _, q, _, _ = qkv_views(num_tokens, 4, 2, 32, dtype, seed=num_tokens)
    weight = norm_weight(32, dtype, seed=3)
    out, _ = triton_fused.rms_norm(q, None, weight, EPS)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.cpu(), rms_norm(q.cpu(), None, weight.cpu(), EPS)[0], **tolerance(dtype))
    torch.testing.assert_close(out.cpu(), transformers_norm(q.cpu(), weight), **tolerance(dtype))
