"""The Triton attention kernel on batches in the mixed-graph shape (serval.engine.mixed_graphs) against the torch
reference on the same batch unpadded: query rows padded to a token bucket, a padding request with seq_len 0 owning
them, empty requests up to the padded count, stale block-table rows, and max_query_len set to the bucket. The
grid then depends on the bucket and the padded request count alone (triton_attention.flat_tiles), and each program
finds its request on the device. In Triton's interpreter on a CPU, compiled on a GPU."""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from serval.kernels import paged_attention as reference  # noqa: E402
from serval.kernels import triton_attention  # noqa: E402
from serval.layers.attention import AttentionMetadata  # noqa: E402
from tests.kernels.test_triton_attention import DEVICE, FP8, random_step  # noqa: E402


def padded(metadata: AttentionMetadata, bucket: int, num_requests: int) -> AttentionMetadata:
    """metadata in the graph shape: `bucket` rows, `num_requests` requests, request n owning the padding rows."""
    real = metadata.num_requests
    num_tokens = metadata.query_start_loc[-1]
    query_start_loc = metadata.query_start_loc + [bucket] * (num_requests - real)
    seq_lens = metadata.seq_lens + [0] * (num_requests - real)
    stale = torch.randint(0, 3, (num_requests - real, metadata.block_tables.shape[1]), dtype=torch.int32,
                          device=DEVICE)
    slot_mapping = torch.cat([metadata.slot_mapping,
                              torch.full((bucket - num_tokens,), -1, dtype=torch.int64, device=DEVICE)])
    return AttentionMetadata(slot_mapping=slot_mapping, query_start_loc=query_start_loc, seq_lens=seq_lens,
                             block_tables=torch.cat([metadata.block_tables, stale]), block_size=metadata.block_size,
                             max_query_len=bucket, max_seq_len=1)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,kv_dtype,sliding_window", [
    (4, 2, 32, torch.float32, None), (8, 1, 16, torch.float32, None), (6, 2, 16, torch.float32, 7),
    (4, 4, 16, FP8, None)])
def test_padded_mixed_batches_match_the_unpadded_reference(num_heads, num_kv_heads, head_dim, kv_dtype,
                                                           sliding_window):
    rng = random.Random(num_heads * 10 + num_kv_heads + head_dim)
    for trial in range(3):
        # Decodes beside a chunk after a cached prefix and a whole prompt, in shuffled order.
        spans = [(n - 1, n) for n in (rng.randint(1, 50) for _ in range(rng.randint(1, 6)))]
        start = rng.randint(0, 40)
        spans += [(start, start + rng.randint(2, 40)), (0, rng.randint(2, 30))]
        rng.shuffle(spans)
        kv_cache, metadata = random_step(rng, spans, num_kv_heads, head_dim, block_size=4, dtype=kv_dtype)
        num_tokens = metadata.query_start_loc[-1]
        bucket = num_tokens + rng.choice([0, 1, rng.randint(2, 40)])
        graph_shaped = padded(metadata, bucket, len(spans) + 1 + rng.randint(0, 5))
        query = torch.randn(bucket, num_heads, head_dim, device=DEVICE)
        expected = reference.paged_attention(query[:num_tokens].float(), kv_cache, metadata, head_dim ** -0.5,
                                             sliding_window)
        out = torch.full_like(query, float("nan"))
        triton_attention.paged_attention(query, kv_cache, graph_shaped, head_dim ** -0.5, sliding_window, out=out)
        torch.testing.assert_close(out[:num_tokens].float(), expected, atol=2e-3, rtol=2e-3)
        assert torch.equal(out[num_tokens:], torch.zeros_like(out[num_tokens:])), "padding rows attend to nothing"


def test_every_flat_tile_finds_its_request():
    """Requests of every length around the tile size, empty ones included (the padding requests), each row
    written exactly once: the flat grid's bound covers every tile of every request."""
    rng = random.Random(5)
    num_heads, num_kv_heads, head_dim = 2, 1, 16
    block_q = max(1, triton_attention._PREFILL_ROWS // 2)
    lengths = [1, block_q - 1, block_q, block_q + 1, 2 * block_q + 3, 1, 1, 3 * block_q]
    spans = [(0, n) for n in lengths]
    kv_cache, metadata = random_step(rng, spans, num_kv_heads, head_dim, block_size=8, dtype=torch.float32)
    num_tokens = metadata.query_start_loc[-1]
    graph_shaped = padded(metadata, num_tokens + 5, len(spans) + 4)
    query = torch.randn(num_tokens + 5, num_heads, head_dim, device=DEVICE)
    expected = reference.paged_attention(query[:num_tokens], kv_cache, metadata, 0.25)
    out = torch.full_like(query, float("nan"))
    triton_attention.paged_attention(query, kv_cache, graph_shaped, 0.25, out=out)
    torch.testing.assert_close(out[:num_tokens], expected, atol=2e-3, rtol=2e-3)
