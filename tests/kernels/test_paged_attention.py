"""The paged attention reference against plain dense causal attention on contiguous tensors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from serval.kernels.paged_attention import paged_attention, write_kv
from serval.layers.attention import AttentionMetadata


def allocate_blocks(total_lens: list[int], block_size: int, seed: int = 0) -> tuple[list[list[int]], int]:
    """Shuffled, non-contiguous block ids for each request (block 0 included), and the pool size."""
    needed = [-(-n // block_size) for n in total_lens]
    num_blocks = sum(needed) + 3  # a few blocks nobody owns: reading one by mistake shows up as wrong output
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    blocks, used = [], 0
    for n in needed:
        blocks.append(order[used:used + n])
        used += n
    return blocks, num_blocks


def step_metadata(block_ids: list[list[int]], spans: list[tuple[int, int]],
                  block_size: int) -> tuple[torch.Tensor, AttentionMetadata]:
    """positions and metadata for a step computing positions [start, end) of each request."""
    positions, slots, query_start_loc = [], [], [0]
    for blocks, (start, end) in zip(block_ids, spans):
        positions.extend(range(start, end))
        slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(start, end))
        query_start_loc.append(query_start_loc[-1] + end - start)
    width = max(len(blocks) for blocks in block_ids)
    block_tables = torch.tensor([blocks + [0] * (width - len(blocks)) for blocks in block_ids], dtype=torch.int32)
    metadata = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.int64), query_start_loc=query_start_loc,
                                 seq_lens=[end for _, end in spans], block_tables=block_tables, block_size=block_size)
    return torch.tensor(positions, dtype=torch.int64), metadata


def dense_attention(q, k, v, scale, sliding_window=None):
    """q [S, H, D], k/v [S, KVH, D] of one whole sequence: causal (windowed) attention with heads repeated."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    pos = torch.arange(q.shape[0])
    allowed = pos[None, :] <= pos[:, None]
    if sliding_window is not None:
        allowed &= pos[None, :] > pos[:, None] - sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", F.softmax(scores, dim=-1), v)


@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_chunked_steps_match_dense_attention(num_heads, num_kv_heads, sliding_window):
    torch.manual_seed(0)
    head_dim, block_size, scale = 8, 4, 8 ** -0.5
    lens = [1, 7, 13, 22]
    # Step 1 computes a prefix of each request, step 2 the rest: multi-token chunks and single-token (decode) rows.
    splits = [0, 3, 12, 9]
    seqs = [(torch.randn(n, num_heads, head_dim), torch.randn(n, num_kv_heads, head_dim),
             torch.randn(n, num_kv_heads, head_dim)) for n in lens]
    block_ids, num_blocks = allocate_blocks(lens, block_size)
    kv_cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim)
    outputs = [[] for _ in lens]
    for spans in ([(0, s) for s in splits], list(zip(splits, lens))):
        active = [i for i, (a, b) in enumerate(spans) if b > a]
        _, metadata = step_metadata([block_ids[i] for i in active], [spans[i] for i in active], block_size)
        q, k, v = (torch.cat([seqs[i][j][slice(*spans[i])] for i in active]) for j in range(3))
        write_kv(kv_cache, k, v, metadata.slot_mapping)
        out = paged_attention(q, kv_cache, metadata, scale, sliding_window)
        for row, i in enumerate(active):
            outputs[i].append(out[metadata.query_start_loc[row]:metadata.query_start_loc[row + 1]])
    for (q, k, v), chunks in zip(seqs, outputs):
        expected = dense_attention(q, k, v, scale, sliding_window)
        torch.testing.assert_close(torch.cat(chunks), expected, atol=1e-5, rtol=1e-5)


def test_decode_batch_of_different_lengths_matches_dense():
    torch.manual_seed(1)
    num_heads, num_kv_heads, head_dim, block_size = 4, 2, 16, 2
    lens = [1, 2, 9, 4, 16]
    seqs = [(torch.randn(n, num_heads, head_dim), torch.randn(n, num_kv_heads, head_dim),
             torch.randn(n, num_kv_heads, head_dim)) for n in lens]
    block_ids, num_blocks = allocate_blocks(lens, block_size, seed=3)
    kv_cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim)
    _, prefill = step_metadata(block_ids, [(0, n - 1) for n in lens], block_size)
    write_kv(kv_cache, torch.cat([k[:-1] for _, k, _ in seqs]), torch.cat([v[:-1] for _, _, v in seqs]),
             prefill.slot_mapping)
    _, decode = step_metadata(block_ids, [(n - 1, n) for n in lens], block_size)
    write_kv(kv_cache, torch.cat([k[-1:] for _, k, _ in seqs]), torch.cat([v[-1:] for _, _, v in seqs]),
             decode.slot_mapping)
    out = paged_attention(torch.cat([q[-1:] for q, _, _ in seqs]), kv_cache, decode, 0.25)
    expected = torch.cat([dense_attention(q, k, v, 0.25)[-1:] for q, k, v in seqs])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_write_kv_puts_tokens_at_their_slots():
    kv_cache = torch.zeros(2, 3, 2, 1, 1)
    key = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)
    write_kv(kv_cache, key, -key, torch.tensor([5, 0, 2]))
    assert kv_cache[0].flatten().tolist() == [2.0, 0.0, 3.0, 0.0, 0.0, 1.0]
    assert kv_cache[1].flatten().tolist() == [-2.0, 0.0, -3.0, 0.0, 0.0, -1.0]


def test_half_precision_cache_is_close_to_float32():
    torch.manual_seed(2)
    q, k, v = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    block_ids, num_blocks = allocate_blocks([10], 4)
    _, metadata = step_metadata(block_ids, [(0, 10)], 4)
    kv_cache = torch.zeros(2, num_blocks, 4, 2, 8, dtype=torch.bfloat16)
    write_kv(kv_cache, k.bfloat16(), v.bfloat16(), metadata.slot_mapping)
    out = paged_attention(q.bfloat16(), kv_cache, metadata, 8 ** -0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dense_attention(q, k, v, 8 ** -0.5), atol=3e-2, rtol=3e-2)


def test_float8_cache_saturates_and_attention_stays_close_to_float32():
    """kv_cache_dtype="fp8": stored with scale 1.0, clamped to e4m3's +-448 (an unclamped cast would be NaN),
    and read back into float32 for the same attention: within fp8's few percent of the unquantized result."""
    kv_cache = torch.zeros(2, 2, 2, 1, 2, dtype=torch.float8_e4m3fn)
    key = torch.tensor([[1000.0, -600.0], [0.3, 448.0]]).view(2, 1, 2)
    write_kv(kv_cache, key, -key, torch.tensor([3, 0]))
    assert kv_cache[0].float().flatten().tolist() == [0.3125, 448.0, 0, 0, 0, 0, 448.0, -448.0]
    assert kv_cache[1].float().flatten().tolist() == [-0.3125, -448.0, 0, 0, 0, 0, -448.0, 448.0]

    torch.manual_seed(3)
    lens = [1, 9, 21]
    q, k, v = torch.randn(sum(lens), 4, 16), torch.randn(sum(lens), 2, 16), torch.randn(sum(lens), 2, 16)
    block_ids, num_blocks = allocate_blocks(lens, 4)
    _, metadata = step_metadata(block_ids, [(0, n) for n in lens], 4)
    kv_cache = torch.zeros(2, num_blocks, 4, 2, 16, dtype=torch.float8_e4m3fn)
    write_kv(kv_cache, k, v, metadata.slot_mapping)
    out = paged_attention(q, kv_cache, metadata, 0.25)
    starts = metadata.query_start_loc
    expected = torch.cat([dense_attention(q[a:b], k[a:b], v[a:b], 0.25) for a, b in zip(starts, starts[1:])])
    relative = (out - expected).norm() / expected.norm()
    assert 1e-3 < relative < 5e-2, relative  # quantized (not silently float32), and dequantized right
