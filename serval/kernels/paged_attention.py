"""Torch reference for paged attention: what CPU runs and what GPU kernels are tested against.

KV cache layout per layer: [2, num_blocks, block_size, num_kv_heads, head_dim], index 0 = K, 1 = V. A token at
position p of a request lives in slot block_table[p // block_size] * block_size + p % block_size.

The cache may be float8 e4m3 (kv_cache_dtype="fp8"): K/V are stored with scale 1.0, clamped to the format's
+-448 (see to_cache_dtype), and read back exactly into the query's precision; the attention math is unchanged.
With per-layer scales (k_scale, v_scale: 0-d float32 tensors, serval.layers.quant.kv_scales) the cache holds
k / k_scale and v / v_scale, and reads multiply them back.

Single-token queries (decode) are batched into one SDPA call over K/V gathered to the longest context; multi-token
queries (prefill and its chunks) run one call each, so a long prompt never pads the decodes beside it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from serval.layers.attention import AttentionMetadata


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the cache's element type. float8 e4m3 has no infinity and torch's cast turns anything past its range
    into NaN, so values are clamped to +-448 first: saturation, as vLLM's fp8 cache with scale 1.0 does, and as
    triton_attention.to_cache_dtype rounds (to nearest even, from float32), byte for byte."""
    if dtype == torch.float8_e4m3fn:
        limit = torch.finfo(dtype).max
        return x.float().clamp(-limit, limit).to(dtype)
    return x.to(dtype)


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Store key/value [T, KVH, D] at their slots (divided by k_scale / v_scale when given); the cache is updated
    in place."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    if k_scale is not None:
        key, value = key.float() / k_scale, value.float() / v_scale
    # Indexed assignment rather than index_copy_, which CPU torch lacks for float8.
    kv_cache[0].view(-1, num_kv_heads, head_dim)[slot_mapping] = to_cache_dtype(key, kv_cache.dtype)
    kv_cache[1].view(-1, num_kv_heads, head_dim)[slot_mapping] = to_cache_dtype(value, kv_cache.dtype)


def gather_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of positions [0, num_tokens) for each row of block_tables: two [B, num_tokens, KVH, D] tensors, in
    the cache's dtype (float8 supports indexing but no arithmetic: callers upcast)."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-num_tokens // block_size)
    blocks = block_tables[:, :num_blocks].long()
    batch = blocks.shape[0]
    k = kv_cache[0][blocks].view(batch, num_blocks * block_size, *kv_cache.shape[-2:])[:, :num_tokens]
    v = kv_cache[1][blocks].view(batch, num_blocks * block_size, *kv_cache.shape[-2:])[:, :num_tokens]
    return k, v


def attention_mask(query_positions: torch.Tensor, num_keys: int, sliding_window: int | None) -> torch.Tensor:
    """[..., Q, K] bool, True where a query at position p may see key position k: k <= p (and k > p - window)."""
    key_positions = torch.arange(num_keys, device=query_positions.device)
    query_positions = query_positions.unsqueeze(-1)
    mask = key_positions <= query_positions
    if sliding_window is not None:
        mask &= key_positions > query_positions - sliding_window
    return mask


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
          scale: float) -> torch.Tensor:
    """query [B, Q, H, D], key/value [B, S, KVH, D], mask [B, Q, S] -> [B, Q, H, D], computed in float32 (a float8
    key/value converts exactly, as it would to the query's dtype: e4m3 values are all bf16 and fp16 values)."""
    out = F.scaled_dot_product_attention(
        query.float().transpose(1, 2), key.float().transpose(1, 2), value.float().transpose(1, 2),
        attn_mask=mask.unsqueeze(1), scale=scale, enable_gqa=True)
    return out.transpose(1, 2).to(query.dtype)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                    sliding_window: int | None = None, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of query [T, H, D] over each request's cached K/V -> [T, H, D].

    Request i's queries are rows query_start_loc[i]:query_start_loc[i + 1], at positions ending at seq_lens[i] - 1;
    its K/V for positions [0, seq_lens[i]) must already be in the cache (write_kv first). k_scale / v_scale: the
    cache holds K / k_scale and V / v_scale.
    """
    scales = (k_scale, v_scale) if k_scale is not None else None
    out = torch.empty_like(query)
    starts, seq_lens = metadata.query_start_loc, metadata.seq_lens
    decode = [i for i in range(len(seq_lens)) if starts[i + 1] - starts[i] == 1]
    if decode:
        _decode_attention(query, kv_cache, metadata, decode, scale, sliding_window, out, scales)
    for i in range(len(seq_lens)):
        start, end = starts[i], starts[i + 1]
        if end - start <= 1:
            continue
        k, v = _scaled(*gather_kv(kv_cache, metadata.block_tables[i:i + 1], seq_lens[i]), scales)
        positions = torch.arange(seq_lens[i] - (end - start), seq_lens[i], device=query.device)
        mask = attention_mask(positions, seq_lens[i], sliding_window).unsqueeze(0)
        out[start:end] = _sdpa(query[start:end].unsqueeze(0), k, v, mask, scale)[0]
    return out


def _decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, requests: list[int],
                      scale: float, sliding_window: int | None, out: torch.Tensor,
                      scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    rows = torch.tensor([metadata.query_start_loc[i] for i in requests], device=query.device)
    index = torch.tensor(requests, device=query.device)
    seq_lens = metadata.seq_lens_tensor[index].long()
    max_len = max(metadata.seq_lens[i] for i in requests)
    k, v = _scaled(*gather_kv(kv_cache, metadata.block_tables[index], max_len), scales)
    # Keys past a request's own length are padding from the longest one; the causal mask hides them.
    mask = attention_mask(seq_lens - 1, max_len, sliding_window).unsqueeze(1)  # [B, 1, S]
    out[rows] = _sdpa(query[rows].unsqueeze(1), k, v, mask, scale)[:, 0]


def _scaled(k: torch.Tensor, v: torch.Tensor,
            scales: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    if scales is None:
        return k, v
    return k.float() * scales[0], v.float() * scales[1]
