"""Attention sinks (gpt-oss): the torch reference against a plain softmax with the sink as one more column, and the
Triton kernel (the interpreter on CPU) against the reference, for prefill chunks, windows and split-K decode."""
from __future__ import annotations

import random

import pytest
import torch

from serval.kernels import paged_attention as reference
from tests.kernels.test_triton_attention import DEVICE, random_step


def softmax_with_sink_column(query, keys, values, sinks, scale, positions, window):
    """One request, dense: [Q, H, D] queries at `positions` over keys/values [S, KVH, D]."""
    group = query.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,shd->hqs", query, k) * scale
    mask = reference.attention_mask(positions, keys.shape[0], window)
    scores = scores.masked_fill(~mask, float("-inf"))
    logits = torch.cat((scores, sinks[:, None, None].expand(-1, len(positions), 1)), dim=-1)
    probs = torch.softmax(logits, dim=-1)[..., :-1]
    return torch.einsum("hqs,shd->qhd", probs, v)


@pytest.mark.parametrize("window", [None, 5])
def test_reference_sinks_equal_an_extra_softmax_column(window):
    rng = random.Random(3)
    spans = [(0, 13), (9, 10), (4, 22)]
    kv_cache, metadata = random_step(rng, spans, num_kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32)
    query = torch.randn(metadata.query_start_loc[-1], 4, 16, device=DEVICE)
    sinks = torch.randn(4, device=DEVICE) * 2
    got = reference.paged_attention(query, kv_cache, metadata, 0.25, window, sinks=sinks)
    without = reference.paged_attention(query, kv_cache, metadata, 0.25, window)
    assert not torch.allclose(got, without, atol=1e-3)
    for i, (start, end) in enumerate(spans):
        keys, values = reference.gather_kv(kv_cache, metadata.block_tables[i:i + 1], end)
        rows = slice(metadata.query_start_loc[i], metadata.query_start_loc[i + 1])
        want = softmax_with_sink_column(query[rows], keys[0], values[0], sinks, 0.25,
                                        torch.arange(start, end, device=DEVICE), window)
        torch.testing.assert_close(got[rows], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 7])
def test_triton_sinks_match_reference(window):
    pytest.importorskip("triton")
    from serval.kernels import triton_attention
    rng = random.Random(11)
    for spans in ([(0, 30), (12, 13), (20, 45), (0, 1)],  # prefill, chunk after a prefix, decode rows
                  [(n - 1, n) for n in (1, 3, 40, 130)]):  # decode only: split-K
        kv_cache, metadata = random_step(rng, spans, num_kv_heads=2, head_dim=16, block_size=16,
                                         dtype=torch.float32)
        query = torch.randn(metadata.query_start_loc[-1], 6, 16, device=DEVICE)
        sinks = torch.randn(6, device=DEVICE) * 3
        expected = reference.paged_attention(query, kv_cache, metadata, 0.25, window, sinks=sinks)
        out = torch.full_like(query, float("nan"))
        triton_attention.paged_attention(query, kv_cache, metadata, 0.25, window, out=out, sinks=sinks)
        torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)
