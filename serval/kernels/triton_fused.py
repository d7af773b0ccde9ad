"""Fused Triton kernels for the small steps between the matmuls: residual add + RMSNorm, rotary embedding of q and
k, SiLU(gate) * up. Their torch references are the functions in serval.layers (norm.rms_norm,
rotary.apply_rotary, activation.silu_and_mul), which CPU runs and the tests compare against.

Why: each of these is a handful of elementwise torch ops, and each op is a kernel launch and a trip through
memory. A decode step of a 32-layer model ran about sixty kernels per layer before fusion; at batch 1 their fixed
cost per launch (a few microseconds, even replayed from a CUDA graph) was larger than the time to read the
layer's weights. Each kernel here reads its inputs once and writes its outputs once, and computes in float32 as
the references do.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from serval.kernels import pdl
from serval.kernels.triton_attention import store_kv


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, stride_x, stride_residual,
                     stride_out, stride_residual_out, hidden_size, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl.wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The add is rounded to the model dtype first, as transformers does: the residual stream is stored so.
        x = (x + tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inverse_rms = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / hidden_size + eps)
    normed = (x32 * inverse_rms).to(x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """serval.layers.norm.rms_norm for 2-D x [T, hidden]: (weight * normalize(x + residual), x + residual)."""
    hidden_size = x.shape[-1]
    rows = x.reshape(-1, hidden_size)
    out = torch.empty_like(rows)
    residual_out = torch.empty_like(rows) if residual is not None else rows
    residual_rows = residual.reshape(-1, hidden_size) if residual is not None else rows
    block = triton.next_power_of_2(hidden_size)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](
            rows, residual_rows, weight, out, residual_out, rows.stride(0), residual_rows.stride(0), out.stride(0),
            residual_out.stride(0), hidden_size, eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=min(max(block // 256, 1), 16), **pdl.launch_options(x))
    return out.view(x.shape), residual_out.view(x.shape) if residual is not None else x


@triton.jit
def _rotate_heads(base_ptr, stride_head, num_heads, cos, sin, dims, dim_valid,
                  HEADS_PAD: tl.constexpr, HALF: tl.constexpr):
    # Rotate-half layout: element i pairs with i + D/2.
    heads = tl.arange(0, HEADS_PAD)[:, None]
    mask = (heads < num_heads) & dim_valid[None, :]
    first = base_ptr + heads * stride_head + dims[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(base_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(base_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(query_ptr, key_ptr, cos_ptr, sin_ptr, positions_ptr, stride_query_token, stride_query_head,
                   stride_key_token, stride_key_head, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
                   stride_value_token, stride_value_head, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                   HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, WRITE_KV: tl.constexpr,
                   KV_HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                   USE_PDL: tl.constexpr):
    pdl.wait(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    dim_valid = dims < HALF
    cos = tl.load(cos_ptr + position * HALF + dims, mask=dim_valid, other=0.0)[None, :]
    sin = tl.load(sin_ptr + position * HALF + dims, mask=dim_valid, other=0.0)[None, :]
    _rotate_heads(query_ptr + token * stride_query_token, stride_query_head, NUM_HEADS, cos, sin, dims, dim_valid,
                  HEADS_PAD, HALF)
    _rotate_heads(key_ptr + token * stride_key_token, stride_key_head, NUM_KV_HEADS, cos, sin, dims, dim_valid,
                  HEADS_PAD, HALF)
    if WRITE_KV:
        # The K/V write of serval.kernels.triton_attention.write_kv (its store_kv), here so a decode step launches
        # one kernel fewer per layer. Its threads read k in another layout than the rotation wrote it: barrier first.
        tl.debug_barrier()
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot >= 0:  # slot < 0: a padding row of a captured batch
            store_kv(key_ptr + token * stride_key_token, value_ptr + token * stride_value_token, key_cache_ptr,
                     value_cache_ptr, slot, stride_key_head, stride_value_head, NUM_KV_HEADS, KV_HEADS_PAD,
                     HEAD_DIM, HEAD_DIM_PAD)


def rotary_(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_cache: torch.Tensor,
            sin_cache: torch.Tensor, value: torch.Tensor | None = None, kv_cache: torch.Tensor | None = None,
            slot_mapping: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query [T, H, D] and key [T, KVH, D] in place by position (cos/sin caches [positions, D/2], float32);
    they may be strided views of the merged qkv projection. Returns them. With value, kv_cache and slot_mapping,
    also stores the rotated key and the value at their slots as triton_attention.write_kv does (slot < 0:
    skipped), in the same kernel."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    assert query.stride(-1) == 1 and key.stride(-1) == 1 and cos_cache.is_contiguous()
    write_kv = kv_cache is not None
    if write_kv:
        assert value.stride(-1) == 1 and kv_cache.is_contiguous()
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            query, key, cos_cache, sin_cache, positions, query.stride(0), query.stride(1), key.stride(0),
            key.stride(1), value if write_kv else key, kv_cache[0] if write_kv else key,
            kv_cache[1] if write_kv else key, slot_mapping if write_kv else positions,
            value.stride(0) if write_kv else 0, value.stride(1) if write_kv else 0,
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
            HEADS_PAD=triton.next_power_of_2(max(num_heads, num_kv_heads)), HALF=head_dim // 2,
            HALF_PAD=triton.next_power_of_2(head_dim // 2), WRITE_KV=write_kv,
            KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
            HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
            **pdl.launch_options(query))
    return query, key


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, intermediate_size, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate_size
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate_size + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty),
             mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU of the merged gate/up projection's output x [T, 2 * I] -> [T, I]."""
    intermediate_size = x.shape[-1] // 2
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty((rows.shape[0], intermediate_size), dtype=x.dtype, device=x.device)
    block = 1024
    if rows.shape[0]:
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(intermediate_size, block))](
            rows, out, rows.stride(0), out.stride(0), intermediate_size, BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], intermediate_size)
