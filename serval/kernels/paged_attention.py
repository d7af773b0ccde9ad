"""Torch reference for paged attention: what CPU runs and what GPU kernels are tested against.

KV cache layout per layer: [2, num_blocks, block_size, num_kv_heads, head_dim], index 0 = K, 1 = V. A token at
position p of a request lives in slot block_table[p // block_size] * block_size + p % block_size.

The cache may be float8 e4m3 (kv_cache_dtype="fp8"): K/V are stored with scale 1.0, clamped to the format's
+-448 (see to_cache_dtype), and read back exactly into the query's precision; the attention math is unchanged.
With per-layer scales (k_scale, v_scale: 0-d float32 tensors, serval.layers.quant.kv_scales) the cache holds
k / k_scale and v / v_scale, and reads multiply them back.

Attention sinks (gpt-oss): a learned logit per head joins each softmax as one more column with no value, so a
query may put weight on "nothing"; the probabilities of the real keys then sum to less than one.

Single-token queries (decode) are batched into one SDPA call over K/V gathered to the longest context; multi-token
queries (prefill and its chunks) run one call each, so a long prompt never pads the decodes beside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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
    blocks = block_tables[:, :num_blocks].reshape(-1).long()
    shape = (block_tables.shape[0], num_blocks * block_size, *kv_cache.shape[-2:])
    # index_select copies whole blocks; advanced indexing (kv_cache[0][blocks]) took 3-6x longer on the CPU
    # (16 decode streams of the default model: 570 against 96 us a layer).
    k, v = (kv_cache[i].index_select(0, blocks).view(shape)[:, :num_tokens] for i in (0, 1))
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
          scale: float, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """query [B, Q, H, D], key/value [B, S, KVH, D], mask [B, Q, S] -> [B, Q, H, D], computed in float32 (a float8
    key/value converts exactly, as it would to the query's dtype: e4m3 values are all bf16 and fp16 values)."""
    if sinks is not None:
        return _attention_with_sinks(query, key, value, mask, scale, sinks)
    out = F.scaled_dot_product_attention(
        query.float().transpose(1, 2), key.float().transpose(1, 2), value.float().transpose(1, 2),
        attn_mask=mask.unsqueeze(1), scale=scale, enable_gqa=True)
    return out.transpose(1, 2).to(query.dtype)


def _attention_with_sinks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                          scale: float, sinks: torch.Tensor) -> torch.Tensor:
    """_sdpa with sinks [H] as one more logit per head in each softmax (SDPA has no such column)."""
    group = query.shape[2] // key.shape[2]
    q = query.float().transpose(1, 2)  # [B, H, Q, D]
    k = key.float().repeat_interleave(group, dim=2).transpose(1, 2)
    v = value.float().repeat_interleave(group, dim=2).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    sink_column = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat((scores, sink_column), dim=-1), dim=-1)[..., :-1]
    return (probs @ v).transpose(1, 2).to(query.dtype)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                    sliding_window: int | None = None, sinks: torch.Tensor | None = None,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of query [T, H, D] over each request's cached K/V -> [T, H, D]; sinks [H] (gpt-oss), when
    given, are one more logit per head in every softmax.

    Request i's queries are rows query_start_loc[i]:query_start_loc[i + 1], at positions ending at seq_lens[i] - 1;
    its K/V for positions [0, seq_lens[i]) must already be in the cache (write_kv first). k_scale / v_scale: the
    cache holds K / k_scale and V / v_scale.
    """
    scales = (k_scale, v_scale) if k_scale is not None else None
    starts, seq_lens = metadata.query_start_loc, metadata.seq_lens
    plan = decode_plan(metadata)
    if plan is not None and plan.whole_batch:  # a decode-only step: no scatter into a prefill's output
        return _decode_attention(query, kv_cache, plan, scale, sliding_window, sinks, scales)
    out = torch.empty_like(query)
    if plan is not None:
        out[plan.rows] = _decode_attention(query[plan.rows], kv_cache, plan, scale, sliding_window, sinks, scales)
    for i in range(len(seq_lens)):
        start, end = starts[i], starts[i + 1]
        if end - start <= 1:
            continue
        k, v = _scaled(*gather_kv(kv_cache, metadata.block_tables[i:i + 1], seq_lens[i]), scales)
        positions = torch.arange(seq_lens[i] - (end - start), seq_lens[i], device=query.device)
        mask = attention_mask(positions, seq_lens[i], sliding_window).unsqueeze(0)
        out[start:end] = _sdpa(query[start:end].unsqueeze(0), k, v, mask, scale, sinks)[0]
    return out


@dataclass
class DecodePlan:
    """What every layer's decode attention of one step reads alike: which rows are single-token queries, their
    requests' block tables, lengths and masks. Built by the first layer (decode_plan), kept on the step's metadata:
    thirty layers of the default model otherwise repeat a dozen small ops each."""
    rows: torch.Tensor  # [B] int64: the decode queries' rows of the flat batch
    whole_batch: bool  # every row is a decode query, in order: query and out need no gather or scatter
    blocks: torch.Tensor  # [B, ceil(max_len / block_size)] int64: block_tables of those requests
    seq_lens: torch.Tensor  # [B] int64
    max_len: int
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # by sliding window: [B, 1, max_len]

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        if sliding_window not in self.masks:
            self.masks[sliding_window] = attention_mask(self.seq_lens - 1, self.max_len, sliding_window).unsqueeze(1)
        return self.masks[sliding_window]


def decode_plan(metadata: AttentionMetadata) -> DecodePlan | None:
    """The step's DecodePlan (None without single-token queries), built once and kept on the metadata."""
    if metadata.decode_plan is not None:
        return metadata.decode_plan or None
    starts, device = metadata.query_start_loc, metadata.block_tables.device
    requests = [i for i in range(len(metadata.seq_lens)) if starts[i + 1] - starts[i] == 1]
    if not requests:
        metadata.decode_plan = False
        return None
    index = torch.tensor(requests, device=device)
    max_len = max(metadata.seq_lens[i] for i in requests)
    block_size = metadata.block_size
    metadata.decode_plan = DecodePlan(
        rows=torch.tensor([starts[i] for i in requests], device=device),
        whole_batch=len(requests) == len(metadata.seq_lens) and starts[-1] == len(requests),
        blocks=metadata.block_tables[index, :-(-max_len // block_size)].long(),
        seq_lens=metadata.seq_lens_tensor[index].long(), max_len=max_len)
    return metadata.decode_plan


def _decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, plan: DecodePlan, scale: float,
                      sliding_window: int | None, sinks: torch.Tensor | None = None,
                      scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention of the plan's single-token queries [B, H, D] -> [B, H, D], batched in one SDPA call over K/V
    gathered to the longest context."""
    k, v = _scaled(*gather_kv(kv_cache, plan.blocks, plan.max_len), scales)
    # Keys past a request's own length are padding from the longest one; the causal mask hides them.
    return _sdpa(query.unsqueeze(1), k, v, plan.mask(sliding_window), scale, sinks)[:, 0]


def _scaled(k: torch.Tensor, v: torch.Tensor,
            scales: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    if scales is None:
        return k, v
    return k.float() * scales[0], v.float() * scales[1]
