"""Triton kernel for the absorbed decode of multi-head latent attention (serval.layers.mla): what CUDA runs for a
batch of one-token requests; mla._absorbed_decode is its reference and what CPU runs.

A program owns one request and a block of HEAD_BLOCK heads. It walks the request's cached rows [c_kv ; k_pe]
through the block table TILE_N at a time, scores them against the heads' absorbed queries (q_latent . c_kv +
q_pe . k_pe) and keeps an online softmax (exp2 domain) of the probability-weighted latents, so each cached row is
read once per head block and never expanded to K or V. Lengths come from device tensors (seq_lens), not the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_HEAD_BLOCK = 16  # rows of the dot products: a tensor-core tile
_TILE_N = 32


@triton.jit
def _absorbed_decode_kernel(q_latent_ptr, q_pe_ptr, cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, scale_log2,
                            stride_ql_token, stride_ql_head, stride_qp_token, stride_qp_head, stride_out_token,
                            stride_out_head, stride_block_table, NUM_HEADS: tl.constexpr,
                            HEAD_BLOCK: tl.constexpr, RANK: tl.constexpr, RANK_PAD: tl.constexpr,
                            ROPE: tl.constexpr, ROPE_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                            TILE_N: tl.constexpr):
    seq = tl.program_id(0)
    heads = tl.program_id(1) * HEAD_BLOCK + tl.arange(0, HEAD_BLOCK)
    head_valid = heads < NUM_HEADS
    ranks = tl.arange(0, RANK_PAD)
    rank_valid = ranks < RANK
    ropes = tl.arange(0, ROPE_PAD)
    rope_valid = ropes < ROPE
    token = seq.to(tl.int64)  # a decode batch: request i's one query is row i
    q_latent = tl.load(q_latent_ptr + token * stride_ql_token + heads[:, None] * stride_ql_head + ranks[None, :],
                       mask=head_valid[:, None] & rank_valid[None, :], other=0.0)
    q_pe = tl.load(q_pe_ptr + token * stride_qp_token + heads[:, None] * stride_qp_head + ropes[None, :],
                   mask=head_valid[:, None] & rope_valid[None, :], other=0.0)
    seq_len = tl.load(seq_lens_ptr + seq)

    m_i = tl.full([HEAD_BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([HEAD_BLOCK], tl.float32)
    acc = tl.zeros([HEAD_BLOCK, RANK_PAD], tl.float32)
    for start in range(0, seq_len, TILE_N):
        positions = start + tl.arange(0, TILE_N)
        valid = positions < seq_len
        block = tl.load(block_tables_ptr + seq * stride_block_table + positions // BLOCK_SIZE, mask=valid, other=0)
        row = (block.to(tl.int64) * BLOCK_SIZE + positions % BLOCK_SIZE) * (RANK + ROPE)
        latent = tl.load(cache_ptr + row[:, None] + ranks[None, :], mask=valid[:, None] & rank_valid[None, :],
                         other=0.0).to(q_latent.dtype)
        k_pe = tl.load(cache_ptr + row[:, None] + RANK + ropes[None, :], mask=valid[:, None] & rope_valid[None, :],
                       other=0.0).to(q_pe.dtype)
        scores = (tl.dot(q_latent, tl.trans(latent)) + tl.dot(q_pe, tl.trans(k_pe))) * scale_log2
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        probs = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(probs, 1)
        acc = acc * alpha[:, None] + tl.dot(probs.to(latent.dtype), latent)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + token * stride_out_token + heads[:, None] * stride_out_head + ranks[None, :], out,
             mask=head_valid[:, None] & rank_valid[None, :])


def absorbed_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q_latent [B, H, rank] and q_pe [B, H, rope] (row i: request i's one query), cache [blocks, block_size,
    rank + rope] -> the attention-weighted latents [B, H, rank], float32."""
    batch, num_heads, rank = q_latent.shape
    rope = q_pe.shape[-1]
    assert cache.is_contiguous() and q_latent.stride(-1) == 1 and q_pe.stride(-1) == 1
    out = torch.empty(batch, num_heads, rank, dtype=torch.float32, device=q_latent.device)
    grid = (batch, triton.cdiv(num_heads, _HEAD_BLOCK))
    _absorbed_decode_kernel[grid](
        q_latent, q_pe, cache, out, block_tables, seq_lens, scale * _LOG2E,
        q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), NUM_HEADS=num_heads, HEAD_BLOCK=_HEAD_BLOCK, RANK=rank,
        RANK_PAD=max(16, triton.next_power_of_2(rank)), ROPE=rope, ROPE_PAD=max(16, triton.next_power_of_2(rope)),
        BLOCK_SIZE=cache.shape[1], TILE_N=_TILE_N, num_warps=8 if rank >= 256 else 4)
    return out
