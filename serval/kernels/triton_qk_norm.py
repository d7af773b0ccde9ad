"""Qwen3's per-head RMSNorm of q and k (Qwen3, Qwen3-MoE) in one Triton kernel, in place on the views of the merged
qkv projection's output. Its torch reference is serval.layers.norm.rms_norm applied per head (q_norm, then k_norm),
which CPU runs and the tests compare against.

    q[t, h] = w_q * normalize(q[t, h]);  k[t, h] = w_k * normalize(k[t, h])   (each over head_dim, float32, rounded
                                                                              to the model dtype before the scale)
One program per token normalizes all its q heads and k heads: [heads, head_dim] tiles, read once, written once.

Why: two RMSNorm launches (or, as torch math, sixteen kernels) a layer become one; at batch-1 decode each launch
is a few microseconds of a Qwen3-30B-A3B layer's ~60 (docs/models.md, "MoE decode: kernels a layer"). In place,
because the projection's output is this step's scratch: the strided views need no gather and no new buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from serval.kernels import pdl


@triton.jit
def _normalize_heads(base_ptr, stride_head, num_heads, weight_ptr, dims, dim_valid, head_dim, eps,
                     HEADS_PAD: tl.constexpr):
    heads = tl.arange(0, HEADS_PAD)[:, None]
    mask = (heads < num_heads) & dim_valid[None, :]
    ptrs = base_ptr + heads * stride_head + dims[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    inverse_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / head_dim + eps)
    normed = (x * inverse_rms[:, None]).to(base_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + dims, mask=dim_valid, other=0.0).to(tl.float32)
    # The product of two half-precision values is exact in float32: one rounding, as torch's multiply.
    tl.store(ptrs, (weight[None, :] * normed).to(base_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_kernel(query_ptr, key_ptr, q_weight_ptr, k_weight_ptr, stride_query_token, stride_query_head,
                    stride_key_token, stride_key_head, num_heads, num_kv_heads, head_dim, eps,
                    Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                    USE_PDL: tl.constexpr):
    pdl.wait(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < head_dim
    _normalize_heads(query_ptr + token * stride_query_token, stride_query_head, num_heads, q_weight_ptr, dims,
                     dim_valid, head_dim, eps, Q_HEADS_PAD)
    _normalize_heads(key_ptr + token * stride_key_token, stride_key_head, num_kv_heads, k_weight_ptr, dims,
                     dim_valid, head_dim, eps, K_HEADS_PAD)


def rms_norm_qk_(query: torch.Tensor, key: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalize query [T, H, D] and key [T, KVH, D] per head in place (each may be a strided view, last dim
    contiguous) with their weights [D]; returns them."""
    num_tokens, num_heads, head_dim = query.shape
    assert query.stride(-1) == 1 and key.stride(-1) == 1 and key.shape[0] == num_tokens and key.shape[2] == head_dim
    if num_tokens:
        head_dim_pad = triton.next_power_of_2(head_dim)
        q_heads_pad = triton.next_power_of_2(num_heads)
        _qk_norm_kernel[(num_tokens,)](
            query, key, q_weight, k_weight, query.stride(0), query.stride(1), key.stride(0), key.stride(1),
            num_heads, key.shape[1], head_dim, eps, Q_HEADS_PAD=q_heads_pad,
            K_HEADS_PAD=triton.next_power_of_2(key.shape[1]), HEAD_DIM_PAD=head_dim_pad,
            num_warps=min(max(q_heads_pad * head_dim_pad // 1024, 1), 8), **pdl.launch_options(query))
    return query, key
