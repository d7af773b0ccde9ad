"""Multi-head latent attention (DeepSeek-V2, 2024) over a paged cache of the compressed latent.

Every head's key and value are up-projections of one small latent per token: c = RMSNorm(W_DKV x) (kv_lora_rank
values) and one rotary key part shared by all heads, k_pe = RoPE(W_KR x) (qk_rope_head_dim values):

    k_h = [W_UK_h c ; k_pe]     v_h = W_UV_h c     (W_UK, W_UV: the rows of kv_b_proj, per head)

The cache stores [c ; k_pe] per token, one row of kv_lora_rank + qk_rope_head_dim values for all heads, instead of
2 x heads x head_dim: for DeepSeek-V3, 576 values against 2 x 128 x 192 = 49152 (85x fewer bytes).

    layer cache: [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]   (slots as in paged_attention)

Two ways to attend over it, equal in exact arithmetic:
- plain (prefill and its chunks, many queries per request): expand the request's cached latents to full K and V
  through kv_b_proj, then causal softmax attention, as transformers does;
- absorbed (decode, one query per request): fold W_UK into the query, q_lat_h = q_nope_h W_UK_h, score against
  the latents directly (q_lat_h . c + q_pe_h . k_pe), take the probability-weighted sum of latents and apply W_UV
  last, so a decode step reads each cached latent once and never builds K or V.
The absorbed decode runs the Triton kernel (serval.kernels.triton_mla) where the attention backend is Triton (CUDA,
or SERVAL_ATTENTION_BACKEND=triton in the interpreter) and the torch code below elsewhere; the plain path is torch
code on every device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from serval.kernels import paged_attention as torch_backend
from serval.kernels.paged_attention import attention_mask, to_cache_dtype
from serval.layers.attention import AttentionMetadata, attention_backend


@dataclass(frozen=True)
class LatentDims:
    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def cache_width(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    def full_kv_values_per_token(self) -> int:
        """What a cache of full K and V would store per token and layer, for comparison."""
        return self.num_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)


def latent_cache_shape(dims: LatentDims, num_blocks: int, block_size: int) -> tuple[int, int, int]:
    return (num_blocks, block_size, dims.cache_width)


def write_latent(cache: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store each new token's normalized latent [T, r] and rotated k_pe [T, rope] at its slot."""
    rows = cache.view(-1, cache.shape[-1])
    rows[slot_mapping] = to_cache_dtype(torch.cat((latent, k_pe), dim=-1), cache.dtype)


def _gather_latent(cache: torch.Tensor, block_tables: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Latent rows of positions [0, num_tokens) for each row of block_tables: [B, num_tokens, width], float32."""
    block_size = cache.shape[1]
    num_blocks = -(-num_tokens // block_size)
    blocks = block_tables[:, :num_blocks].long()
    rows = cache[blocks].view(blocks.shape[0], num_blocks * block_size, cache.shape[-1])[:, :num_tokens]
    return rows.float()


def latent_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, metadata: AttentionMetadata,
                     kv_b_weight: torch.Tensor, dims: LatentDims, scale: float) -> torch.Tensor:
    """q_nope [T, H, nope], q_pe [T, H, rope] (rotated) over each request's cached latents -> [T, H, v_head_dim].
    The new tokens' latents must already be in the cache (write_latent first)."""
    out = torch.empty(q_nope.shape[0], dims.num_heads, dims.v_head_dim, dtype=q_nope.dtype, device=q_nope.device)
    starts, seq_lens = metadata.query_start_loc, metadata.seq_lens
    weight = kv_b_weight.float().view(dims.num_heads, dims.qk_nope_head_dim + dims.v_head_dim, dims.kv_lora_rank)
    decode = [i for i in range(len(seq_lens)) if starts[i + 1] - starts[i] == 1]
    if decode:
        triton = attention_backend(q_nope.device) is not torch_backend
        decode_fn = _absorbed_decode_triton if triton else _absorbed_decode
        decode_fn(q_nope, q_pe, cache, metadata, weight, dims, scale, decode, out)
    for i in range(len(seq_lens)):
        start, end = starts[i], starts[i + 1]
        if end - start > 1:
            latents = _gather_latent(cache, metadata.block_tables[i:i + 1], seq_lens[i])[0]
            positions = torch.arange(seq_lens[i] - (end - start), seq_lens[i], device=q_nope.device)
            out[start:end] = _plain(q_nope[start:end], q_pe[start:end], latents, positions, kv_b_weight, dims, scale)
    return out


def _plain(q_nope: torch.Tensor, q_pe: torch.Tensor, latents: torch.Tensor, positions: torch.Tensor,
           kv_b_weight: torch.Tensor, dims: LatentDims, scale: float) -> torch.Tensor:
    """One request: latents [S, width] expanded to K [S, H, nope + rope] and V [S, H, v]; causal attention."""
    num_keys = latents.shape[0]
    latent, k_pe = latents.split([dims.kv_lora_rank, dims.qk_rope_head_dim], dim=-1)
    # kv_b_proj runs in the model dtype on the cached (model-dtype) latent, as transformers' expand_kv does.
    kv = F.linear(latent.to(kv_b_weight.dtype), kv_b_weight).float()
    kv = kv.view(num_keys, dims.num_heads, dims.qk_nope_head_dim + dims.v_head_dim)
    k_nope, value = kv.split([dims.qk_nope_head_dim, dims.v_head_dim], dim=-1)
    key = torch.cat((k_nope, k_pe[:, None, :].expand(-1, dims.num_heads, -1)), dim=-1)
    query = torch.cat((q_nope, q_pe), dim=-1).float()
    # matmul rather than einsum: torch's einsum spends tens of milliseconds per call on CPU at these sizes.
    scores = (query.transpose(0, 1) @ key.permute(1, 2, 0)) * scale  # [H, Q, K]
    scores = scores.masked_fill(~attention_mask(positions, num_keys, None), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ value.transpose(0, 1)).transpose(0, 1).to(q_nope.dtype)


def _absorbed_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, metadata: AttentionMetadata,
                     weight: torch.Tensor, dims: LatentDims, scale: float, requests: list[int],
                     out: torch.Tensor) -> None:
    """All one-token requests at once, over latents gathered to the longest context (the mask hides the rest)."""
    rows = torch.tensor([metadata.query_start_loc[i] for i in requests], device=q_nope.device)
    index = torch.tensor(requests, device=q_nope.device)
    seq_lens = metadata.seq_lens_tensor[index].long()
    latents = _gather_latent(cache, metadata.block_tables[index], max(metadata.seq_lens[i] for i in requests))
    latent, k_pe = latents.split([dims.kv_lora_rank, dims.qk_rope_head_dim], dim=-1)  # [B, S, r], [B, S, rope]
    w_uk, w_uv = weight.split([dims.qk_nope_head_dim, dims.v_head_dim], dim=1)  # [H, nope, r], [H, v, r]
    q_latent = absorb_query(q_nope[rows].float(), w_uk)  # [B, H, r]
    scores = (q_latent @ latent.transpose(1, 2) + q_pe[rows].float() @ k_pe.transpose(1, 2)) * scale  # [B, H, S]
    mask = attention_mask(seq_lens - 1, latents.shape[1], None)  # [B, S]
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    out_latent = torch.softmax(scores, dim=-1) @ latent  # [B, H, r]
    out[rows] = expand_values(out_latent, w_uv).to(out.dtype)


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """q_nope [B, H, nope] through each head's key rows w_uk [H, nope, r] -> [B, H, r]: q_nope_h . W_UK_h c equals
    (q_nope_h W_UK_h) . c, so the query moves to the latent space instead of every key leaving it."""
    return (q_nope.transpose(0, 1) @ w_uk).transpose(0, 1)


def expand_values(out_latent: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """Weighted latents [B, H, r] through each head's value rows w_uv [H, v, r] -> [B, H, v]."""
    return (out_latent.transpose(0, 1) @ w_uv.transpose(1, 2)).transpose(0, 1)


def _absorbed_decode_triton(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                            metadata: AttentionMetadata, weight: torch.Tensor, dims: LatentDims, scale: float,
                            requests: list[int], out: torch.Tensor) -> None:
    """_absorbed_decode with the latents read by the Triton kernel (no gather, no padding to the longest)."""
    from serval.kernels import triton_mla  # imports triton, which CPU-only installs may lack
    rows = torch.tensor([metadata.query_start_loc[i] for i in requests], device=q_nope.device)
    index = torch.tensor(requests, device=q_nope.device)
    w_uk, w_uv = weight.split([dims.qk_nope_head_dim, dims.v_head_dim], dim=1)
    q_latent = absorb_query(q_nope[rows].float(), w_uk).to(q_nope.dtype).contiguous()
    out_latent = triton_mla.absorbed_decode(q_latent, q_pe[rows].contiguous(), cache, metadata.block_tables[index],
                                            metadata.seq_lens_tensor[index], scale)
    out[rows] = expand_values(out_latent, w_uv).to(out.dtype)
